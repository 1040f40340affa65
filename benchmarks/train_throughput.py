"""Training-step throughput of stage 1 and stage 2 on a run's real data and models.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --run runs/cpu --steps 5

Stage 1 is built as notebook 04 builds it (the preset's LLM, LoRA, projector and emotion head, on the
run's training examples); stage 2 as notebook 06 builds it (a fresh decoder of the preset's kind, on
the run's stage-2 items, which need notebook 06's ``stage2/states_*.npy``). Each stage does one
warm-up step (not timed: allocations, kernel selection), then ``--steps`` timed optimizer steps
(forward, backward, gradient clipping, AdamW) on fixed, seeded batches of the preset's batch size,
with bfloat16 autocast on CUDA as in ``train.train_loop``. Nothing is saved: checkpoints are untouched.

On CUDA the table adds the achieved model FLOP/s and its fraction of the GPU's dense bf16 peak
(``PEAK_BF16``; "unknown" for GPUs not in that table). Model FLOPs are estimated, not counted:

- stage 1: ``6 x trainable x tokens`` for the trainable parameters (LoRA, projector, emotion head:
  forward 2, weight gradients 2, input gradients 2), plus ``4 x frozen x tokens`` for the frozen
  backbone body (forward 2, input gradients 2: the gradient must flow through it down to the
  lower LoRA layers and the projector, but no weight gradients are formed), plus
  ``4 x vocab x hidden x reply tokens`` for the frozen output projection, which only reply
  positions use. Tokens are all positions of the spliced sequences (prompt, speech frames at 10 Hz,
  reply), padding excluded. Embedding lookups and attention-score FLOPs are left out (short sequences).
- stage 2: ``6 x decoder parameters x frames`` (every parameter trains; frames are the 25 Hz
  speech-token frames, the decoder's sequence), an overestimate for the token-level parts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from emo_lib.report import machine_line, text_table

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' data sheets (SXM parts; sparsity not counted).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named like ``NVIDIA H100 80GB HBM3``; None when not in ``PEAK_BF16``.

    The name is split into words at spaces and dashes and a word must equal a table key, so
    ``A100-SXM4-80GB`` is an A100 while ``A10G`` or ``L40`` stay unknown rather than guessed.
    """
    words = device_name.upper().replace("-", " ").split()
    for key, flops in PEAK_BF16.items():
        if key in words:
            return flops
    return None


def stage1_flops(trainable: int, frozen_body: int, head_params: int, tokens: int, reply_tokens: int) -> float:
    """Estimated FLOPs of one stage-1 training step (see the module docstring)."""
    return 6.0 * trainable * tokens + 4.0 * frozen_body * tokens + 4.0 * head_params * reply_tokens


def stage2_flops(parameters: int, frames: int) -> float:
    """Estimated FLOPs of one stage-2 training step: 6 x parameters x frames."""
    return 6.0 * parameters * frames


