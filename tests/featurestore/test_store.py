from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from factories import music_like

from featurestore.query import connect, format_result, run_query, write_result
from featurestore.reader import TensorReader, read_table
from featurestore.schema import TRACKS_SCHEMA, check_schema, read_metadata
from featurestore.store import FeatureStore, ShardManifest
from featurestore.writer import ShardWriter
from tasks.config import FeatureConfig
from tasks.errors import ParameterError, SchemaError, StoreError
from tasks.features import SpectralExtractor
from tasks.track import extract_track

C = FeatureConfig()


def write_shard(store, shard_id, tracks, *, spill_bytes=64 << 20, fail=()):
    """Stage a shard of (track_id, seconds) tracks; return (staged dir, manifest)."""
    ex = SpectralExtractor(C)
    staged = store.staging_dir(C.feature_set_id, shard_id)
    with ShardWriter(store, staged, C, shard_id, spill_bytes=spill_bytes) as w:
        for i, (tid, seconds) in enumerate(tracks):
            row = {"track_id": tid, "path": f"/music/{tid}.wav", "status": "ok",
                   "content_hash": tid * 2, "format": "wav"}
            w.begin_track(tid)
            result = extract_track([music_like(seconds, 22050, seed=i)[None]], 22050, C, ex,
                                   w.add_batch)
            if tid in fail:
                w.fail_track(row | {"status": "failed", "stage": "features", "error": "boom"})
            else:
                w.end_track(row | {"duration_s": result.duration_s}, result)
    return staged, ShardManifest(shard_id, C.feature_set_id, w.counts)


@pytest.fixture
def store(tmp_path):
    s = FeatureStore(str(tmp_path / "store"), create=True)
    s.register_feature_set(C)
    return s


def test_missing_store_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(str(tmp_path / "nowhere"))


def test_shard_round_trip_with_exact_names(store, tmp_path):
    staged, manifest = write_shard(store, "s-aaa", [("t1", 7.0), ("t2", 2.0)])
    assert store.commit(staged, manifest) is True
    root = tmp_path / "store" / "features" / C.feature_set_id
    assert sorted(os.listdir(root / "shards" / "s-aaa")) == [
        "segments.parquet", "tensors.arrow", "tracks.parquet"]
    assert (root / "_manifests" / "s-aaa.json").exists()
    assert store.committed_track_ids(C.feature_set_id) == {"t1", "t2"}

    reader = TensorReader(store)
    assert len(reader) == 4  # 7 s -> 2 full + a 1.02 s tail; 2 s -> 1 padded
    m = reader.matrix("logmel", 0)
    assert m.shape == (128, C.segment_frames) and m.dtype == np.float32
    assert not m.flags.writeable  # a view of the memory map
    segments = read_table(store, C.feature_set_id, "segments")
    assert segments.num_rows == 4
    meta = read_metadata(segments.schema)
    assert meta["feature_set"] == C.feature_set_id and meta["config"] == C.to_dict()
    check_schema(read_table(store, C.feature_set_id, "tracks").schema, TRACKS_SCHEMA, "tracks")


def test_failed_track_leaves_no_rows_even_after_spilling(store):
    staged, manifest = write_shard(store, "s-bbb", [("ok1", 4.0), ("bad", 30.0), ("ok2", 3.0)],
                                   spill_bytes=100_000, fail={"bad"})
    store.commit(staged, manifest)
    assert (manifest.counts.n_ok, manifest.counts.n_failed) == (2, 1)
    reader = TensorReader(store)
    assert set(reader.index.track_id) == {"ok1", "ok2"}
    tracks = read_table(store, C.feature_set_id, "tracks").to_pydict()
    assert dict(zip(tracks["track_id"], tracks["status"], strict=True)) == {
        "ok1": "ok", "bad": "failed", "ok2": "ok"}
    assert not any(name.startswith("spill") for name in os.listdir(
        store.shard_file(C.feature_set_id, "s-bbb", "tracks").rsplit("/", 1)[0]))


def test_spilled_track_equals_in_memory_track(store):
    a_dir, _a = write_shard(store, "s-mem", [("x", 20.0)])
    b_dir, _b = write_shard(store, "s-spill", [("x", 20.0)], spill_bytes=50_000)
    for d in (a_dir, b_dir):
        t = pq.read_table(f"{d}/segments.parquet")
        assert t.num_rows == 7
    from pyarrow import ipc
    ta = ipc.open_file(f"{a_dir}/tensors.arrow").read_all()
    tb = ipc.open_file(f"{b_dir}/tensors.arrow").read_all()
    assert ta.equals(tb)


