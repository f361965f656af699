"""The commit lease on a local folder and on S3 (a moto server on 127.0.0.1): mutual exclusion
between threads of one process and between real processes, expiry and takeover, fencing by
``check()``, renewal by the context manager. Real components only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from featurestore.lease import CommitLease, commit_lease
from featurestore.store import FeatureStore
from tasks.errors import StoreError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# one contender process: take the lease, read the counter, sleep 1 ms, write it + 1, release;
# it reports the generations it held. It starts only once every contender is ready.
WORKER = textwrap.dedent("""
    import json, os, sys, time
    from featurestore.lease import CommitLease
    from featurestore.store import FeatureStore

    url, n, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = FeatureStore(url)
    target = store.path("counter.txt")
    lease = CommitLease(store, ttl=30, timeout=60, poll=0.005)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    held = []
    for _ in range(n):
        with lease:
            value = int(store.fs.cat_file(target))
            time.sleep(0.001)
            lease.check()
            store.fs.pipe_file(target, str(value + 1).encode())
            held.append(lease.generation)
    print(json.dumps(held), flush=True)
""")


def _gens(store: FeatureStore) -> list[int]:
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.path("_locks"),
                                                                   detail=False)]
    return sorted(int(n[len("commit-"):-len(".json")]) for n in names
                  if n.startswith("commit-") and n.endswith(".json"))


def _contention(store: FeatureStore) -> None:
    """Test 1 on any store: generations, a blocked contender, expiry and takeover."""
    first = CommitLease(store, ttl=30).acquire()
    assert first.generation == 1
    first.check()
    first.release()
    again = CommitLease(store, ttl=30).acquire()
    assert again.generation == 2
    with pytest.raises(StoreError, match="already holds"):
        again.acquire()

    started = time.monotonic()
    with pytest.raises(StoreError, match=f"pid {os.getpid()}") as info:
        CommitLease(store, timeout=0.5, poll=0.05).acquire()
    assert 0.5 <= time.monotonic() - started < 5
    assert socket.gethostname() in str(info.value) and "generation 2" in str(info.value)
    again.check()  # the failed contender changed nothing
    again.release()
    again.release()  # a second release does nothing
    with pytest.raises(StoreError, match="not held"):
        again.check()

    # an expired lease (never renewed) is taken over; its old holder is fenced off
    stale = CommitLease(store, ttl=0.3).acquire()
    assert stale.generation == 3
    with pytest.raises(StoreError, match="pid"):
        CommitLease(store, timeout=0.05, poll=0.01).acquire()
    time.sleep(0.5)
    with pytest.raises(StoreError, match=r"lost the commit lease.*expired"):
        stale.check()
    with pytest.raises(StoreError, match="lost the commit lease"):
        stale.renew()  # an expired lease is never revived
    taker = CommitLease(store, ttl=30, timeout=5).acquire()
    assert taker.generation == 4
    with pytest.raises(StoreError, match=r"lost the commit lease.*generation 4"):
        stale.check()
    stale.release()  # must not touch the new holder's lease
    taker.check()
    with pytest.raises(StoreError, match="pid"):
        CommitLease(store, timeout=0.05, poll=0.01).acquire()
    taker.release()

    # releasing generation g deletes generations older than g - 2
    for expected in range(5, 9):
        lease = CommitLease(store).acquire()
        assert lease.generation == expected
        lease.release()
    assert _gens(store) == [6, 7, 8]
    record = json.loads(store.fs.cat_file(store.path("_locks", "commit-000000000008.json")))
    assert set(record) == {"owner", "host", "pid", "process", "acquired_at", "expires_at",
                           "released"}
    assert record["released"] is True and record["pid"] == os.getpid()


def _counter(store: FeatureStore, tmp_path, processes: int, each: int, env=None) -> None:
    """``processes`` real processes increment a counter in the store ``each`` times."""
    store.fs.pipe_file(store.path("counter.txt"), b"0")
    go = str(tmp_path / f"go-{uuid.uuid4().hex[:6]}")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, store.url, str(each), go],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        open(go, "w").close()  # all start together: maximal contention
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0] * processes
    held = [g for out in outputs for g in json.loads(out.strip().splitlines()[-1])]
    assert int(store.fs.cat_file(store.path("counter.txt"))) == processes * each
    assert sorted(held) == list(range(1, processes * each + 1))  # each generation held once


# --- local folder -------------------------------------------------------------------------
def test_local_generations_contention_and_takeover(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    _contention(store)


@pytest.mark.slow
def test_local_processes_never_lose_an_update(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    started = time.monotonic()
    _counter(store, tmp_path, processes=4, each=25)
    assert time.monotonic() - started < 60


HOLDER = textwrap.dedent("""
    import sys, time
    from featurestore.lease import CommitLease
    from featurestore.store import FeatureStore

    CommitLease(FeatureStore(sys.argv[1]), ttl=600).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    """A holder killed with SIGKILL (ttl 600 s) does not block the next process; a live one
    does, and so does a holder whose record names another machine or container.
    """
    import signal

    from featurestore.lease import process_identity

    store = FeatureStore(str(tmp_path / "store"), create=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, store.url], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=f"pid {proc.pid}"):  # alive: it holds
            CommitLease(store, timeout=0.3, poll=0.05).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    started = time.monotonic()
    taker = CommitLease(store, ttl=30, timeout=5, poll=0.05).acquire()
    assert time.monotonic() - started < 2 and taker.generation == 2
    mine = json.loads(store.fs.cat_file(store.path("_locks", "commit-000000000002.json")))
    assert mine["process"] == process_identity(os.getpid()) and mine["process"].count("/") == 2
    taker.release()

    # a record of a dead PID in another PID namespace (or boot): only expiry can tell
    foreign = {"owner": "x", "host": socket.gethostname(), "pid": proc.pid,
               "process": "other-boot/pid:[1]/123", "acquired_at": time.time(),
               "expires_at": time.time() + 600, "released": False}
    store.fs.pipe_file(store.path("_locks", "commit-000000000003.json"),
                       json.dumps(foreign).encode())
    with pytest.raises(StoreError, match="generation 3"):
        CommitLease(store, timeout=0.3, poll=0.05).acquire()
    # and an old record without "process" (written before it existed) waits for expiry too
    del foreign["process"]
    store.fs.pipe_file(store.path("_locks", "commit-000000000004.json"),
                       json.dumps(foreign).encode())
    with pytest.raises(StoreError, match="generation 4"):
        CommitLease(store, timeout=0.3, poll=0.05).acquire()


