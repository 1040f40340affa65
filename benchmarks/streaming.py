"""First-audio latency and real-time factor of the streaming system (emo_lib.pipeline.EmotionOmni).

    OMP_NUM_THREADS=2 python benchmarks/streaming.py --run runs/cpu --replies 5
    OMP_NUM_THREADS=2 python benchmarks/streaming.py --run runs/cpu --no-offline --block-frames 48 96
    OMP_NUM_THREADS=2 python benchmarks/streaming.py --run runs/cpu --no-offline --vocoder-precision float32 bfloat16

Loads a run's trained system as notebook 07 does (``EmotionOmni.from_run``: stage 1, the stage-2
decoder, token2mel, HiFi-GAN, Whisper's encoder and the emotion encoder), then answers ``--replies``
recorded held-out queries (test split, seeded choice) with ``respond`` (streamed) and, unless
``--no-offline``, ``respond_offline`` (the same reply, all audio at the end). One extra query is
answered first and not counted (warm-up: lazy initialisation, first-call allocations).

- first audio: compute seconds from the call until the first piece of reply audio is ready;
- RTF: compute seconds / seconds of reply audio (< 1 is faster than real time);
- stalls: seconds of silence after the first audio while a late piece is awaited
  (``pipeline.playback_stalls``);
- ``--block-frames``: one or more values of ``synthesis.vocoder_block_frames`` (mel frames per vocoder
  call after the first chunk), each measured on the same queries: bigger blocks re-run less vocoder
  context (cheaper), but the second piece of audio comes later (stalls).
- ``--vocoder-precision``: one or more of float32, bfloat16, auto (``synthesis.vocoder_precision``), each
  measured on the same queries (with every ``--block-frames`` value);
- ``--unmerged-lora``: keep stage 1's LoRA factors apart from the backbone's weights, as before
  ``SpeechLLM.merge_lora`` (to measure what merging saves);
- offline / first audio: how much sooner the streamed reply starts than an offline one would;
- ``--breakdown``: where the compute goes, per stage (query encoders, LLM tokens, stage-2 decoder,
  token2mel, HiFi-GAN), as seconds per second of reply audio: the stages' RTF shares.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from emo_lib.report import machine_line, text_table


def pick_queries(rows: list[dict], count: int, seed: int) -> list[dict]:
    """``count + 1`` kept test-split queries (the first is the warm-up), a seeded choice in manifest order."""
    held_out = [r for r in rows if r.get("kept", True) and r.get("split") == "test" and r.get("query_wav")]
    if len(held_out) < count + 1:
        raise SystemExit(f"the run has {len(held_out)} held-out queries, fewer than --replies {count} + 1 warm-up")
    chosen = np.random.default_rng(seed).choice(len(held_out), size=count + 1, replace=False)
    return [held_out[i] for i in sorted(chosen)]


def stream_once(omni, wav: np.ndarray, sr: int) -> dict:
    """One streamed reply: its "done" event's first_audio_s, seconds, audio_s, rtf, stall_s, text."""
    done = None
    for event in omni.respond(wav, sr):
        done = event
    return {"first_audio_s": done["first_audio_s"], "seconds": done["seconds"], "audio_s": done["audio_s"],
            "rtf": done["rtf"], "stall_s": done.get("stall_s"), "text": done["text"]}


def offline_once(omni, wav: np.ndarray, sr: int) -> float:
    """Compute seconds of the same reply without streaming (all audio arrives at the end)."""
    return float(omni.respond_offline(wav, sr)["seconds"])


STAGES = {  # stage name -> (object path in the pipeline module or on omni, method names)
    "query encoders (Whisper + emotion)": ("omni", ("listen",)),
    "stage 1: LLM tokens + emotion head": ("omni.stage1", ("stream_reply",)),
    "stage 2: speech decoder": ("StreamingDecoder", ("push", "finish")),
    "token2mel (flow matching)": ("IncrementalToken2Mel", ("push", "finish")),
    "HiFi-GAN vocoder": ("IncrementalVocoder", ("push", "finish")),
}


