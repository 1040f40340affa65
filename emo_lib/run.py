"""Run the notebook series with papermill: ``python -m emo_lib.run --preset smoke``.

Executes ``notebooks/NN_*.ipynb`` in order into ``runs/<run>/executed/``, streaming each cell's
output, with a per-cell timeout. It stops at the first failing notebook, naming the notebook and the
cell, prints a table of durations, and adds the run's facts (preset, seed, versions, durations) to
``runs/<run>/metrics.json``; each notebook writes its own headline numbers there itself.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .paths import RunDir, find_repo_root, read_json, write_json_atomic
from .presets import PresetError, load_preset, parse_override
from .session import library_versions


def list_notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(notebooks: list[Path], only: list[str] | None, start: str | None) -> list[Path]:
    numbers = [nb.name[:2] for nb in notebooks]
    for wanted in (only or []) + ([start] if start else []):
        if wanted.zfill(2) not in numbers:
            raise SystemExit(f"no notebook numbered {wanted}; found {', '.join(numbers)}")
    if only:
        wanted = {w.zfill(2) for w in only}
        return [nb for nb in notebooks if nb.name[:2] in wanted]
    if start:
        return [nb for nb in notebooks if nb.name[:2] >= start.zfill(2)]
    return notebooks


def _failed_cell(error) -> str:
    cell = getattr(error, "exec_count", None)
    ename, evalue = getattr(error, "ename", type(error).__name__), getattr(error, "evalue", str(error))
    return f"cell [{cell}]: {ename}: {evalue}"


def print_table(rows: list[tuple[str, str, float]]) -> None:
    width = max([len(r[0]) for r in rows] + [8])
    print(f"\n{'notebook'.ljust(width)}  status  seconds")
    for name, status, seconds in rows:
        print(f"{name.ljust(width)}  {status:6s}  {seconds:7.1f}")
    print(f"{'total'.ljust(width)}          {sum(r[2] for r in rows):7.1f}\n")


def run_series(preset: str, overrides: dict, run_name: str = "", only=None, start=None,
               timeout: int | None = None, kernel: str = "python3") -> int:
    import papermill as pm

    cfg = load_preset(preset, overrides)  # validate before anything runs
    run = RunDir(run_name or cfg.name).make()
    folder = find_repo_root() / "notebooks"
    notebooks = select_notebooks(list_notebooks(folder), only, start)
    cell_timeout = timeout or cfg["runner"]["cell_timeout_s"]
    rows, status = [], 0
    for nb in notebooks:
        out = run.executed / nb.name
        print(f"=== {nb.name} -> {out}", flush=True)
        started = time.time()
        try:
            pm.execute_notebook(
                str(nb), str(out), parameters={"PRESET": preset, "OVERRIDES": overrides, "RUN_NAME": run.name},
                kernel_name=kernel, log_output=True, progress_bar=False, execution_timeout=cell_timeout,
                cwd=str(folder),
            )
            rows.append((nb.name, "ok", time.time() - started))
        except Exception as err:  # papermill wraps kernel errors in PapermillExecutionError
            rows.append((nb.name, "FAILED", time.time() - started))
            print(f"\n*** {nb.name} failed at {_failed_cell(err)}\n    executed copy: {out}", file=sys.stderr)
            status = 1
            break
        # after every notebook (outside the try: a failed write is not a failed notebook), so that a series
        # cut short still says how long its notebooks took
        record_run_facts(run, cfg, overrides, {nb.name: rows[-1][2]})
    print_table(rows)
    record_run_facts(run, cfg, overrides, {})
    return status


def record_run_facts(run, cfg, overrides: dict, durations_s: dict) -> None:
    """Add the run's facts (preset, seed, overrides, versions, finish time) and notebook durations
    (``{notebook name: seconds}``, merged into earlier ones) to ``metrics.json``, atomically."""
    metrics = read_json(run.metrics_json) if run.metrics_json.exists() else {}
    facts = metrics.get("run", {})
    durations = facts.get("notebook_durations_s", {})
    durations.update({name: round(seconds, 1) for name, seconds in durations_s.items()})
    facts.update(preset=cfg.name, seed=cfg["seed"], overrides=overrides, versions=library_versions(),
                 notebook_durations_s=durations, finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    metrics["run"] = facts
    write_json_atomic(run.metrics_json, metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the emotion-omni-kit notebook series with papermill.")
    parser.add_argument("--preset", required=True, help="smoke | cpu | gpu | paper, or a preset .yaml file")
    parser.add_argument("--only", action="append", help="run only notebook NN (repeatable)")
    parser.add_argument("--from", dest="start", help="run notebook NN and all after it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset key, e.g. --set data.wer_threshold=0.2")
    parser.add_argument("--run-name", default="", help="folder under runs/ (default: the preset name)")
    parser.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    # papermill streams each cell's output through its logger at INFO level
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    try:
        overrides = dict(parse_override(text) for text in args.set)
        return run_series(args.preset, overrides, args.run_name, args.only, args.start, args.timeout, args.kernel)
    except PresetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
