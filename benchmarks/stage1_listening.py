"""Does stage 1 listen to the words? Stage-1 arms at one budget, scored on what they understood.

    OMP_NUM_THREADS=2 python benchmarks/stage1_listening.py --run runs/cpu --arms paper transcribe --steps 240

Notebook 04's model answers every query with one of a few stock replies. This script trains the
named stage-1 arms (``emo_lib.experiments``, one preset override each) for ``--steps`` steps on the
run's data (notebooks 01-03) and reports, besides the arm scores of notebook 08:

- the *listening test* (``llm.listening_test``): held-out reply cross-entropy after the true query
  minus after another query spoken with the same emotion; about 0 when the words are ignored;
- the *content score* of the same-text replies (``evaluate.content_score``) against mismatched pairs;
- for a model trained with the transcription task, the WER of what it writes down when asked for the
  query's words (``llm.transcripts``) on 60 held-out queries.

Each arm's result is cached in ``runs/<run>/arms/stage1-<arm>/`` with its step count, like
notebook 08's arms (``--steps`` here usually differs from the notebook's, so neither overwrites the
other's cache... unless the steps agree, and then the results are the same by construction).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from emo_lib.report import machine_line, text_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/cpu", help="run directory (notebooks 01-04 done)")
    parser.add_argument("--arms", nargs="+", default=["paper", "transcribe"])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--transcripts", type=int, default=60, help="held-out queries transcribed per arm")
    args = parser.parse_args()

    from emo_lib import experiments, llm
    from emo_lib.asr import word_error_rate
    from emo_lib.evaluate import EmbeddingJudge
    from emo_lib.session import seed_everything
    from train_throughput import open_run  # the same run/preset resolution

    run, cfg = open_run(args.run, None)
    seed_everything(cfg["seed"])
    data = experiments.load_stage1_data(run, cfg)
    judge = EmbeddingJudge.load(run.checkpoint_dir("judge") / "judge.json")
    rows = []
    print(machine_line())
    for name in args.arms:
        started = time.perf_counter()
        result = experiments.train_stage1_arm(run, cfg["name"], None, name, args.steps, data, judge)
        wer = None
        arm = experiments.get_arm(name, 1)
        if arm.overrides.get("stage1.transcribe_prob", 0) > 0 and args.transcripts:
            model = llm.load_stage1(experiments.arm_folder(run, arm) / "checkpoint" / "latest.pt")
            by_id = {r["pair_id"]: r for r in data.rows}
            heard = llm.transcripts(model, data.test[: args.transcripts])
            wer = sum(word_error_rate(by_id[e.pair_id]["query_text"], h) for e, h in zip(data.test, heard)) / len(heard)
            for e, h in list(zip(data.test, heard))[:5]:
                print(f"  said {by_id[e.pair_id]['query_text']!r}\n  wrote {h!r}")
        rows.append([name, result["steps"], f"{result['listening_gain_nats']:+.3f}",
                     f"{result['same_text_content_score']:.3f} / {result['same_text_content_mismatched']:.3f}",
                     result["same_text_distinct_replies"], f"{result['same_text_judge_accuracy']['mean']:.3f}",
                     f"{result['heldout_ce_nats']:.3f}", f"{result['heldout_centered_cosine']:.3f}",
                     "-" if wer is None else f"{wer:.3f}", f"{(time.perf_counter() - started) / 60:.1f}"])
        print(text_table(["arm", "steps", "listening gain (nats)", "content true / mismatched", "distinct replies",
                          "same-text judge", "held-out CE", "centered cos", "transcript WER", "min"], rows))


if __name__ == "__main__":
    main()