def test_recover_removes_uncommitted_work(store, tmp_path):
    staged, manifest = write_shard(store, "s-ccc", [("t1", 3.0)])
    store.commit(staged, manifest)
    write_shard(store, "s-ddd", [("t2", 3.0)])  # staged, never committed
    orphan = tmp_path / "store" / "features" / C.feature_set_id / "shards" / "s-eee"
    orphan.mkdir()  # a crash between the move and the manifest
    (orphan / "segments.parquet").write_bytes(b"partial")
    assert store.recover() == 2
    assert not orphan.exists()
    assert store.committed_track_ids(C.feature_set_id) == {"t1"}


def test_commit_twice_keeps_one_copy(store):
    staged, manifest = write_shard(store, "s-fff", [("t1", 3.0)])
    assert store.commit(staged, manifest)
    staged2, _ = write_shard(store, "s-fff", [("t1", 3.0)])
    assert store.commit(staged2, manifest) is False
    assert len(TensorReader(store)) == 1


def test_lock_refuses_a_live_holder(store):
    import json
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(store.path("_lock.json"), "w") as fh:
            import socket
            json.dump({"host": socket.gethostname(), "pid": holder.pid, "since": "x"}, fh)
        with pytest.raises(StoreError, match="being written by pid"), store.lock():
            pass
    finally:
        holder.kill()
        holder.wait()
    with store.lock():  # the holder is gone: a stale lock is taken over
        assert os.path.exists(store.path("_lock.json"))
    assert not os.path.exists(store.path("_lock.json"))


def test_sources_cache_keeps_latest(store):
    store.record_sources([{"uri": "/a.wav", "size_bytes": 1, "mtime": 1.0,
                           "content_hash": "h1", "track_id": "h1"}])
    store.record_sources([{"uri": "/a.wav", "size_bytes": 2, "mtime": 2.0,
                           "content_hash": "h2", "track_id": "h2"}])
    assert store.known_sources() == {"/a.wav": (2, 2.0, "h2")}


def test_duckdb_views_and_outputs(store, tmp_path):
    staged, manifest = write_shard(store, "s-q", [("t1", 7.0), ("t2", 4.0)])
    store.commit(staged, manifest)
    con = connect(store)
    table = run_query(con, "SELECT t.track_id, count(*) AS n FROM segments s JOIN tracks t "
                           "USING (track_id) GROUP BY 1 ORDER BY 1")
    assert table.to_pydict() == {"track_id": ["t1", "t2"], "n": [3, 2]}
    assert "(2 rows)" in format_result(table, "table")
    assert format_result(table, "csv").splitlines() == ["track_id,n", "t1,3", "t2,2"]
    for ext in ("csv", "json", "parquet"):
        out = tmp_path / f"r.{ext}"
        write_result(table, str(out))
        assert out.stat().st_size > 0
    import duckdb
    assert duckdb.sql(f"SELECT sum(n) FROM '{tmp_path / 'r.parquet'}'").fetchall() == [(5,)]
    with pytest.raises(ParameterError, match="query failed"):
        run_query(con, "SELECT nope FROM tracks")
    with pytest.raises(ParameterError, match="must end in"):
        write_result(table, str(tmp_path / "r.xlsx"))


def test_empty_store_views_have_columns(tmp_path):
    s = FeatureStore(str(tmp_path / "empty"), create=True)
    con = connect(s)
    assert run_query(con, "SELECT count(*) AS n FROM tracks").to_pydict() == {"n": [0]}
    assert "status" in run_query(con, "SELECT * FROM tracks").column_names


def test_check_schema_reports_drift():
    import pyarrow as pa
    with pytest.raises(SchemaError, match="missing"):
        check_schema(pa.schema([pa.field("track_id", pa.string())]), TRACKS_SCHEMA, "tracks")


def test_reading_every_tensor_copies_nothing(store, monkeypatch):
    """Rows come from the memory-mapped record batches: no concatenation, no copy in RAM."""
    import tracemalloc

    from featurestore import writer

    monkeypatch.setattr(writer, "ROWS_PER_BATCH", 4)  # many record batches per shard
    staged, manifest = write_shard(store, "s-many", [(f"t{i}", 12.0) for i in range(8)])
    store.commit(staged, manifest)
    reader = TensorReader(store)
    assert len(reader) == 32 and len(reader.chunks) > 2
    import pyarrow as pa

    total = 32 * 128 * C.segment_frames * 4
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    for i in range(len(reader)):
        m = reader.matrix("logmel", i)
        assert not m.flags.owndata and not m.flags.writeable
        float(m[0, 0])
    _, peak = tracemalloc.get_traced_memory()  # numpy's allocations
    tracemalloc.stop()
    arrow = pa.total_allocated_bytes() - arrow_before  # Arrow's (a concatenation would be here)
    assert peak < total / 20 and arrow < total / 20, (peak, arrow, total)
    rows = [i for i in range(len(reader)) if reader.index.track_id[i] == "t3"]
    assert [int(reader.index.segment[i]) for i in rows] == [0, 1, 2, 3]
