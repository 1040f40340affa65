import json

import pytest

from emo_lib.paths import (MissingInputError, RunDir, atomic_path, read_jsonl, update_metrics,
                           write_jsonl_atomic)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "manifest.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("crash in the middle")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.jsonl"]


def test_jsonl_roundtrip(tmp_path):
    rows = [{"a": 1, "b": [1.5, None]}, {"a": 2, "b": "x"}]
    write_jsonl_atomic(tmp_path / "x.jsonl", rows)
    assert read_jsonl(tmp_path / "x.jsonl") == rows


def test_missing_input_names_the_notebook(tmp_path):
    run = RunDir("smoke", root=tmp_path).make()
    with pytest.raises(MissingInputError, match="01_data.ipynb"):
        run.require(run.manifest, "manifest")


def test_metrics_merge_and_refuse_nan(tmp_path):
    run = RunDir("r", root=tmp_path).make()
    update_metrics(run, "00_tour", {"x": 1})
    update_metrics(run, "01_data", {"y": {"z": 2.5}})
    assert json.loads(run.metrics_json.read_text()) == {"00_tour": {"x": 1}, "01_data": {"y": {"z": 2.5}}}
    with pytest.raises(ValueError, match="01_data.bad"):
        update_metrics(run, "01_data", {"bad": float("nan")})
