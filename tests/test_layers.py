"""The layer rules of docs/architecture.md, checked over the source of every package.

:data:`LAYERS` is the one place the allowed import directions are written: a package may import
only the packages listed for it (and itself), at module level or inside a function. The same
scan checks that no package imports orchestration or tracking it must not, that every MLflow
call is in ``training/tracking.py`` and that only the command line prints.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS: dict[str, set[str]] = {
    "tasks": set(),
    "featurestore": {"tasks"},
    "training": {"tasks", "featurestore"},
    "flows": {"tasks", "featurestore", "training"},
    "infra": {"tasks", "featurestore", "training", "flows"},
}
"""Package -> the project packages it may import. Read top to bottom: each layer builds on
the ones above it; nothing imports ``infra`` (its commands plug into the CLI through entry
points)."""

FORBIDDEN: dict[str, set[str]] = {
    "tasks": {"prefect", "prefect_dask", "dask", "distributed", "mlflow", "duckdb"},
    "featurestore": {"prefect", "prefect_dask", "dask", "distributed", "mlflow", "torch"},
    "training": {"prefect", "prefect_dask", "dask", "distributed"},
}
"""Third-party packages a layer must not import: the pure core knows no orchestration, storage
or tracking; storage knows no models; training knows no orchestration."""

MLFLOW_MODULES = {"training/tracking.py", "training/pyfunc.py"}
"""Every MLflow call is in tracking.py; pyfunc.py defines the model class MLflow loads."""

PRINTING_MODULES = {"flows/cli.py", "flows/demo.py"}
"""In ``flows/``, the command line and the demo script write to the terminal; flows, tasks and
the runtime log (or show progress on stderr) and return summaries the CLI renders."""


def sources():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def imported(tree: ast.AST) -> set[str]:
    """Top-level names of every module an AST imports (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


SOURCES = list(sources())


@pytest.mark.parametrize(("package", "path", "tree"), SOURCES, ids=[s[1] for s in SOURCES])
def test_imports_follow_the_layers(package, path, tree):
    names = imported(tree)
    wrong = (names & set(LAYERS)) - LAYERS[package] - {package}
    assert not wrong, f"{path} imports {sorted(wrong)}; {package} may import {LAYERS[package]}"
    banned = names & FORBIDDEN.get(package, set())
    assert not banned, f"{path} imports {sorted(banned)}, which {package} must not"
    if "mlflow" in names:
        assert path in MLFLOW_MODULES, f"{path} calls MLflow outside training/tracking.py"


def test_no_package_cycle():
    edges: dict[str, set[str]] = {p: set() for p in LAYERS}
    for package, _, tree in SOURCES:
        edges[package] |= (imported(tree) & set(LAYERS)) - {package}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = [p for p in LAYERS if p in reach(p)]
    assert not cycles, f"packages in an import cycle: {cycles} ({edges})"
    assert "infra" not in set().union(*edges.values())


FLOWS = [s for s in SOURCES if s[0] == "flows"]


@pytest.mark.parametrize(("package", "path", "tree"), FLOWS, ids=[s[1] for s in FLOWS])
def test_only_the_command_line_prints(package, path, tree):
    calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert path in PRINTING_MODULES or not calls, \
        f"{path} prints at lines {calls}: log, or return what the CLI shows"


def test_the_rules_see_a_violation():
    """The scan itself: an import against the layers and a print are found."""
    tree = ast.parse("def f():\n    from flows.cli import main\n    import mlflow\n    print(1)\n")
    assert imported(tree) == {"flows", "mlflow"}
    assert {"flows"} - LAYERS["featurestore"] == {"flows"}
