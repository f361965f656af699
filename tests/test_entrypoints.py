"""Every module imports, every command has help, and the flows are Prefect flows."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

PACKAGES = ["tasks", "featurestore", "flows", "training", "infra"]


def modules():
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        yield pkg
        for info in pkgutil.iter_modules(mod.__path__):
            yield f"{pkg}.{info.name}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports_and_says_what_it_is_for(name):
    mod = importlib.import_module(name)
    assert (mod.__doc__ or "").strip(), f"{name} has no module docstring"


def test_flows_are_prefect_flows():
    from prefect import Flow

    from flows.ingest import ingest_flow
    from flows.neighbours import neighbours_flow
    from flows.score import score_flow
    from flows.train import train_flow

    for fn, name in ((ingest_flow, "ingest"), (train_flow, "train-model"),
                     (score_flow, "score"), (neighbours_flow, "neighbours")):
        assert isinstance(fn, Flow) and fn.name == name


def test_every_deployment_entry_point_is_a_flow():
    import importlib

    from prefect import Flow

    from infra.deployments import SPECS

    assert {s.full_name for s in SPECS} == {"scheduled-ingest/nightly-catalogue-ingest",
                                            "scheduled-retrain/weekly-retrain",
                                            "scheduled-score/score-new-tracks"}
    for spec in SPECS:
        path, attr = spec.entrypoint.split(":")
        fn = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)
        assert isinstance(fn, Flow) and fn.name == spec.flow_name


@pytest.mark.parametrize("command", ["ingest", "query", "train", "evaluate", "score",
                                     "similar", "neighbours", "stack", "deploy", "settings",
                                     "compact", "migrate", "verify",
                                     "demo"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "flows.cli", command, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: mtag" in out.stdout


def test_pure_layer_does_not_import_orchestration():
    code = ("import sys, tasks.features, tasks.track, tasks.decode, tasks.segment; "
            "print(any(m.split('.')[0] in ('prefect', 'mlflow', 'featurestore', 'flows') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr
