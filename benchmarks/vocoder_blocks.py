"""Streaming token2mel + HiFi-GAN: mel chunks vocoded one by one against grouped in blocks.

    OMP_NUM_THREADS=2 python benchmarks/vocoder_blocks.py --run runs/cpu --utterances 5

Notebook 05 streams held-out utterances from their true speech tokens: token2mel emits 24-frame
mel chunks and ``Vocoder.stream`` turns them into audio. Each vocoder call also re-computes its
left and held-back right context (12 + 12 frames by default), so chunk by chunk the vocoder does
about twice the offline work. ``token2wav.vocoder_blocks`` sends the first chunk alone and then
blocks of at least ``--block`` frames. This script measures both on the same utterances (test
split, 3-8 s, seeded choice; the speaker vector is taken from the utterance's own recorded mel,
which changes nothing about the cost), after one warm-up utterance that is not counted:

- RTF: compute seconds / audio seconds (< 1 is faster than real time);
- first audio: seconds until the first piece of audio is ready.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from emo_lib import token2wav as T2W
from emo_lib.report import machine_line, text_table
from emo_lib.store import FrameStore


def pick_keys(run: Path, tokens: FrameStore, count: int, seed: int) -> list[str]:
    """``count + 1`` held-out utterance keys of 3-8 s (the first is the warm-up), a seeded choice."""
    keys = []
    with open(run / "data" / "manifest.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") != "test":
                continue
            for tag in ("q", "r"):
                key = f"{row['pair_id']}_{tag}"
                if key in tokens and 3 * 25 <= len(tokens[key]) <= 8 * 25:
                    keys.append(key)
    if len(keys) < count + 1:
        raise SystemExit(f"the run has {len(keys)} held-out utterances of 3-8 s, fewer than --utterances {count} + 1")
    chosen = np.random.default_rng(seed).choice(len(keys), size=count + 1, replace=False)
    return [keys[i] for i in sorted(chosen)]


def stream(token2mel, vocoder, frames: torch.Tensor, ref: torch.Tensor, noise: torch.Tensor, block: int) -> dict:
    """One streamed utterance; ``block`` 0 = every mel chunk vocoded on its own."""
    out = T2W.stream_speech(token2mel, vocoder, frames[:, 0], frames[:, 1], frames[:, 2], ref, noise=noise,
                            block_frames=block)
    return {"rtf": out.real_time_factor, "first_audio_s": out.first_audio_s, "audio_s": len(out.audio) / T2W.SAMPLE_RATE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/cpu", help="a run directory after notebook 05")
    parser.add_argument("--utterances", type=int, default=5, help="held-out utterances measured (plus one warm-up)")
    parser.add_argument("--block", type=int, default=48, help="vocoder block size in mel frames (the preset's 48)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error(f"--block must be >= 1, got {args.block}")
    run = Path(args.run)
    checkpoint = run / "checkpoints" / "token2mel" / "latest.pt"
    for needed in (checkpoint, run / "tokens" / "tokens.npy", run / "tokens" / "mels.npy"):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run notebook 05 for {run} first")
    torch.manual_seed(args.seed)
    token2mel = T2W.load_token2mel(checkpoint).eval()
    tokens, mels = FrameStore(run / "tokens" / "tokens.npy"), FrameStore(run / "tokens" / "mels.npy")
    vocoder = T2W.Vocoder.from_source("packaged:hifigan-universal", context_frames=12, right_context_frames=12)
    rows = {0: [], args.block: []}
    for i, key in enumerate(pick_keys(run, tokens, args.utterances, args.seed)):
        frames = torch.as_tensor(tokens[key])
        ref = torch.as_tensor(T2W.speaker_vectors({key: np.asarray(mels[key])}, min_frames=10)[key])
        noise = torch.randn(1, 80, T2W.mel_frames_for_units(len(frames)), generator=torch.Generator().manual_seed(i))
        for block in rows:  # both ways on the same utterance, back to back
            result = stream(token2mel, vocoder, frames, ref, noise, block)
            if i > 0:
                rows[block].append(result)
    table = []
    for block, results in rows.items():
        rtf = [r["rtf"] for r in results]
        first = [r["first_audio_s"] for r in results]
        chunk = token2mel.config.chunk_frames
        table.append([f"chunk by chunk ({chunk} frames)" if block == 0 else f"first chunk, then blocks of >= {block}",
                      f"{np.mean(rtf):.2f} / {np.max(rtf):.2f}", f"{np.mean(first):.2f} / {np.max(first):.2f}"])
    ratio = np.mean([r["rtf"] for r in rows[0]]) / np.mean([r["rtf"] for r in rows[args.block]])
    audio = np.mean([r["audio_s"] for r in rows[0]])
    print(machine_line())
    print(f"{args.utterances} held-out utterances of {audio:.1f} s on average, run {run}")
    print(text_table(["vocoder input", "RTF mean / max", "first audio (s) mean / max"], table))
    print(f"blocks are {ratio:.2f}x faster than chunk by chunk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
