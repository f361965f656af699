"""Start-up off the critical path (flows/headstart.py): a run with work extracts its first
shards while the workers and the temporary Prefect API boot, the command's process never
imports the Prefect server, and a crash inside the head start loses and doubles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from factories import music_like, write

from featurestore.store import FeatureStore
from featurestore.verify import verify


def catalogue(root, n, seconds=2.0):
    for i in range(n):
        write(str(root / f"n{i:02d}.wav"), music_like(seconds + 0.1 * i, 22050, seed=i), 22050)


def own_api_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | extra


def counts(store):
    fstore = FeatureStore(str(store))
    fs = fstore.default_feature_set()
    tracks = fstore.read(fs, "tracks").to_pandas()
    segments = fstore.read(fs, "segments").to_pandas()
    return tracks, segments


def test_the_first_shards_begin_before_the_flow_run_and_the_server_stays_out(tmp_path):
    cat, store = tmp_path / "cat", tmp_path / "store"
    catalogue(cat, 24)
    script = textwrap.dedent(f"""
        import json, sys
        from flows.headstart import run_ingest
        s = run_ingest({str(cat)!r}, {str(store)!r}, n_workers=1, progress=False)
        print(json.dumps({{"ok": s.ok, "shards": s.shards, "head": s.head_start_shards,
                          "server_here": "prefect.server.api.server" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, env=own_api_env())
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ok"] == 24 and got["server_here"] is False
    # the head start took shards (it runs from the preflight on; the cluster and the API
    # take seconds), and the flow committed them with its own
    assert 1 <= got["head"] <= got["shards"]
    tracks, segments = counts(store)
    assert len(tracks) == tracks["track_id"].nunique() == 24
    assert len(segments) == len(segments.drop_duplicates(["track_id", "segment"]))
    assert set(segments["track_id"]) == set(tracks["track_id"])


def test_a_crash_inside_the_head_start_loses_and_doubles_nothing(tmp_path):
    cat, store = tmp_path / "cat", tmp_path / "store"
    catalogue(cat, 16)
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(cat), "--store", str(store),
           "--workers", "1", "--no-progress"]
    # the first shard to pass its first track kills its process: the command's own (the head
    # start runs there before any worker is up), as a power cut would
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=own_api_env(
        MTAG_FAILPOINTS="worker.track", MTAG_FAILPOINT_ONCE=str(tmp_path / "once")))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert (tmp_path / "once.worker.track").exists()
    clean = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=600,
                           env=own_api_env())
    assert clean.returncode == 0, clean.stderr[-3000:]
    tracks, segments = counts(store)
    assert len(tracks) == tracks["track_id"].nunique() == 16
    assert len(segments) == len(segments.drop_duplicates(["track_id", "segment"]))
    report = verify(FeatureStore(str(store)))
    assert report.ok, report.render()


def test_a_failed_head_start_shard_runs_again_as_a_task(tmp_path, dask_address):
    import time

    from flows.headstart import HeadStart
    from flows.ingest import ingest_flow
    from flows.preflight import look_up
    from flows.runtime import run_on_cluster
    from tasks.config import FeatureConfig

    cat, store = tmp_path / "cat", tmp_path / "store"
    catalogue(cat, 6)
    cfg = FeatureConfig()
    look = look_up(FeatureStore(str(store), create=True), str(cat), cfg)
    # a head start whose shards cannot be written (its store does not exist): every one fails
    head = HeadStart(str(tmp_path / "no-store-here"), cfg, look).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (head._jobs and all(j.done() for _, j in
                                                                   head._jobs)):
        time.sleep(0.05)
    assert head._jobs and all(j.exception() is not None for _, j in head._jobs)
    summary = run_on_cluster(ingest_flow, {
        "source": str(cat), "store": str(store), "config": cfg.to_dict(), "progress": False,
        "head_start": head.token}, dask_address=dask_address)
    assert summary.head_start_shards == len(head._jobs) >= 1
    assert (summary.ok, summary.failed, summary.shards_failed) == (6, 0, 0)
    tracks, _ = counts(store)
    assert len(tracks) == tracks["track_id"].nunique() == 6


def test_forked_workers_see_the_environment_of_their_own_cluster(monkeypatch):
    # workers are forked from one server that keeps the environment it started with; each
    # cluster's workers must still see the process's environment as it is when they start
    # (a test or a caller sets credentials between clusters)
    from flows.cluster import dask_cluster

    def probe():
        return os.environ.get("MTAG_TEST_PROBE")

    with dask_cluster(None, n_workers=1) as first:
        assert list(first.client.run(probe).values()) == [None]
    monkeypatch.setenv("MTAG_TEST_PROBE", "set later")
    with dask_cluster(None, n_workers=1) as second:
        assert list(second.client.run(probe).values()) == ["set later"]
