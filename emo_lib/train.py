"""Checkpoints: atomic saves, loads with errors that say what to do, and "latest" resolution.

A checkpoint is one ``torch.save``d dict (config, state dict, history ...). Saves go through
``paths.atomic_path``, so an interrupted save never leaves a half-written file under the real
name. Loads use ``weights_only=True``: a checkpoint holds tensors and plain Python values only,
and loading one never runs code from the file. Stage-1 training extends this module later.
"""
from __future__ import annotations

from pathlib import Path

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