def time_steps(step: Callable[[int], None], steps: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``step(i)`` ``warmup + steps`` times; the seconds of each of the last ``steps`` calls.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock reading, so queued GPU work
    is counted in the step that queued it.
    """
    sync = sync or (lambda: None)
    for i in range(warmup):
        step(i)
    sync()
    seconds = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(i)
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def throughput_row(stage: str, batch_size: int, seconds: list[float], tokens_per_step: float,
                   flops_per_step: float | None = None, peak: float | None = None) -> dict:
    """One table row: seconds per step, samples/s, tokens/s; TFLOP/s and peak fraction when known."""
    per_step = float(np.mean(seconds))
    row = {"stage": stage, "batch": batch_size, "steps": len(seconds), "s/step": per_step,
           "samples/s": batch_size / per_step, "tokens/s": tokens_per_step / per_step}
    if flops_per_step is not None:
        row["TFLOP/s"] = flops_per_step / per_step / 1e12
        row["of peak"] = (flops_per_step / per_step / peak) if peak else None
    return row


def format_rows(rows: list[dict]) -> str:
    """The throughput table, and the ratio of each stage's samples/s to the first stage's."""
    keys = ["stage", "batch", "steps", "s/step", "samples/s", "tokens/s"]
    if any("TFLOP/s" in r for r in rows):
        keys += ["TFLOP/s", "of peak"]

    def show(key, value):
        if value is None:
            return "unknown" if key == "of peak" else ""
        if key == "of peak":
            return f"{100 * value:.1f} %"
        if isinstance(value, float):
            return f"{value:.3f}" if key == "s/step" else f"{value:,.1f}"
        return str(value)

    table = text_table(keys, [[show(k, r.get(k)) for k in keys] for r in rows])
    if len(rows) > 1:
        base = rows[0]
        ratios = [f"{r['stage']} / {base['stage']} samples/s = {r['samples/s'] / base['samples/s']:.2f}" for r in rows[1:]]
        table += "\n" + "\n".join(ratios)
    return table


def fixed_batches(n_items: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` seeded batches of item indices (without replacement inside a batch)."""
    if n_items < batch_size:
        raise ValueError(f"{n_items} training items are fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n_items, size=batch_size, replace=False).tolist()) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------
def stage1_step_fn(model, examples, batches, lr: float, clip_norm: float, device: str):
    """A ``step(i)`` doing one optimizer step of ``model`` on ``batches[i]`` (AdamW, clipping, bf16 on CUDA)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    use_bf16 = str(device).startswith("cuda")
    model.train()

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model([examples[k] for k in batches[i]])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()

    return step


def stage1_counts(model, examples, batches) -> tuple[list[int], list[int], dict]:
    """Tokens and reply tokens of each batch (padding excluded) and the parameter counts of the estimate."""
    import torch

    tokens, replies = [], []
    with torch.no_grad():
        for idx in batches:
            batch = model.splice([examples[k] for k in idx])
            tokens.append(int(batch.attention_mask.sum()))
            replies.append(int((batch.labels != -100).sum()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embeddings = model.llm.get_input_embeddings().weight
    output = model.llm.get_output_embeddings().weight  # the same tensor when tied (SmolLM2), not for Qwen2.5-7B
    skip = {id(embeddings), id(output)}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in skip)
    head = output.numel()
    return tokens, replies, {"trainable": trainable, "frozen_body": frozen, "head": head}


def measure_stage1(model, examples, batch_size: int, steps: int, seed: int = 0, lr: float = 1e-4,
                   clip_norm: float = 1.0, device: str = "cpu", peak: float | None = None) -> dict:
    """Throughput row of stage 1 (``steps`` timed steps after one warm-up step)."""
    import torch

    batches = fixed_batches(len(examples), batch_size, steps + 1, seed)
    tokens, replies, counts = stage1_counts(model, examples, batches)
    torch.manual_seed(seed)
    step = stage1_step_fn(model, examples, batches, lr, clip_norm, device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    seconds = time_steps(step, steps, warmup=1, sync=sync)
    flops = None
    if str(device).startswith("cuda"):
        flops = float(np.mean([stage1_flops(counts["trainable"], counts["frozen_body"], counts["head"], t, r)
                               for t, r in zip(tokens[1:], replies[1:])]))
    return throughput_row("stage 1", batch_size, seconds, float(np.mean(tokens[1:])), flops, peak)


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------
def measure_stage2(model, items, loss_fn, batch_size: int, steps: int, seed: int = 0, lr: float = 3e-4,
                   clip_norm: float = 1.0, device: str = "cpu", peak: float | None = None) -> dict:
    """Throughput row of stage 2: ``loss_fn(model, batch_items, step)`` as ``decoder.make_loss_fn`` returns it."""
    import torch

    batches = fixed_batches(len(items), batch_size, steps + 1, seed)
    frames = [sum(int(np.sum(items[k]["durations"])) for k in idx) for idx in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    use_bf16 = str(device).startswith("cuda")
    model.train()
    torch.manual_seed(seed)

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(model, [items[k] for k in batches[i]], step=i)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()

    sync = torch.cuda.synchronize if use_bf16 else None
    seconds = time_steps(step, steps, warmup=1, sync=sync)
    flops = None
    if use_bf16:
        n_params = sum(p.numel() for p in params)
        flops = float(np.mean([stage2_flops(n_params, f) for f in frames[1:]]))
    return throughput_row("stage 2", batch_size, seconds, float(np.mean(frames[1:])), flops, peak)


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------
def open_run(run_path: str, preset: str | None):
    """The run directory and its preset (``--preset``, else metrics.json's ``run.preset``, else the folder name)."""
    from emo_lib.paths import RunDir, read_json
    from emo_lib.presets import load_preset

    path = Path(run_path).resolve()
    if not path.is_dir():
        raise SystemExit(f"no run folder at {path}; make one with python -m emo_lib.run --preset <preset>")
    run = RunDir(path.name, root=path.parent)
    if preset is None:
        facts = read_json(run.metrics_json).get("run", {}) if run.metrics_json.exists() else {}
        preset = facts.get("preset") or path.name
    return run, load_preset(preset)


def build_stage1(run, cfg, device):
    from emo_lib import data, llm
    from emo_lib.pretrained import load_llm

    rows = data.load_manifest(run)
    backbone, tokenizer = load_llm(cfg["models"]["llm"])
    examples, _ = llm.load_stage1_examples(run, rows, tokenizer, ("train",))
    if not examples:
        raise SystemExit(f"run {run.name} has no stage-1 training examples; run notebooks 01-03 first")
    model = llm.build_speech_llm(llm.config_from_preset(cfg, examples[0].semantic.shape[1], examples[0].emotion.shape[1]),
                                 backbone, tokenizer).to(device)
    model.set_target_stats(examples)
    return model, examples


def build_stage2(run, cfg, device):
    import torch

    from emo_lib import data, pipeline
    from emo_lib import decoder as D
    from emo_lib.store import FrameStore

    s2 = cfg["stage2"]
    rows = data.load_manifest(run)
    voices = pipeline.run_voices(run, ("train",), cfg["token2mel"]["reference_min_s"])
    items, _ = D.load_stage2_items(run, rows, ("train",), s2["max_frames"], voices)
    if not items:
        raise SystemExit(f"run {run.name} has no stage-2 training items; run notebook 06 first")
    meta = FrameStore(run.require(run.root / "tokens" / "tokens.npy", "speech_tokens")).index["meta"]
    torch.manual_seed(cfg["seed"])
    hidden_dim, emotion_dim = items[0]["hidden"].shape[1], items[0]["emotion_gt"].shape[1]
    if hasattr(D, "build_decoder"):
        model = D.build_decoder(s2.get("decoder", "durations"), cfg, hidden_dim, emotion_dim, meta)
    else:  # the decoder module before registered decoder kinds
        model = D.SpeechDecoder(D.Stage2Config(hidden_dim=hidden_dim, emotion_dim=emotion_dim, dim=s2["dim"],
                                               layers=s2["layers"], heads=s2["heads"], n_units=meta["n_units"],
                                               pitch_bins=meta["pitch_bins"], energy_bins=meta["energy_bins"],
                                               max_frames=s2["max_frames"], lookahead_tokens=s2["lookahead_tokens"],
                                               fusion=s2["fusion"], adaln=s2["adaln"]))
    model = model.to(device)
    model.set_emotion_stats(np.concatenate([x["emotion_gt"] for x in items]))
    schedule = D.schedule_from_preset(s2) if hasattr(D, "schedule_from_preset") else None
    return model, items, D.make_loss_fn(s2["steps"], schedule)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder, e.g. runs/cpu")
    parser.add_argument("--preset", default=None, help="preset of the run (default: from its metrics.json)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per stage (after one warm-up step)")
    parser.add_argument("--stage", choices=("1", "2", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's batch size per stage")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    import torch

    from emo_lib.session import seed_everything

    run, cfg = open_run(args.run, args.preset)
    seed_everything(cfg["seed"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_bf16(torch.cuda.get_device_name(0)) if device.startswith("cuda") else None
    print(machine_line())
    print(f"run {run.root} | preset {cfg.name} | device {device} | torch threads {torch.get_num_threads()}")
    rows = []
    if args.stage in ("1", "both"):
        model, examples = build_stage1(run, cfg, device)
        bs = args.batch_size or cfg["stage1"]["batch_size"]
        rows.append(measure_stage1(model, examples, bs, args.steps, cfg["seed"], cfg["stage1"]["lr_lora"],
                                   cfg["stage1"]["clip_norm"], device, peak))
        del model, examples
    if args.stage in ("2", "both"):
        model, items, loss_fn = build_stage2(run, cfg, device)
        bs = args.batch_size or cfg["stage2"]["batch_size"]
        from emo_lib.train import DEFAULT_LOOP

        rows.append(measure_stage2(model, items, loss_fn, bs, args.steps, cfg["seed"], cfg["stage2"]["lr"],
                                   DEFAULT_LOOP["clip_norm"], device, peak))  # notebook 06 keeps the loop's clip_norm
    print(format_rows(rows))
    print("tokens/s: spliced stage-1 positions (prompt + 10 Hz speech + reply) or stage-2 25 Hz frames; "
          "FLOPs are estimates (see --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
