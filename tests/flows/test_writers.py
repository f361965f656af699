"""Many writers, and runs with nothing to do: two ingests of one catalogue into one store at
once keep every track exactly once; a run with nothing new starts neither Dask nor Prefect."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from factories import music_like, write


def catalogue(root, n):
    for i in range(n):
        write(str(root / f"t{i:02d}.wav"), music_like(6.0 + i % 3, 22050, seed=i), 22050)
    (root / "notes.txt").write_text("liner notes")


def mtag(*args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_writers_at_once_keep_every_track_once(tmp_path, dask_address):
    # both report to the session's Prefect server (PREFECT_API_URL, set by the fixture), as
    # writers of a production store do; each starts its own Dask cluster
    cat, store = tmp_path / "cat", tmp_path / "store"
    catalogue(cat, 12)
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(cat), "--store", str(store),
           "--workers", "1", "--shard-minutes", "0.1", "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    counts = json.loads(mtag(
        "query", "--store", str(store), "--format", "json",
        "SELECT (SELECT count(*) FROM tracks) AS tracks, (SELECT count(DISTINCT track_id) "
        "FROM tracks) AS ids, (SELECT count(*) FROM segments) AS segments, (SELECT count(*) "
        "FROM (SELECT DISTINCT track_id, segment FROM segments)) AS keys, (SELECT "
        "count(*) FROM segments s ANTI JOIN tracks t USING (track_id)) AS orphans").stdout)[0]
    assert counts["tracks"] == counts["ids"] == 13  # 12 audio files and the liner notes
    assert counts["segments"] == counts["keys"] > 12 and counts["orphans"] == 0
    again = mtag("ingest", str(cat), "--store", str(store), "--no-progress")
    assert "Nothing to do" in again.stdout


def test_a_run_with_nothing_new_starts_no_cluster_and_no_api(tmp_path):
    cat, store = tmp_path / "cat", tmp_path / "store"
    catalogue(cat, 3)
    mtag("ingest", str(cat), "--store", str(store), "--workers", "1", "--no-progress")
    script = textwrap.dedent(f"""
        import json, sys, time
        from flows.ingest import run_ingest
        started = time.perf_counter()
        summary = run_ingest({str(cat)!r}, {str(store)!r}, progress=False)
        print(json.dumps({{
            "wall_s": time.perf_counter() - started, "unchanged": summary.unchanged,
            "ok": summary.ok,
            "dask": any(m.startswith("distributed.deploy") for m in sys.modules),
            "prefect_server": "prefect.server.api.server" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["unchanged"], got["ok"], got["dask"], got["prefect_server"]) == (
        4, 0, False, False)
    # (how fast it returns is measured by bench/scale_bench.py, not asserted here)


def descendants(pid):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def started_ingest(tmp_path, n=16, seconds=20.0):
    """An `mtag ingest` of a catalogue long enough to be stopped mid-run, once extracting."""
    import time

    cat, store = tmp_path / "cat", tmp_path / "store"
    for i in range(n):
        write(str(cat / f"t{i:02d}.wav"), music_like(seconds, 22050, seed=i), 22050)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", str(cat), "--store",
                             str(store), "--workers", "1", "--shard-minutes", "0.2",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_own_api_env())
    deadline = time.time() + 300
    # extracting (the head start writes before the cluster is up), with the temporary API and
    # the workers (children of the fork server) running
    while time.time() < deadline and not (
            list((store / "features").glob("*/tensors/*.arrow"))
            and {"uvicorn", "forkserver"} <= {w for p in descendants(proc.pid)
                                              for w in _kinds(p)}):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc, store


def _kinds(p):
    import psutil

    try:
        line = " ".join(p.cmdline())
    except psutil.Error:
        return set()
    kinds = {k for k in ("uvicorn", "forkserver") if k in line}
    if "forkserver" in kinds and not p.children():
        kinds.discard("forkserver")  # no worker forked yet
    return kinds


def _own_api_env():
    """The command starts its own temporary Prefect API (the case to clean up after)."""
    import os

    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def test_sigterm_stops_the_run_cleanly_and_stops_what_it_started(tmp_path):
    import psutil

    proc, store = started_ingest(tmp_path)
    children = descendants(proc.pid)
    assert children  # the Dask workers and the temporary Prefect server
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    leases = [json.loads(p.read_text()) for p in (store / "_locks").glob("commit-*.json")]
    assert all(lease["released"] for lease in leases)
    assert not list((store / "_locks").glob("intent-*.json"))


def test_kill_9_of_the_command_leaves_no_prefect_server(tmp_path):
    import psutil

    proc, _ = started_ingest(tmp_path, n=8)
    servers = [p for p in descendants(proc.pid) if "uvicorn" in " ".join(p.cmdline())]
    assert len(servers) == 1
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(servers, timeout=10)
    assert not alive, "the temporary Prefect server outlived kill -9 of its command"
