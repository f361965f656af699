"""``mtag train`` and ``mtag evaluate`` as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def mtag(*args):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_train_then_evaluate_json(labelled_store, tmp_path):
    store, labels, _ = labelled_store
    out = mtag("train", "--store", store, "--labels", labels, "--model", "gbm",
               "--registered-name", "cli-gbm", "--workdir", str(tmp_path))
    assert "registered cli-gbm v1 as @candidate; promoted to @champion" in out
    assert "1 label rows match no ingested track" in out
    # the open-set rule and what it keeps of the test tracks, in words
    assert re.search(r"open set: a track is confident within distance [0-9.e+-]+ of one of "
                     r"\d+ labelled tracks \(level 0\.975: \d+% of them left out one at a "
                     r"time; \d+% of \d+ test tracks known\)", out), out
    report = json.loads(mtag("evaluate", "--store", store, "--labels", labels, "--model-uri",
                             "models:/cli-gbm@champion", "--format", "json"))
    assert {"accuracy", "macro_f1", "weighted_f1", "per_class"} <= set(report)
    assert report["n"] == 48 and report["accuracy"] > 0.6
    assert {row["class"] for row in report["per_class"]} == {"flute", "piano", "trumpet"}
