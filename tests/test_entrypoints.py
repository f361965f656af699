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
    from flows.train import train_model

    assert isinstance(ingest_flow, Flow) and ingest_flow.name == "ingest"
    assert isinstance(train_model, Flow) and train_model.name == "train-model"


@pytest.mark.parametrize("command", ["ingest", "query", "train", "evaluate", "demo"])
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
