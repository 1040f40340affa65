"""Does stage 1 listen to the words? Stage-1 models scored on what they understood, not only on how they sound.

    OMP_NUM_THREADS=2 python benchmarks/stage1_listening.py --run runs/cpu                      # the run's own stage 1
    OMP_NUM_THREADS=2 python benchmarks/stage1_listening.py --run runs/cpu --arms transcribe --steps 240

Notebook 04's model answers almost every query with one of a few stock replies. This script scores
the run's stage-1 checkpoint (notebook 04) and/or stage-1 arms trained here for ``--steps`` steps on
the run's data (``emo_lib.experiments``, one preset override each; cached in
``runs/<run>/arms/stage1-<arm>/`` like notebook 08's arms, keyed by the step count) on:

- the *listening test* (``llm.listening_test``): held-out reply cross-entropy after another query
  spoken with the same emotion minus after the true query; about 0 when the words are ignored;
- *reply choice* on the same-text set: each held-out same-text utterance is scored (teacher forcing)
  against the dataset's reference replies to the *same sentence* in its other emotions; how often is the
  likeliest one the reply written for the emotion actually spoken? Chance is 1 / (number of candidates).
  This asks whether the heard emotion moves the reply's likelihood at all, without greedy decoding;
- the *content score* of the same-text replies (``evaluate.content_score``) against mismatched pairs and
  the number of distinct replies (arms only: their generated replies are in the arm result);
- for a model trained with the transcription task (``stage1.transcribe_prob``), the WER of what it
  writes when asked for the query's words (``llm.transcripts``) on ``--transcripts`` held-out queries.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from emo_lib.report import machine_line, text_table


def reply_choice(model, same_text: list, rows_by_id: dict, tokenizer) -> tuple[float, float, int]:
    """(accuracy, chance, n): the likeliest reference reply among the same sentence's emotions is the fitting one?"""
    from emo_lib import llm

    groups = defaultdict(list)
    for e in same_text:
        groups[rows_by_id[e.pair_id]["same_text_id"]].append(e)
    hits, chance, n = 0, 0.0, 0
    for examples in groups.values():
        candidates = {}
        for e in examples:
            r = rows_by_id[e.pair_id]
            candidates.setdefault(r["response_emotion"], r["response_text"])
        if len(candidates) < 2:
            continue
        for e in examples:
            trials = [dataclasses.replace(e, response_ids=llm.response_token_ids(tokenizer, text), trajectory=None)
                      for text in candidates.values()]
            ce = [llm.evaluate_teacher_forced(model, [t])["ce"] for t in trials]
            hits += list(candidates)[int(np.argmin(ce))] == rows_by_id[e.pair_id]["response_emotion"]
            chance += 1.0 / len(candidates)
            n += 1
    return hits / max(n, 1), chance / max(n, 1), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/cpu", help="run directory (notebooks 01-03 done; 04 for the run's own model)")
    parser.add_argument("--arms", nargs="*", default=[], help="stage-1 arms to train and score (emo_lib.experiments)")
    parser.add_argument("--steps", type=int, default=240, help="training steps of each arm")
    parser.add_argument("--no-main", action="store_true", help="do not score the run's own stage-1 checkpoint")
    parser.add_argument("--transcripts", type=int, default=60, help="held-out queries transcribed per transcription-trained model")
    args = parser.parse_args()

    from emo_lib import experiments, llm
    from emo_lib.asr import word_error_rate
    from emo_lib.evaluate import EmbeddingJudge
    from emo_lib.pretrained import load_llm
    from emo_lib.session import seed_everything

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import open_run  # the same run/preset resolution

    run, cfg = open_run(args.run, None)
    seed_everything(cfg["seed"])
    print(machine_line())
    data = experiments.load_stage1_data(run, cfg)
    by_id = {r["pair_id"]: r for r in data.rows}
    judge = EmbeddingJudge.load(run.checkpoint_dir("judge") / "judge.json")
    models = [] if args.no_main else [("run's stage 1 (notebook 04)", run.checkpoint_dir("stage1") / "latest.pt", None)]
    for name in args.arms:
        result = experiments.train_stage1_arm(run, cfg["name"], None, name, args.steps, data, judge)
        models.append((f"arm {name}", experiments.arm_folder(run, experiments.get_arm(name, 1)) / "checkpoint" / "latest.pt",
                       result))
    rows = []
    for label, path, result in models:
        started = time.perf_counter()
        backbone, tokenizer = load_llm(cfg["models"]["llm"])
        model = llm.load_stage1(run.require(path, "stage1"), llm=backbone, tokenizer=tokenizer)
        if result is not None and "listening_ce_true" in result:  # the arm scored it already, on the same test set
            listening = {"ce_true": result["listening_ce_true"], "ce_swapped": result["listening_ce_swapped"],
                         "gain": result["listening_gain_nats"]}
        else:
            listening = llm.listening_test(model, data.test, by_id, seed=cfg["seed"])
        choice, chance, n_choice = reply_choice(model, data.same_text, by_id, tokenizer)
        wer = "-"
        if model.config.transcribe_prob > 0 and args.transcripts:
            heard = llm.transcripts(model, data.test[: args.transcripts])
            wer = f"{np.mean([word_error_rate(by_id[e.pair_id]['query_text'], h) for e, h in zip(data.test, heard)]):.3f}"
            for e, h in list(zip(data.test, heard))[:3]:
                print(f"  said {by_id[e.pair_id]['query_text']!r}\n  wrote {h!r}")
        content = "-" if result is None else \
            f"{result['same_text_content_score']:.3f} / {result['same_text_content_mismatched']:.3f}"
        rows.append([label, f"{listening['ce_true']:.3f} / {listening['ce_swapped']:.3f} / {listening['gain']:+.3f}",
                     f"{choice:.3f} / {chance:.3f} ({n_choice})", content,
                     "-" if result is None else f"{result['same_text_judge_accuracy']['mean']:.3f}",
                     "-" if result is None else result["same_text_distinct_replies"], wer,
                     f"{(time.perf_counter() - started) / 60:.1f}"])
        print(text_table(["model", "listening: CE true / swapped / gain (nats)", "reply choice / chance (n)",
                          "content true / mismatched", "same-text judge", "distinct replies", "transcript WER",
                          "scoring min"], rows), flush=True)
        del model, backbone


if __name__ == "__main__":
    main()
