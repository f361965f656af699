"""A small labelled store, ingested once per session through the real ingest flow."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from factories import write

from tasks.synth import render_track

INSTRUMENTS = ("piano", "flute", "trumpet")


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory, dask_address):
    """Three instruments × 16 tracks of 6.5 s rendered from the soundfont; labels.csv beside.

    Returns (store path, labels path, catalogue path).
    """
    from flows.ingest import run_ingest

    root = tmp_path_factory.mktemp("labelled")
    cat = root / "catalogue"
    rows = []
    for i in range(48):
        inst = INSTRUMENTS[i % 3]
        style = ("ballad", "march")[(i // 3) % 2]
        y = render_track(inst, style, seconds=6.5, sample_rate=22050, seed=100 + i)
        rel = f"catalogue/{inst}/{style}_{i:02d}.flac"
        write(str(root / rel), y, 22050)
        tags = inst if i % 5 else f"{inst}|{'strings' if inst == 'piano' else 'winds'}"
        rows.append({"path": rel, "label": inst, "tags": tags, "artist": f"artist{i % 6}"})
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "artist"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("path", "label", "artist")} for r in rows)
        w.writerow({"path": "catalogue/missing.flac", "label": "piano", "artist": "x"})
    multi = root / "multi.csv"
    with open(multi, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows({"path": r["path"], "label": r["tags"]} for r in rows)
    store = root / "store"
    summary = run_ingest(str(cat), str(store), dask_address=dask_address, progress=False)
    assert summary.ok == 48
    return str(store), str(labels), str(multi)


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    """A private SQLite tracking store per test (the embedded default lives in the store)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def ids(n):
    return np.array([f"t{i}" for i in range(n)], dtype=object)


__all__ = ["ids", "os"]
