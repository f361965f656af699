"""Shared fixtures: environment, a seeded RNG, audio factories, Prefect harness, Dask cluster.

Real components only: a ``distributed.LocalCluster`` with worker processes and Prefect's test
harness (a temporary local API). Test audio is generated here, never read from outside.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

# Environment first: Dask worker processes inherit it. A private PREFECT_HOME keeps tests off
# the user's ~/.prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="mtag-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
# and a private cache (filter banks) keeps them off the user's ~/.cache
_CACHE = tempfile.mkdtemp(prefix="mtag-test-cache-")
os.environ.setdefault("MTAG_CACHE_DIR", _CACHE)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, os.path.dirname(__file__))

from flows.settings import apply_defaults  # noqa: E402

apply_defaults()

LABELLED_INSTRUMENTS = ("piano", "flute", "trumpet")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261121)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_address(prefect_harness):
    """A real LocalCluster: 2 worker processes, one thread each, on 127.0.0.1.

    The workers inherit the harness's API URL, so their task runs land in the same database.
    """
    from distributed import Client, LocalCluster
    from prefect.settings import get_current_settings

    os.environ["PREFECT_API_URL"] = str(get_current_settings().api.url)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory, dask_address):
    """Three instruments × 16 tracks of 6.5 s rendered from the soundfont; labels.csv beside.

    Returns (store path, labels path, catalogue path).
    """
    from factories import write, write_labels

    from flows.ingest import run_ingest
    from tasks.synth import render_track

    root = tmp_path_factory.mktemp("labelled")
    cat = root / "catalogue"
    rows = []
    for i in range(48):
        inst = LABELLED_INSTRUMENTS[i % 3]
        style = ("ballad", "march")[(i // 3) % 2]
        y = render_track(inst, style, seconds=6.5, sample_rate=22050, seed=100 + i)
        rel = f"catalogue/{inst}/{style}_{i:02d}.flac"
        write(str(root / rel), y, 22050)
        tags = inst if i % 5 else f"{inst}|{'strings' if inst == 'piano' else 'winds'}"
        rows.append({"path": rel, "label": inst, "tags": tags, "artist": f"artist{i % 6}"})
    missing = {"path": "catalogue/missing.flac", "label": "piano", "artist": "x"}
    labels = write_labels(root / "labels.csv", [*rows, missing], ("path", "label", "artist"))
    multi = write_labels(root / "multi.csv", [{"path": r["path"], "label": r["tags"]}
                                               for r in rows])
    store = root / "store"
    summary = run_ingest(str(cat), str(store), dask_address=dask_address, progress=False)
    assert summary.ok == 48
    return str(store), str(labels), str(multi)


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    """A private SQLite tracking store per test (the embedded default lives in the store)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on a free loopback port for the session, stopped by its PID."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from flows.cluster import free_port

    port = free_port()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "moto server exited"
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """``s3://<a fresh bucket>`` on the session's moto server, its credentials in the
    environment (s3fs's cached filesystems dropped before and after).
    """
    import uuid

    import boto3
    import s3fs

    env = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "key",
           "AWS_SECRET_ACCESS_KEY": "not-a-real-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem configured for another endpoint
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
