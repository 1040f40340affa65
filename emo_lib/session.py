"""What every notebook does first: load the preset, seed everything, open the run directory."""
from __future__ import annotations

import os
import platform
import random
from importlib import metadata

import numpy as np

from .paths import RunDir
from .presets import Preset, load_preset

LIBRARIES = ("torch", "torchaudio", "transformers", "peft", "tslearn", "numpy", "papermill", "soundfile")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels where it has them."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(cfg: dict) -> str:
    import torch

    wanted = cfg.get("device", "auto")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("preset asks for device 'cuda' but no CUDA GPU is visible; use device: auto or cpu")
    return wanted


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def start_notebook(preset: str, overrides: dict | None = None, run_name: str = "", quiet: bool = False) -> tuple[Preset, RunDir]:
    """Load and validate the preset, seed, create ``runs/<run_name or preset>/`` and print the setting."""
    import torch

    cfg = load_preset(preset, overrides)
    seed_everything(cfg["seed"])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    run = RunDir(run_name or cfg.name).make()
    cfg["device_resolved"] = pick_device(cfg)
    if not quiet:
        v = library_versions()
        print(f"preset {cfg.name} | run dir {run.root} | device {cfg['device_resolved']} | seed {cfg['seed']}")
        print(" | ".join(f"{k} {val}" for k, val in v.items()))
    return cfg, run
