"""The run directory: the contract between notebooks.

Everything a run makes lives under ``runs/<preset>/``. Notebooks never pass state through the
kernel: each one reads its inputs from here and writes its outputs here. Writes are atomic
(temporary file in the same folder, then ``os.replace``) so an interrupted run never leaves a
half-written manifest, cache or checkpoint behind.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent

# Which notebook makes which input: used in "missing input" errors.
PRODUCERS = {
    "env": "00_tour.ipynb",
    "manifest": "01_data.ipynb",
    "emotion_frames": "02_features.ipynb",
    "semantic_frames": "02_features.ipynb",
    "emotion_encoder": "02_features.ipynb",
    "trajectories": "03_align.ipynb",
    "stage1": "04_stage1.ipynb",
    "judge": "04_stage1.ipynb",
    "speech_tokens": "05_tokens.ipynb",
    "token2mel": "05_tokens.ipynb",
    "stage2_states": "06_stage2.ipynb",
    "stage2": "06_stage2.ipynb",
}


class MissingInputError(FileNotFoundError):
    """An input that an earlier notebook makes is not in the run directory."""


def find_repo_root(start: Path | None = None) -> Path:
    """The kit's root folder (the one holding ``emo_lib/``), searched upward from ``start``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "emo_lib" / "presets.yaml").exists():
            return folder
    return REPO_ROOT


class RunDir:
    """Paths of one run: ``runs/<name>/``."""

    def __init__(self, name: str, root: str | Path | None = None):
        default = os.environ.get("EMO_KIT_RUNS") or find_repo_root() / "runs"
        base = Path(root) if root is not None else Path(default)
        self.root = (base / name).resolve()
        self.name = name

    # folders ---------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def wavs(self) -> Path:
        return self.root / "data" / "wavs"

    @property
    def executed(self) -> Path:
        return self.root / "executed"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    # files -----------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.data / "manifest.jsonl"

    @property
    def env_json(self) -> Path:
        return self.root / "env.json"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    def make(self) -> "RunDir":
        for folder in (self.root, self.data, self.wavs, self.executed, self.figures):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def require(self, path: Path, what: str) -> Path:
        """Return ``path`` if it exists, else stop with the notebook that makes it."""
        if not Path(path).exists():
            producer = PRODUCERS.get(what, "the earlier notebooks")
            raise MissingInputError(
                f"Missing input: {what} ({path}) is not in run '{self.name}'. "
                f"Run notebooks/{producer} with the same preset first, e.g. "
                f"`python -m emo_lib.run --preset {self.name} --only {producer[:2]}`."
            )
        return Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


# atomic writes ---------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    lines = [json.dumps(r, default=_json_default, ensure_ascii=False) for r in rows]
    return write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
    return rows


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"metric {where} is {obj}; metrics must be finite numbers")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def update_metrics(run: RunDir, section: str, values: dict) -> dict:
    """Merge ``values`` into ``metrics.json`` under ``section`` (e.g. '01_data'), atomically."""
    values = json.loads(json.dumps(values, default=_json_default))
    _check_finite(values, section)
    current = read_json(run.metrics_json) if run.metrics_json.exists() else {}
    current[section] = values
    write_json_atomic(run.metrics_json, current)
    return current
