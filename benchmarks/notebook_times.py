"""Wall time of every notebook, per preset, from the runs' metrics.json (optionally running the series first).

    python benchmarks/notebook_times.py                          # every run under runs/
    python benchmarks/notebook_times.py --run smoke              # run the smoke series, then the table
    python benchmarks/notebook_times.py --run cpu --only 04      # run one notebook of the cpu preset first

The runner (``python -m emo_lib.run``) records each notebook's duration in
``runs/<run>/metrics.json`` under ``run.notebook_durations_s`` (the last successful execution of
each notebook). The table shows minutes per notebook and run, the total, and each run's time as a
multiple of the first run's (e.g. cpu / smoke), notebook by notebook. Durations of notebooks run at
different times can come from different machine loads: check ``finished_utc`` below the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emo_lib.paths import find_repo_root, read_json
from emo_lib.report import machine_line, run_order, text_table


def collect_durations(runs_dir: str | Path, only: list[str] | None = None) -> dict[str, dict[str, float]]:
    """``{run: {notebook: seconds}}`` for every run with recorded durations, in the report's column order."""
    found = {}
    for path in sorted(Path(runs_dir).glob("*/metrics.json")):
        name = path.parent.name
        if only and name not in only:
            continue
        facts = read_json(path).get("run", {})
        durations = facts.get("notebook_durations_s") or {}
        if durations:
            found[name] = {nb: float(s) for nb, s in durations.items()}
    return {name: found[name] for name in run_order(found)}


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None or b <= 0 else f"{a / b:.1f}x"


def times_table(durations: dict[str, dict[str, float]]) -> str:
    """Minutes per notebook (rows) and run (columns), a total row, and ``<run> / <first run>`` ratio columns.

    A notebook a run has not recorded is an empty cell; totals add what each run recorded.
    """
    if not durations:
        return "no run has recorded notebook durations yet (python -m emo_lib.run --preset smoke)"
    runs = list(durations)
    notebooks = sorted({nb for d in durations.values() for nb in d})
    first = runs[0]
    header = ["notebook", *(f"{r} (min)" for r in runs), *(f"{r} / {first}" for r in runs[1:])]
    rows = []
    for nb in notebooks:
        values = [durations[r].get(nb) for r in runs]
        rows.append([nb, *(_minutes(v) for v in values), *(_ratio(v, values[0]) for v in values[1:])])
    totals = [sum(durations[r].values()) for r in runs]
    rows.append(["total", *(_minutes(t) for t in totals), *(_ratio(t, totals[0]) for t in totals[1:])])
    return text_table(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(find_repo_root() / "runs"), help="folder with one folder per run")
    parser.add_argument("--run", action="append", default=[], metavar="PRESET",
                        help="run this preset's series with emo_lib.run first (repeatable)")
    parser.add_argument("--only", action="append", default=None, metavar="NN",
                        help="with --run: only notebook NN (repeatable)")
    parser.add_argument("--columns", action="append", default=None, metavar="RUN",
                        help="only these runs as columns (repeatable; default: every run with durations)")
    args = parser.parse_args(argv)

    for preset in args.run:
        from emo_lib.run import run_series

        print(f"running the {preset} series (emo_lib.run) ...", flush=True)
        if run_series(preset, {}, only=args.only) != 0:
            print(f"the {preset} series failed; the table below shows what was recorded", file=sys.stderr)
    durations = collect_durations(args.runs, args.columns)
    print(machine_line())
    print(times_table(durations))
    for name in durations:
        facts = read_json(Path(args.runs) / name / "metrics.json").get("run", {})
        print(f"{name}: finished {facts.get('finished_utc', 'unknown')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
