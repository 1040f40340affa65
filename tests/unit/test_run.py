"""The series runner: which notebooks it picks, and the run facts it records after every notebook."""
import pytest

from emo_lib import run as R
from emo_lib.paths import RunDir, read_json, write_json_atomic
from emo_lib.presets import load_preset


def test_durations_are_recorded_notebook_by_notebook_and_merged(tmp_path):
    cfg = load_preset("smoke")
    run = RunDir("smoke", root=tmp_path).make()
    write_json_atomic(run.metrics_json, {"04_stage1": {"steps": 8}})  # what a notebook wrote is kept
    R.record_run_facts(run, cfg, {}, {"00_tour.ipynb": 12.34})
    R.record_run_facts(run, cfg, {"seed": 1}, {"01_data.ipynb": 60.0})
    metrics = read_json(run.metrics_json)
    assert metrics["04_stage1"] == {"steps": 8}
    facts = metrics["run"]
    assert facts["notebook_durations_s"] == {"00_tour.ipynb": 12.3, "01_data.ipynb": 60.0}
    assert facts["preset"] == "smoke" and facts["overrides"] == {"seed": 1} and facts["finished_utc"].endswith("Z")


def test_select_notebooks_only_and_from(tmp_path):
    for name in ("00_tour.ipynb", "01_data.ipynb", "02_features.ipynb"):
        (tmp_path / name).write_text("{}")
    notebooks = R.list_notebooks(tmp_path)
    assert [nb.name for nb in R.select_notebooks(notebooks, ["01"], None)] == ["01_data.ipynb"]
    assert [nb.name for nb in R.select_notebooks(notebooks, None, "01")] == ["01_data.ipynb", "02_features.ipynb"]
    with pytest.raises(SystemExit, match="no notebook numbered 07"):
        R.select_notebooks(notebooks, ["07"], None)
