"""Notebook hygiene: strip outputs before committing, check the papermill contract.

``python -m emo_lib.notebooks strip notebooks/*.ipynb`` clears outputs and execution counts
(tags are kept); ``check`` verifies that each notebook has exactly one cell tagged ``parameters``
whose statements are plain assignments of literals.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat


def parameter_cells(nb) -> list:
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def check_notebook(path: str | Path) -> list[str]:
    """Problems with a committed notebook (empty list = fine)."""
    nb = nbformat.read(str(path), as_version=4)
    problems = []
    cells = parameter_cells(nb)
    if len(cells) != 1:
        problems.append(f"{path}: {len(cells)} cells tagged 'parameters' (need exactly one)")
    for cell in cells:
        for node in ast.parse(cell.source).body:
            if not isinstance(node, ast.Assign):
                problems.append(f"{path}: parameters cell holds a statement that is not an assignment")
                continue
            try:
                ast.literal_eval(node.value)
            except ValueError:
                problems.append(f"{path}: parameter '{ast.unparse(node.targets[0])}' is not a literal")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")):
            problems.append(f"{path}: code cell {i} has outputs (run `make strip-notebooks`)")
    return problems


def strip_notebook(path: str | Path) -> None:
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
    nbformat.write(nb, str(path))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("strip", "check"):
        print("usage: python -m emo_lib.notebooks strip|check NOTEBOOK...")
        return 2
    command, paths = argv[0], argv[1:]
    problems = []
    for path in paths:
        if command == "strip":
            strip_notebook(path)
        problems += check_notebook(path)
    print("\n".join(problems) or f"{len(paths)} notebooks ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
