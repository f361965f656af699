"""Store records under concurrent writers (featurestore/records.py): one winner of a create,
whole versions for readers while another writer replaces a record, on a local disk and on S3
(moto on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from featurestore import records
from featurestore.store import FeatureStore


@pytest.fixture(params=["local", "s3"])
def root(tmp_path, request):
    """A folder for stores: a local one, and one in a fresh S3 bucket."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket")


def _payload(i: int) -> dict:
    # large enough that a reader would need more than one read of a small buffer
    return {"version": i, "filler": [i] * 4000}


def test_one_winner_among_concurrent_creates(root):
    store = FeatureStore(f"{root}/store", create=True)
    path = store.path("race", "record.json")
    barrier = threading.Barrier(8)

    def create(i: int) -> bool:
        barrier.wait()
        return store.create_record(path, _payload(i))

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(create, range(8)))
    assert won.count(True) == 1
    assert store.read_record(path) == _payload(won.index(True))
    assert not store.create_record(path, _payload(99))  # a later create loses too
    leftovers = [p for p in store.fs.ls(store.path("race"), detail=False) if p.endswith(".tmp")]
    assert leftovers == []


def test_readers_see_whole_versions_while_a_record_is_replaced(root):
    """A reader racing a writer that replaces one record gets one whole version every time
    (on S3 a file object pinned to the first version's ETag failed here with FileExpired)."""
    store = FeatureStore(f"{root}/store", create=True)
    path = store.path("busy.json")
    store.write_record(path, _payload(0))
    versions = 40
    done = threading.Event()
    seen: list[int] = []

    def writer() -> None:
        try:
            for i in range(1, versions + 1):
                store.write_record(path, _payload(i))
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while not done.is_set() or len(seen) < 5:
            data = store.read_record(path)
            assert data == _payload(data["version"])
            seen.append(data["version"])
    finally:
        thread.join()
    assert seen == sorted(seen)  # never an older version after a newer one
    assert store.read_record(path)["version"] == versions


def test_stores_created_at_once_all_open(root):
    """Hosts creating one new store at once all open it and read one whole marker."""
    url = f"{root}/new-{uuid.uuid4().hex[:6]}"
    barrier = threading.Barrier(6)

    def open_store(_: int) -> int:
        barrier.wait()
        return FeatureStore(url, create=True).format

    with ThreadPoolExecutor(6) as pool:
        formats = list(pool.map(open_store, range(6)))
    store = FeatureStore(url)
    assert formats == [store.format] * 6
    marker = store.read_record(store.path("store.json"))
    assert set(marker) == {"format", "created_at"}
    assert json.loads(store.fs.cat_file(store.path("store.json"))) == marker


def test_put_if_absent_without_conditional_writes_looks_first():
    import fsspec

    fs = fsspec.filesystem("memory")
    path = f"/records-{uuid.uuid4().hex[:8]}/r.json"
    assert records.put_if_absent(fs, path, b"1")
    assert not records.put_if_absent(fs, path, b"2")
    assert records.get(fs, path) == b"1"


def test_s3_is_told_without_importing_s3fs_for_a_local_store(root, tmp_path):
    import subprocess
    import sys
    import textwrap

    store = FeatureStore(f"{root}/store", create=True)
    assert records.is_s3(store.fs) == root.startswith("s3://")
    # a local store's commit lease and records never import s3fs (and botocore with it)
    code = textwrap.dedent(f"""
        import sys
        from featurestore.store import FeatureStore
        store = FeatureStore({str(tmp_path / "local")!r}, create=True)
        with store.commit_lease():
            pass
        print("s3fs" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
