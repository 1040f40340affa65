"""How much of the words do the speech tokens hold? A CTC spelling probe per kind of input.

    OMP_NUM_THREADS=2 python benchmarks/unit_content.py --run runs/cpu
    OMP_NUM_THREADS=2 python benchmarks/unit_content.py --run runs/cpu --units 1024 --steps 800
    OMP_NUM_THREADS=2 python benchmarks/unit_content.py --run runs/cpu --units 1024 --inputs fitted

Notebook 05 resynthesizes held-out speech from its true tokens, and Whisper mishears a large share of
the words (resynthesis WER). Two causes are possible: token2mel draws the words badly, or the
tokens do not hold them. This script measures the second without any synthesis. For each kind of
input, the same small CTC probe (``emo_lib.content_probe``: residual dilated 1-D convolutions) learns to
spell the transcript from the 25 Hz sequence alone, on the run's training utterances, at one
budget; its character error rate (CER) is measured on the test split (held-out voices):

- ``Whisper frames pooled to 25 Hz``: the continuous frames the units were cut from (notebook 02,
  pooled as in notebook 05): the reference, what the tokens could hold at best at this rate;
- ``content units (K)``: the run's k-means unit ids, and, with ``--units``, units of other sizes
  fitted here on the run's training frames as notebook 05 fits them;
- ``centroids``: each unit replaced by its k-means centroid (the quantised frame), read like the
  frames: no embedding table to learn, so unit counts compare at one probe budget (a learned
  embedding of 1 024 ids sees each id 4x less often than one of 256);
- ``units + pitch + energy``: the three streams token2mel reads;
- ``pitch + energy only``: a control that holds no words (its CER shows what spelling from
  rhythm and loudness alone gives).

No language model: the CERs are comparable with each other, not with a recognizer's. A CER of the
units near that of the frames means the words are in the tokens, and what Whisper mishears is
token2mel's doing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emo_lib import speech_tokens as S
from emo_lib.content_probe import CTCProbe, fit_content_probe
from emo_lib.report import machine_line, text_table
from emo_lib.session import seed_everything
from emo_lib.store import FrameStore


INPUT_KINDS = ("frames", "units", "fitted", "centroids", "streams", "control")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/cpu", help="a run directory after notebook 05")
    parser.add_argument("--units", type=int, nargs="*", default=[], help="other unit counts to fit and probe")
    parser.add_argument("--steps", type=int, default=600, help="probe training steps (one budget for every input)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="probe channel width")
    parser.add_argument("--test-utterances", type=int, default=200, help="held-out utterances scored (seeded)")
    parser.add_argument("--kmeans-frames", type=int, default=100_000, help="frames to fit --units on (preset default)")
    parser.add_argument("--kmeans-iters", type=int, default=20, help="Lloyd iterations for --units (preset default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=list(INPUT_KINDS),
                        help="which probe inputs to train (default: all)")
    args = parser.parse_args(argv)

    run = Path(args.run)
    needed = [run / "tokens" / "tokens.npy", run / "features" / "semantic.npy", run / "data" / "manifest.jsonl",
              run / "checkpoints" / "speech_tokens" / "kmeans.pt"]
    for path in needed:
        if not path.exists():
            raise SystemExit(f"{path} is missing: run notebooks 01, 02 and 05 for {run} first")
    seed_everything(args.seed)
    tokens, semantic = FrameStore(needed[0]), FrameStore(needed[1])
    run_kmeans = S.KMeansUnits.load(needed[3])
    run_units = run_kmeans.n_units
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from token2mel_temperature import manifest_utterances  # notebook 05's table of tokenized utterances

    everyone = [u for u in manifest_utterances(run, tokens) if u["key"] in semantic]
    train = [u for u in everyone if u["split"] == "train"]
    test = [u for u in everyone if u["split"] == "test"]
    if not train or not test:
        raise SystemExit(f"{run} has {len(train)} training and {len(test)} test utterances: need both")
    chosen = np.random.default_rng(args.seed).choice(len(test), size=min(args.test_utterances, len(test)), replace=False)
    test = [test[i] for i in sorted(chosen)]

    started = time.perf_counter()
    pooled = {u["key"]: S.pool_to_unit_rate(semantic[u["key"]]) for u in train + test}
    streams = {u["key"]: np.asarray(tokens[u["key"]]).astype(np.int64) for u in train + test}
    run_ids = {k: v[:, :1] for k, v in streams.items()}
    # (kind, name, sequences by key, what CTCProbe reads)
    inputs: list[tuple[str, str, dict, dict]] = [
        ("frames", "Whisper frames pooled to 25 Hz (before k-means)", pooled, {"feature_dim": int(semantic.dim)}),
        ("units", f"content units ({run_units}, the run's)", run_ids, {"vocab_sizes": [run_units]}),
    ]

    def centroid_frames(kmeans: S.KMeansUnits, units_by_key: dict) -> dict:
        """Each unit replaced by its k-means centroid, back in the frames' scale: the quantised frames."""
        table = (kmeans.centroids * kmeans.std + kmeans.mean).numpy().astype(np.float32)
        return {key: table[ids[:, 0]] for key, ids in units_by_key.items()}

    if "centroids" in args.inputs:
        inputs.append(("centroids", f"centroids of the {run_units} units (quantised frames)",
                       centroid_frames(run_kmeans, run_ids), {"feature_dim": int(semantic.dim)}))
    fitted_counts = args.units if {"fitted", "centroids"} & set(args.inputs) else []
    if fitted_counts:  # one frame sample for every unit count, as notebook 05 draws it
        sample = S.sample_store_frames(semantic, [u["key"] for u in train], args.kmeans_frames, seed=args.seed)
    for k in fitted_counts:
        kmeans = S.KMeansUnits().fit(sample, n_units=k, iters=args.kmeans_iters, seed=args.seed,
                                     max_samples=len(sample))
        ids = {key: kmeans.encode(frames)[:, None] for key, frames in pooled.items()}
        inputs.append(("fitted", f"content units ({k}, fitted here)", ids, {"vocab_sizes": [k]}))
        inputs.append(("centroids", f"centroids of {k} units (fitted here)", centroid_frames(kmeans, ids),
                       {"feature_dim": int(semantic.dim)}))
    inputs.append(("streams", "units + pitch + energy (token2mel's input)", streams,
                   {"vocab_sizes": [run_units, S.PITCH_BINS, S.ENERGY_BINS]}))
    inputs.append(("control", "pitch + energy only (control: no words)", {k: v[:, 1:] for k, v in streams.items()},
                   {"vocab_sizes": [S.PITCH_BINS, S.ENERGY_BINS]}))
    table = []
    for kind_of, name, frames, kind in inputs:
        if kind_of not in args.inputs:
            continue
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        probe = CTCProbe(hidden=args.hidden, **kind)
        result = fit_content_probe(probe, [frames[u["key"]] for u in train], [u["text"] for u in train],
                                   [frames[u["key"]] for u in test], [u["text"] for u in test],
                                   steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                   eval_every=max(1, args.steps // 4), progress=True)
        curve = " -> ".join(f"{v:.2f}" for v in result.history["eval_loss"])
        table.append([name, f"{result.cer:.3f}", f"{result.wer:.3f}", curve, f"{time.perf_counter() - t0:.0f}"])
        print(f"{name}: CER {result.cer:.3f}; e.g. {result.transcripts[0]!r} for {test[0]['text']!r}", flush=True)
    print(f"\n{len(train)} training and {len(test)} held-out utterances of {run}, {args.steps} probe steps of "
          f"{args.batch_size}, {(time.perf_counter() - started) / 60:.1f} min; {machine_line()}")
    print(text_table(["probe input (25 Hz)", "held-out CER", "WER (no LM)", "held-out CTC loss per char",
                      "seconds"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
