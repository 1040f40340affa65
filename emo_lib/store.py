"""A frame store: many variable-length (T_i, D) arrays in one file, read back lazily.

Per-utterance features (Whisper frames, emotion frames) are saved as one float16 matrix of all
frames stacked, plus a JSON index of each key's (offset, length). Reading memory-maps the matrix,
so a notebook can open a store of hundreds of megabytes instantly and copy only what it uses.
Both files are written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .paths import atomic_path, write_json_atomic


class FrameStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path.with_suffix(".json")
        if not self.path.exists() or not index_file.exists():
            raise FileNotFoundError(f"frame store {self.path} (or its index {index_file.name}) is missing")
        self.index = json.loads(index_file.read_text())
        self.frames = np.load(self.path, mmap_mode="r")

    @property
    def dim(self) -> int:
        return int(self.frames.shape[1])

    def __contains__(self, key: str) -> bool:
        return key in self.index["items"]

    def __len__(self) -> int:
        return len(self.index["items"])

    def keys(self) -> list[str]:
        return list(self.index["items"])

    def __getitem__(self, key: str) -> np.ndarray:
        offset, length = self.index["items"][key]
        return np.asarray(self.frames[offset : offset + length], dtype=np.float32)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.index["items"]:
            yield key, self[key]


def write_frame_store(path: str | Path, items: Iterable[tuple[str, np.ndarray]], meta: dict | None = None) -> Path:
    """Stack ``(key, frames)`` pairs into ``path`` (.npy) and ``path.with_suffix('.json')``."""
    path = Path(path)
    keys, arrays, offset, index = [], [], 0, {}
    for key, frames in items:
        frames = np.asarray(frames, dtype=np.float16)
        if frames.ndim != 2:
            raise ValueError(f"frames of {key} must be 2-D (T, D), got shape {frames.shape}")
        if arrays and frames.shape[1] != arrays[0].shape[1]:
            raise ValueError(f"{key} has width {frames.shape[1]}, the store has {arrays[0].shape[1]}")
        index[key] = (offset, int(frames.shape[0]))
        offset += frames.shape[0]
        keys.append(key)
        arrays.append(frames)
    if not arrays:
        raise ValueError("nothing to store")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(arrays, axis=0))
    write_json_atomic(path.with_suffix(".json"), {"meta": meta or {}, "items": index})
    return path