def test_context_manager_renews(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    with commit_lease(store, ttl=0.6) as lease:
        path = store.path("_locks", f"commit-{lease.generation:012d}.json")
        first = json.loads(store.fs.cat_file(path))["expires_at"]
        end = time.monotonic() + 2.0
        tries = 0
        while time.monotonic() < end:
            with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
                CommitLease(store, ttl=0.6, timeout=0.3, poll=0.05).acquire()
            tries += 1
        assert tries >= 4
        lease.check()
        assert json.loads(store.fs.cat_file(path))["expires_at"] > first + 1.0  # renewed
        assert _gens(store) == [lease.generation]
    assert json.loads(store.fs.cat_file(path))["released"] is True
    # the renewing thread is gone: nothing rewrites the released record any more
    assert not [t for t in threading.enumerate() if t.name.startswith("commit-")]
    with commit_lease(store, timeout=1) as again:
        assert again.generation == lease.generation + 1


def test_error_in_block_still_releases(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    with pytest.raises(RuntimeError), commit_lease(store):
        raise RuntimeError("commit failed")
    assert CommitLease(store, timeout=0).acquire().generation == 2


def test_filesystem_without_conditional_writes_is_refused():
    store = FeatureStore(f"memory://lease-{uuid.uuid4().hex[:8]}", create=True)
    with pytest.raises(StoreError, match="conditional writes"):
        CommitLease(store)


# --- S3 (moto) ----------------------------------------------------------------------------
@pytest.fixture
def s3_store(s3_bucket):
    """A store in a fresh bucket on the moto server (tests/conftest.py)."""
    return FeatureStore(f"{s3_bucket}/store", create=True)


@pytest.mark.slow
def test_s3_generations_contention_and_takeover(s3_store):
    assert not s3_store.is_local
    _contention(s3_store)


@pytest.mark.slow
def test_s3_processes_never_lose_an_update(s3_store, tmp_path):
    _counter(s3_store, tmp_path, processes=2, each=10, env=dict(os.environ))


@pytest.mark.slow
def test_s3_exclusive_create_has_one_winner(s3_store):
    """The primitive itself: a conditional PUT on an existing generation loses."""
    lease = CommitLease(s3_store).acquire()
    backend = lease._backend
    assert not backend.create(lease.generation, b"{}")
    assert backend.create(lease.generation + 5, b"{}")
    assert json.loads(s3_store.fs.cat_file(backend.path(lease.generation)))["released"] is False
