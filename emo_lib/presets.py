"""Preset loading and validation.

All sizes and model names live in ``presets.yaml`` next to this file. ``load_preset`` merges
``base`` with one preset (and optional dotted overrides) and refuses unknown keys, so a typo
in a preset or an override stops at once with the list of valid keys instead of being ignored.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

PRESET_FILE = Path(__file__).with_name("presets.yaml")
PRESET_NAMES = ("smoke", "cpu", "gpu", "paper")


class PresetError(ValueError):
    """A preset name, key or value that the kit does not know."""


def _read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        content = yaml.safe_load(f) or {}
    if not isinstance(content, dict):
        raise PresetError(f"{path} must hold a mapping at top level, got {type(content).__name__}")
    return content


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'data': {'seed': 1}} -> {'data.seed': 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str) and isinstance(value, list):
        return True  # e.g. domains: "all" or a list
    if isinstance(default, list) and isinstance(value, str):
        return True
    return isinstance(value, type(default))


def _merge(base: dict, override: Mapping[str, Any], valid: dict[str, Any], origin: str) -> None:
    for dotted, value in flatten(override).items():
        if dotted not in valid:
            raise PresetError(
                f"unknown preset key '{dotted}' in {origin}. Valid keys:\n  " + "\n  ".join(sorted(valid))
            )
        if not _type_ok(valid[dotted], value):
            raise PresetError(
                f"preset key '{dotted}' in {origin} should be like {valid[dotted]!r} "
                f"({type(valid[dotted]).__name__}), got {value!r}"
            )
        node = base
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = copy.deepcopy(value)


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


class Preset(dict):
    """A validated preset: a nested dict with attribute-free, explicit access plus ``get_path``."""

    @property
    def name(self) -> str:
        return self["name"]

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node


def load_preset(name_or_file: str, overrides: Mapping[str, Any] | None = None) -> Preset:
    """Return the merged preset ``name_or_file`` (a preset name or a YAML file).

    A YAML file may say ``extends: cpu`` and override keys of that preset.
    ``overrides`` takes dotted keys, e.g. ``{"data.wer_threshold": 0.2}``.
    """
    table = _read_yaml(PRESET_FILE)
    base = table["base"]
    valid = flatten(base)
    merged = copy.deepcopy(base)
    path = Path(name_or_file)
    if name_or_file in PRESET_NAMES:
        _merge(merged, table.get(name_or_file) or {}, valid, f"preset '{name_or_file}'")
        name = name_or_file
    elif path.suffix in (".yaml", ".yml") and path.exists():
        custom = _read_yaml(path)
        parent = custom.pop("extends", "cpu")
        if parent not in PRESET_NAMES:
            raise PresetError(f"{path}: 'extends: {parent}' is not a preset; choose one of {', '.join(PRESET_NAMES)}")
        _merge(merged, table.get(parent) or {}, valid, f"preset '{parent}'")
        _merge(merged, custom, valid, str(path))
        name = path.stem
    else:
        raise PresetError(
            f"unknown preset '{name_or_file}'. Choose one of: {', '.join(PRESET_NAMES)} "
            "(or pass a .yaml file that says 'extends: <preset>')"
        )
    if overrides:
        _merge(merged, _unflatten(dict(overrides)), valid, "overrides")
    preset = Preset(merged)
    preset["name"] = name
    return preset


def parse_override(text: str) -> tuple[str, Any]:
    """'data.wer_threshold=0.2' -> ('data.wer_threshold', 0.2); values are parsed as YAML."""
    if "=" not in text:
        raise PresetError(f"override '{text}' must look like key=value, e.g. data.wer_threshold=0.2")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
