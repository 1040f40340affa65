"""Checkpoints: atomic saves, loads with errors that say what to do, and "latest" resolution.

A checkpoint is one ``torch.save``d dict (config, state dict, history ...). Saves go through
``paths.atomic_path``, so an interrupted save never leaves a half-written file under the real
name. Loads use ``weights_only=True``: a checkpoint holds tensors and plain Python values only,
and loading one never runs code from the file. Stage-1 training extends this module later.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .paths import MissingInputError, atomic_path

LATEST_NAME = "latest.pt"


class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be used (corrupt, truncated, wrong content)."""


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically: the file appears whole or not at all."""
    import torch

    if not isinstance(payload, dict):
        raise TypeError(f"a checkpoint payload must be a dict, got {type(payload).__name__}")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, producer_notebook: str) -> dict:
    """Read a checkpoint written by ``save_checkpoint``.

    A missing file raises ``MissingInputError`` naming ``producer_notebook`` (the notebook that
    makes it); an unreadable one raises ``CheckpointError`` saying to run that notebook again.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise MissingInputError(
            f"Missing checkpoint {path}: it is made by {producer_notebook}. Run that notebook "
            "with the same preset first."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several error types for truncated or foreign files
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or not a kit checkpoint ({type(err).__name__}: {err}). "
            f"Delete it and run {producer_notebook} again to remake it."
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(payload).__name__}, not a dict; run {producer_notebook} again."
        )
    return payload


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint to resume from: ``latest.pt`` if present, else the newest ``*.pt`` by mtime.

    Step numbers in file names are never parsed: names are for people, and "step_900" vs
    "step_1000" sorts wrongly as text. Hidden files (``atomic_path`` temporaries) are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / LATEST_NAME).is_file():
        return folder / LATEST_NAME
    candidates = [p for p in folder.glob("*.pt") if p.is_file() and not p.name.startswith(".")]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))


# ---------------------------------------------------------------------------------------------
# A training loop shared by stage 1 and stage 2
# ---------------------------------------------------------------------------------------------
DEFAULT_LOOP = {
    "steps": 100,  # optimizer steps
    "batch_size": 8,  # examples per micro-batch
    "accumulation": 1,  # micro-batches per optimizer step
    "lr": {"lora": 2e-4, "adapters": 1e-3},  # per parameter group
    "weight_decay": {"lora": 0.0, "adapters": 0.01},
    "warmup_steps": 10,
    "min_lr_fraction": 0.1,  # cosine decay ends at this fraction of each group's lr
    "clip_norm": 1.0,
    "eval_every": 50,  # steps between held-out evaluations (and at the end)
    "checkpoint_every": 50,  # steps between checkpoints (and at the end)
    "seed": 0,
    "bf16": True,  # autocast to bfloat16 on CUDA
    "cpu_bf16": False,  # also autocast to bfloat16 on a CPU, where it computes bfloat16 natively (AMX, AVX512-BF16)
}


def loop_config(cfg: dict | None) -> dict:
    merged = {**DEFAULT_LOOP, **(cfg or {})}
    unknown = set(merged) - set(DEFAULT_LOOP)
    if unknown:
        raise ValueError(f"unknown training keys {sorted(unknown)}; valid: {sorted(DEFAULT_LOOP)}")
    return merged


def autocast_settings(cfg: dict, device) -> tuple[bool, str]:
    """(use bfloat16 autocast?, autocast device type) for a loop config on ``device``.

    On CUDA ``bf16`` decides. On a CPU ``cpu_bf16`` asks for it, and it is used only where the CPU
    computes bfloat16 natively (``token2wav.native_bfloat16``: AMX or AVX512-BF16); elsewhere it
    would be emulated and slower than float32, so training stays in float32. Either way the
    weights, the gradients and the optimizer state stay float32: autocast only runs the matrix
    products in bfloat16.
    """
    kind = str(device).split(":")[0]
    if kind == "cuda":
        return bool(cfg["bf16"]), "cuda"
    if kind == "cpu" and cfg.get("cpu_bf16"):
        from .token2wav import native_bfloat16

        return native_bfloat16("cpu"), "cpu"
    return False, "cpu"