def install_stage_timers(omni, pipeline_module) -> dict[str, float]:
    """Wrap each stage's entry points with a wall-clock timer; returns the dict the timers add to.

    The stages do not call each other (the pipeline's event loop calls each in turn), so their times
    add up to about the reply's compute time; a generator (stage 1) is timed inside each ``next``.
    """
    import functools
    import inspect
    import time

    totals = {name: 0.0 for name in STAGES}

    def timed(function, name):
        if inspect.isgeneratorfunction(function):
            @functools.wraps(function)
            def generator(*args, **kwargs):
                inner = function(*args, **kwargs)
                while True:
                    t0 = time.perf_counter()
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                    finally:
                        totals[name] += time.perf_counter() - t0
                    yield item
            return generator

        @functools.wraps(function)
        def plain(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t0
        return plain

    for name, (where, methods) in STAGES.items():
        for method in methods:
            if where.startswith("omni"):
                owner = omni.stage1 if where == "omni.stage1" else omni
                setattr(owner, method, timed(getattr(owner, method), name))  # this instance only
            else:
                cls = getattr(pipeline_module, where)
                setattr(cls, method, timed(getattr(cls, method), name))
    return totals


def summarize(records: list[dict]) -> dict:
    """Mean and max of first audio, RTF, reply seconds (and offline seconds) over the spoken replies."""
    spoken = [r for r in records if r["audio_s"] > 0 and r["first_audio_s"] is not None]
    out = {"replies": len(records), "spoken": len(spoken)}
    for key in ("first_audio_s", "rtf", "stall_s", "audio_s", "offline_s"):
        values = [r[key] for r in spoken if r.get(key) is not None]
        if values:
            out[f"{key}_mean"], out[f"{key}_max"] = float(np.mean(values)), float(np.max(values))
    if "offline_s_mean" in out and out.get("first_audio_s_mean"):
        out["offline_over_first_audio"] = out["offline_s_mean"] / out["first_audio_s_mean"]
    return out


def format_report(records: list[dict], summary: dict) -> str:
    """Per-reply rows, then mean and max rows, then the offline / first-audio ratio."""
    with_offline = any(r.get("offline_s") is not None for r in records)
    header = ["reply", "reply audio (s)", "first audio (s)", "compute (s)", "RTF", "stalls (s)"] + (
        ["offline (s)"] if with_offline else [])

    def f(value, spec=".2f"):
        return "" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)

    rows = []
    for i, r in enumerate(records):
        row = [str(i + 1), f(r["audio_s"]), f(r["first_audio_s"]), f(r["seconds"]), f(r["rtf"]), f(r.get("stall_s"))]
        rows.append(row + ([f(r.get("offline_s"))] if with_offline else []))
    for stat in ("mean", "max"):
        row = [stat, f(summary.get(f"audio_s_{stat}")), f(summary.get(f"first_audio_s_{stat}")), "",
               f(summary.get(f"rtf_{stat}")), f(summary.get(f"stall_s_{stat}"))]
        rows.append(row + ([f(summary.get(f"offline_s_{stat}"))] if with_offline else []))
    text = text_table(header, rows)
    text += f"\nspoken replies: {summary['spoken']} of {summary['replies']}"
    if "offline_over_first_audio" in summary:
        text += f"; offline reply time / streamed first audio = {summary['offline_over_first_audio']:.1f}x"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder with notebooks 02-06's checkpoints, e.g. runs/cpu")
    parser.add_argument("--preset", default=None, help="preset of the run (default: from its metrics.json)")
    parser.add_argument("--replies", type=int, default=5, help="held-out queries answered and counted")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline (non-streamed) comparison")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--block-frames", type=int, nargs="+", default=None,
                        help="synthesis.vocoder_block_frames values to compare (default: the preset's)")
    parser.add_argument("--vocoder-precision", nargs="+", default=None, choices=["float32", "bfloat16", "auto"],
                        help="synthesis.vocoder_precision values to compare (default: the preset's)")
    parser.add_argument("--unmerged-lora", action="store_true",
                        help="run stage 1 with its LoRA factors unmerged (the speed before SpeechLLM.merge_lora)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time each stage of the streamed replies (seconds per second of reply audio)")
    args = parser.parse_args(argv)

    import torch

    from emo_lib import data, pipeline
    from emo_lib.audio import load_audio
    from emo_lib.session import seed_everything

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import open_run  # the same run/preset resolution

    run, cfg = open_run(args.run, args.preset)
    seed_everything(cfg["seed"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(machine_line())
    print(f"run {run.root} | preset {cfg.name} | device {device} | torch threads {torch.get_num_threads()}")
    omni = pipeline.EmotionOmni.from_run(run, cfg, device)
    if args.unmerged_lora:
        omni.stage1.unmerge_lora()
    print(f"stage-1 LoRA {'merged into the weights' if omni.stage1.lora_merged else 'unmerged (factors apart)'}")
    queries = pick_queries(data.load_manifest(run), args.replies, cfg["seed"])
    totals = install_stage_timers(omni, pipeline) if args.breakdown else None
    settings = [(b, p) for p in (args.vocoder_precision or [omni.vocoder.requested_precision])
                for b in (args.block_frames or [omni.vocoder_block_frames])]
    for block_frames, precision in settings:
        omni.vocoder_block_frames = int(block_frames)
        omni.vocoder.to(device, precision=precision)
        records = []
        counted = {name: 0.0 for name in STAGES}
        for k, row in enumerate(queries):
            wav, sr = load_audio(run.root / row["query_wav"])
            before = dict(totals) if totals is not None else None
            record = stream_once(omni, wav, sr)
            if totals is not None and k > 0:
                for name in STAGES:
                    counted[name] += totals[name] - before[name]
            if not args.no_offline:
                record["offline_s"] = offline_once(omni, wav, sr)
            if k > 0:  # the first reply is the warm-up
                records.append(record)
        print(f"\nvocoder blocks of >= {block_frames} mel frames after the first chunk, vocoder in "
              f"{omni.vocoder.precision} (asked: {precision})")
        print(format_report(records, summarize(records)))
        if totals is not None:
            audio_s = sum(r["audio_s"] for r in records)
            compute_s = sum(r["seconds"] for r in records)
            rows = [[name, f"{seconds:.2f}", f"{seconds / audio_s:.3f}" if audio_s else "",
                     f"{seconds / compute_s:.0%}" if compute_s else ""] for name, seconds in counted.items()]
            rows.append(["all stages (timed) / the replies' compute", f"{sum(counted.values()):.2f} / {compute_s:.2f}",
                         f"{sum(counted.values()) / audio_s:.3f}" if audio_s else "", ""])
            print(f"\nwhere the streamed replies' compute goes ({audio_s:.1f} s of reply audio)")
            print(text_table(["stage", "seconds", "seconds per audio second (RTF share)", "share"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
