"""Fault injection on real components: `mtag ingest` killed with SIGKILL inside a commit group,
between the tables of a retirement and after the probe; files deleted and rewritten while a run
reads them. After the next clean run, `mtag verify` passes and every file of the catalogue is
in the store exactly once; no process of a killed run is left behind. (A Dask worker killed
mid-shard: tests/flows/test_ingest.py; two writers at once: tests/flows/test_writers.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from factories import music_like, write

from featurestore.store import FeatureStore
from featurestore.verify import verify
from flows.ingest import run_ingest

pytestmark = pytest.mark.slow


def mtag(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def track_id(path):
    return hashlib.blake2b(open(path, "rb").read(), digest_size=16).hexdigest()[:16]


def accounted_once(cat, store):
    """Every file of ``cat`` is in ``tracks`` once by content, nothing else is; verify passes."""
    want = {track_id(os.path.join(cat, n)) for n in os.listdir(cat)}
    out = mtag("query", "--store", str(store), "--format", "json",
               "SELECT track_id, count(*) AS n FROM tracks GROUP BY 1")
    assert out.returncode == 0, out.stderr[-2000:]
    have = {r["track_id"]: r["n"] for r in json.loads(out.stdout)}
    assert set(have) == want and set(have.values()) == {1}
    report = verify(FeatureStore(str(store)))
    assert report.ok, report.render()


def processes_with(marker):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_killed_at_every_fail_point_then_one_clean_run_accounts_for_every_file(
        tmp_path, dask_address):
    cat, store = tmp_path / "cat", tmp_path / "store"
    cat.mkdir()
    for i in range(8):
        write(str(cat / f"t{i}.wav"), music_like(2.0 + i % 3, 22050, seed=i), 22050)
    own = ["ingest", str(cat), "--store", str(store), "--workers", "1", "--no-progress",
           "--shard-minutes", "0.02"]
    args = [*own, "--dask-address", dask_address]  # later runs join the session's cluster

    def killed_at(point, run=args):
        once = str(tmp_path / f"fired-{point}")
        out = mtag(*run, env={"MTAG_FAILPOINTS": point, "MTAG_FAILPOINT_ONCE": once})
        return out, once

    out, once = killed_at("commit.between", own)  # with its own cluster and Prefect server
    assert out.returncode == -signal.SIGKILL and os.path.exists(f"{once}.commit.between")
    deadline = time.monotonic() + 15  # the run's Dask workers and Prefect server follow it
    while processes_with(once) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with(once) == []

    out, _ = killed_at("ingest.probed")
    assert out.returncode == -signal.SIGKILL
    write(str(cat / "t1.wav"), music_like(3.0, 22050, seed=101), 22050)  # replaced
    os.remove(cat / "t2.wav")  # deleted
    out, _ = killed_at("retire.between")
    assert out.returncode == -signal.SIGKILL
    write(str(cat / "t9.wav"), music_like(3.0, 22050, seed=9), 22050)
    out, _ = killed_at("commit.last")
    assert out.returncode == -signal.SIGKILL

    clean = mtag(*args)
    assert clean.returncode == 0, clean.stderr[-2000:]
    accounted_once(cat, store)
    assert "Nothing to do" in mtag(*args).stdout


def test_files_deleted_and_rewritten_while_a_run_reads_them(tmp_path, dask_address):
    cat, store = tmp_path / "cat", tmp_path / "store"
    cat.mkdir()
    for i in range(12):
        write(str(cat / f"t{i:02d}.wav"), music_like(3.0, 22050, seed=i), 22050)
    stop = threading.Event()

    def meddle():  # rewrite and delete files for as long as the run lasts
        k = 0
        while not stop.is_set():
            write(str(cat / f"t{k % 6:02d}.wav"), music_like(3.0, 22050, seed=100 + k), 22050)
            victim = cat / f"t{6 + k % 6:02d}.wav"
            if victim.exists() and k % 3 == 0:
                victim.unlink()
            k += 1
            time.sleep(0.05)

    thread = threading.Thread(target=meddle)
    thread.start()
    try:
        run_ingest(str(cat), str(store), dask_address=dask_address, progress=False,
                   shard_minutes=0.02)
    finally:
        stop.set()
        thread.join()
    # the next night: whatever the run saw, the store now matches the catalogue exactly
    run_ingest(str(cat), str(store), dask_address=dask_address, progress=False)
    accounted_once(cat, store)