def train_precision(cfg: dict | None, device) -> str:
    """The precision a loop config trains in on ``device``: "bfloat16" (autocast) or "float32".

    The name notebooks and arm caches record, so a result says how it was trained.
    """
    return "bfloat16" if autocast_settings(loop_config(cfg), device)[0] else "float32"


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch, a pure function of (seed, epoch): resuming replays it exactly.

    Shuffled, then sorted by length inside windows of 32 batches (so a batch wastes little on
    padding), then the batches themselves shuffled. A last incomplete batch is dropped.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def _micro_batch(lengths: list[int], cfg: dict, index: int, cache: dict) -> list[int]:
    per_epoch = max(1, len(lengths) // cfg["batch_size"])
    epoch, k = divmod(index, per_epoch)
    if cache.get("epoch") != epoch:
        cache.update(epoch=epoch, batches=batch_order(lengths, cfg["batch_size"], cfg["seed"], epoch))
    return cache["batches"][k]


def _lr_factor(step: int, cfg: dict) -> float:
    import math

    warmup, total = cfg["warmup_steps"], cfg["steps"]
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg["min_lr_fraction"] + (1 - cfg["min_lr_fraction"]) * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(model, groups: dict, items: list, loss_fn, cfg: dict, checkpoint_dir=None, eval_fn=None,
               payload_fn=None, check_resume=None, lengths: list[int] | None = None, progress: bool = True,
               stop_after: int | None = None, device: str = "cpu") -> dict:
    """Train ``model`` on ``items`` with AdamW; returns the history (per-step losses, evaluations).

    - ``groups``: name -> parameters; each group has its own learning rate and weight decay
      (``cfg['lr'][name]``, ``cfg['weight_decay'][name]``): LoRA and the new modules learn at
      different speeds.
    - ``loss_fn(model, batch_items) -> dict`` of scalar tensors with a ``loss`` key (the others,
      e.g. ``ce`` and ``mse``, are logged separately). A ``loss_fn`` with a ``step`` parameter is
      also told the optimizer step (0-based), for schedules and reproducible random crops.
    - Linear warmup then cosine decay; gradients clipped to ``clip_norm``; ``accumulation``
      micro-batches per step; bfloat16 autocast on CUDA.
    - Before the first step and every ``eval_every`` steps ``eval_fn(model) -> dict`` is logged; every ``checkpoint_every``
      steps (and at the end) ``payload_fn(model)`` plus the optimizer, the step, the RNG state and
      the history are saved atomically to ``checkpoint_dir/latest.pt``.
    - Resume: if ``checkpoint_dir`` holds a checkpoint, ``check_resume(payload, path)`` may refuse
      it (e.g. another LoRA rank); otherwise training continues at its step with the same batch
      order and dropout RNG, so the next loss equals an uninterrupted run's.
    - ``stop_after`` ends the loop early after that many steps in total (a simulated interruption).
    """
    import inspect
    import time

    import torch
    from tqdm.auto import tqdm

    cfg = loop_config(cfg)
    lengths = lengths if lengths is not None else [1] * len(items)
    if len(items) < cfg["batch_size"]:
        raise ValueError(f"{len(items)} training examples are fewer than one batch of {cfg['batch_size']}")
    param_groups = []
    for name, params in groups.items():
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        if name not in cfg["lr"]:
            raise ValueError(f"no learning rate for parameter group '{name}' (cfg['lr'] has {sorted(cfg['lr'])})")
        param_groups.append({"params": params, "lr": cfg["lr"][name], "weight_decay": cfg["weight_decay"].get(name, 0.0),
                             "name": name, "base_lr": cfg["lr"][name]})
    optimizer = torch.optim.AdamW(param_groups)
    history = {"step": [], "lr": [], "seconds": [], "eval": []}
    step = 0
    path = Path(checkpoint_dir) / LATEST_NAME if checkpoint_dir is not None else None
    if path is not None and path.exists():
        payload = load_checkpoint(path, "the notebook that trains this stage")
        if check_resume is not None:
            check_resume(payload, path)
        if "optimizer" not in payload or "step" not in payload:
            raise CheckpointError(f"{path} holds no optimizer state to resume from; delete it to start fresh")
        model.load_trainable_state(payload["state"])
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        step, history = int(payload["step"]), payload["history"]
        if progress:
            print(f"resumed from {path} at step {step}")
    use_bf16, autocast_device = autocast_settings(cfg, device)
    takes_step = "step" in inspect.signature(loss_fn).parameters
    cache: dict = {}
    started = time.perf_counter() - (history["seconds"][-1] if history["seconds"] else 0.0)

    def save():
        if path is None or payload_fn is None:
            return
        payload = payload_fn(model)
        payload.update(optimizer=optimizer.state_dict(), step=step, torch_rng=torch.get_rng_state(),
                       history=history, loop_config=cfg)
        save_checkpoint(path, payload)

    def evaluate():
        if eval_fn is None:
            return
        model.eval()
        result = {"step": step, **eval_fn(model)}
        model.train()
        history["eval"].append(result)
        if progress:
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))

    if step == 0:
        evaluate()  # the untrained model's held-out numbers: the reference every later evaluation is read against
    model.train()
    end = cfg["steps"] if stop_after is None else min(cfg["steps"], stop_after)
    bar = tqdm(total=cfg["steps"], initial=step, desc="training", unit="step", disable=not progress)
    while step < end:
        factor = _lr_factor(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        logged: dict = {}
        for j in range(cfg["accumulation"]):
            idx = _micro_batch(lengths, cfg, step * cfg["accumulation"] + j, cache)
            with torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=use_bf16):
                batch = [items[i] for i in idx]
                terms = loss_fn(model, batch, step=step) if takes_step else loss_fn(model, batch)
            (terms["loss"] / cfg["accumulation"]).backward()
            for k, v in terms.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    logged[k] = logged.get(k, 0.0) + float(v.detach()) / cfg["accumulation"]
        torch.nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], cfg["clip_norm"])
        optimizer.step()
        step += 1
        history["step"].append(step)
        history["lr"].append(factor)
        history["seconds"].append(time.perf_counter() - started)
        for k, v in logged.items():
            history.setdefault(k, []).append(v)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items()})
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            evaluate()
        if step % cfg["checkpoint_every"] == 0 or step == end:
            save()
    bar.close()
    model.eval()
    return history
