"""The feature store on Delta tables: shard files written into place, commits of shard groups
under the commit lease, crash recovery, snapshots by version, readers and DuckDB views."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from factories import write_shard

from featurestore import tables
from featurestore.lease import CommitLease
from featurestore.query import connect, format_result, run_query, write_result
from featurestore.reader import TensorReader, read_table
from featurestore.schema import TRACKS_SCHEMA, check_schema, read_metadata, segments_schema
from featurestore.store import STORE_FORMAT, FeatureStore, ShardCounts
from tasks.config import FeatureConfig
from tasks.errors import ParameterError, SchemaError, StoreError

C = FeatureConfig()
FS = C.feature_set_id


def sql(store, query, **kw):
    return run_query(connect(store, FS, **kw), query).to_pylist()


def read_tensors(store, tensor_file):
    return ipc.open_file(store.tensor_path(FS, tensor_file)).read_all()


@pytest.fixture
def store(tmp_path):
    s = FeatureStore(str(tmp_path / "store"), create=True)
    s.register_feature_set(C)
    return s


def test_missing_store_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(str(tmp_path / "nowhere"))


def test_new_store_layout(store, tmp_path):
    root = tmp_path / "store"
    assert json.loads((root / "store.json").read_text())["format"] == STORE_FORMAT == 2
    fs_dir = root / "features" / FS
    assert sorted(os.listdir(fs_dir)) == ["featureset.json", "segments", "tracks"]
    for table in ("tracks", "segments"):
        assert os.listdir(fs_dir / table) == ["_delta_log"]
    assert store.table_versions(FS) == {"tracks": 0, "segments": 0}
    assert store.register_feature_set(C) == FS  # idempotent: no new versions
    assert store.table_versions(FS) == {"tracks": 0, "segments": 0}
    assert store.config(FS) == C


def test_old_format_is_refused(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    (root / "store.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(StoreError, match="mtag migrate") as err:
        FeatureStore(str(root))
    assert "format 1" in str(err.value)
    assert FeatureStore(str(root), any_format=True).format == 1  # only `mtag migrate` does


def test_shard_round_trip_with_exact_names(store, tmp_path):
    written, _ = write_shard(store, "s-aaa", [("t1", 7.0), ("t2", 2.0)])
    root = tmp_path / "store" / "features" / FS
    assert written.shard_id == "s-aaa" and written.feature_set == FS
    assert written.counts == ShardCounts(n_tracks=2, n_ok=2, n_failed=0, n_segments=4,
                                         audio_s=pytest.approx(9.0), track_ids=["t1", "t2"])
    # files are written into place: one tensors file, one Parquet file per table
    assert written.tensor_file.startswith("tensors/s-aaa-")
    assert written.tensor_file.endswith(".arrow")
    assert os.listdir(root / "tensors") == [written.tensor_file.split("/")[1]]
    assert written.tracks_file.rows == 2 and written.segments_file.rows == 4
    for table, f in (("tracks", written.tracks_file), ("segments", written.segments_file)):
        assert f.path.startswith("s-aaa-") and f.path.endswith(".parquet")
        assert sorted(os.listdir(root / table)) == sorted(["_delta_log", f.path])
        assert os.path.getsize(root / table / f.path) == f.size
        assert json.loads(f.stats)["numRecords"] == f.rows
    seg_meta = read_metadata(pq.read_schema(root / "segments" / written.segments_file.path))
    assert seg_meta["feature_set"] == FS and seg_meta["config"] == C.to_dict()
    tensors = read_tensors(store, written.tensor_file)
    assert read_metadata(tensors.schema)["shapes"] == {"logmel": [128, C.segment_frames],
                                                       "mfcc": [C.n_mfcc, C.segment_frames]}

    # nothing is visible before the commit
    assert store.committed_track_ids(FS) == set()
    assert store.manifests(FS) == [] and not store.has_tracks(FS)
    assert store.files(FS, "tracks") == [] and store.files(FS, "tensors") == []
    assert len(TensorReader(store, FS)) == 0
    assert sql(store, "SELECT (SELECT count(*) FROM tracks) AS t, "
                      "(SELECT count(*) FROM segments) AS s") == [{"t": 0, "s": 0}]

    result = store.commit_shards([written], run="run-1")
    assert (result.committed, result.dropped_tracks, result.tracks_version) == (["s-aaa"], 0, 1)
    assert store.table_versions(FS) == {"tracks": 1, "segments": 1}
    assert store.committed_track_ids(FS) == {"t1", "t2"}
    assert store.default_feature_set() == FS
    [manifest] = store.manifests(FS)
    assert (manifest.shard_id, manifest.feature_set, manifest.tensor_file) == (
        "s-aaa", FS, written.tensor_file)
    assert manifest.counts == written.counts
    # one commit per table, its metadata names the shards and the run
    meta = tables.open_table(store, store.table_path(FS, "tracks")).history(1)[0]
    assert meta["mtag.operation"] == "ingest" and meta["mtag.run"] == "run-1"
    assert json.loads(meta["mtag.shards"]) == ["s-aaa"]
    assert store.files(FS, "tracks") == [str(root / "tracks" / written.tracks_file.path)]
    assert store.files(FS, "tensors") == [store.tensor_path(FS, written.tensor_file)]

    segments = read_table(store, FS, "segments")
    assert segments.num_rows == 4
    check_schema(segments.schema, segments_schema(C), "segments")
    check_schema(read_table(store, FS, "tracks").schema, TRACKS_SCHEMA, "tracks")
    assert set(segments["shard"].to_pylist()) == {"s-aaa"}
    assert set(segments["tensor_file"].to_pylist()) == {written.tensor_file}
    # tensor_row is the row of the tensors file holding that segment
    keys = list(zip(tensors["track_id"].to_pylist(), tensors["segment"].to_pylist(),
                    strict=True))
    rows = segments.to_pydict()
    assert sorted(rows["tensor_row"]) == [0, 1, 2, 3]
    for tid, seg, row in zip(rows["track_id"], rows["segment"], rows["tensor_row"],
                             strict=True):
        assert keys[row] == (tid, seg)
    assert sorted(zip(rows["track_id"], rows["segment"], strict=True)) == [
        ("t1", 0), ("t1", 1), ("t1", 2), ("t2", 0)]

    reader = TensorReader(store)
    assert len(reader) == 4  # 7 s -> 2 full + a 1.02 s tail; 2 s -> 1 padded
    m = reader.matrix("logmel", 0)
    assert m.shape == (128, C.segment_frames) and m.dtype == np.float32
    assert not m.flags.writeable  # a view of the memory map
    row = rows["tensor_row"][rows["track_id"].index("t2")]
    np.testing.assert_array_equal(
        reader.matrix("mfcc", row),
        tensors["mfcc"][row].values.to_numpy().reshape(C.n_mfcc, C.segment_frames))


def test_float_columns_are_plain_and_the_rest_zstd(store, tmp_path):
    """Floating-point leaves (summary statistics, lists of floats) are written uncompressed
    without a dictionary, every other leaf with zstd and one; DuckDB reads the values back."""
    written, _ = write_shard(store, "s-enc", [("t1", 7.0), ("t2", 2.0)])
    path = tmp_path / "store" / "features" / FS / "segments" / written.segments_file.path
    meta = pq.ParquetFile(path).metadata
    group = meta.row_group(0)
    seen = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    floats = [p for p, c in seen.items() if c.physical_type in ("FLOAT", "DOUBLE")]
    others = [p for p in seen if p not in floats]
    assert "mfcc_mean_00" in floats and "track_id" in others and "segment" in others
    for p in floats:
        assert seen[p].compression == "UNCOMPRESSED", p
        assert "RLE_DICTIONARY" not in seen[p].encodings and not seen[p].has_dictionary_page, p
    for p in others:
        assert seen[p].compression == "ZSTD", p
        assert seen[p].has_dictionary_page, p
    stored = pq.read_table(path)
    import duckdb
    back = duckdb.sql(f"SELECT track_id, segment, mfcc_mean_00 FROM '{path}' "
                      "ORDER BY track_id, segment").fetch_arrow_table()
    want = stored.select(["track_id", "segment", "mfcc_mean_00"]).sort_by(
        [("track_id", "ascending"), ("segment", "ascending")])
    assert back.to_pydict() == want.to_pydict()
    # a nested float leaf is named by its Parquet path, as the writer matches it
    compression, dictionary = tables.encodings(pa.schema([
        ("e", pa.list_(pa.float32())), ("s", pa.string()),
        ("m", pa.struct([("k", pa.float64()), ("n", pa.int64())]))]))
    assert compression == {"e.list.element": "none", "s": "zstd", "m.k": "none",
                           "m.n": "zstd"}
    assert dictionary == ["s", "m.n"]


def test_failed_track_leaves_no_rows_even_after_spilling(store):
    written, scratch = write_shard(store, "s-bbb", [("ok1", 4.0), ("bad", 30.0), ("ok2", 3.0)],
                                   spill_bytes=100_000, fail={"bad"}, staging=True)
    assert (written.counts.n_ok, written.counts.n_failed) == (2, 1)
    assert written.counts.track_ids == ["ok1", "bad", "ok2"]
    assert store.fs.ls(scratch) == []  # the spill file is gone
    tensors = read_tensors(store, written.tensor_file)
    assert set(tensors["track_id"].to_pylist()) == {"ok1", "ok2"}
    assert store.commit_shards([written]).committed == ["s-bbb"]
    reader = TensorReader(store)
    assert set(reader.index.track_id) == {"ok1", "ok2"}
    assert len(reader) == tensors.num_rows == written.counts.n_segments
    tracks = read_table(store, FS, "tracks").to_pydict()
    assert dict(zip(tracks["track_id"], tracks["status"], strict=True)) == {
        "ok1": "ok", "bad": "failed", "ok2": "ok"}
    bad = tracks["track_id"].index("bad")
    assert (tracks["n_segments"][bad], tracks["tensor_file"][bad]) == (0, None)
    assert tracks["error"][bad] == "boom"
    assert set(read_table(store, FS, "segments")["track_id"].to_pylist()) == {"ok1", "ok2"}
    [manifest] = store.manifests(FS)
    assert (manifest.counts.n_ok, manifest.counts.n_failed) == (2, 1)


def test_spilled_track_equals_in_memory_track(store):
    a, _ = write_shard(store, "s-mem", [("x", 20.0)])
    b, _ = write_shard(store, "s-spill", [("x", 20.0)], spill_bytes=50_000)
    seg = {}
    for w in (a, b):
        assert w.segments_file.rows == w.counts.n_segments == 7
        t = pq.read_table(store.table_path(FS, "segments") + "/" + w.segments_file.path)
        seg[w.shard_id] = t.drop_columns(["shard", "tensor_file"])
    assert seg["s-mem"].equals(seg["s-spill"])
    ta = read_tensors(store, a.tensor_file)
    tb = read_tensors(store, b.tensor_file)
    assert ta.num_rows == 7 and ta.equals(tb)
    # read back through the committed snapshot too
    store.commit_shards([b])
    reader = TensorReader(store)
    assert len(reader) == 7 and list(reader.index.segment) == list(range(7))
    for i in range(7):
        np.testing.assert_array_equal(
            reader.matrix("logmel", i),
            ta["logmel"][i].values.to_numpy().reshape(128, C.segment_frames))


def test_commit_twice_keeps_one_copy(store):
    first, _ = write_shard(store, "s-fff", [("t1", 3.0)])
    assert store.commit_shards([first]).committed == ["s-fff"]
    again, _ = write_shard(store, "s-fff", [("t1", 3.0)])  # a retried task
    result = store.commit_shards([again])
    assert (result.committed, result.dropped_tracks, result.tracks_version) == ([], 1, 1)
    assert store.table_versions(FS) == {"tracks": 1, "segments": 1}  # nothing committed
    assert len(TensorReader(store)) == 1
    assert sql(store, "SELECT (SELECT count(*) FROM tracks) AS t, "
                      "(SELECT count(*) FROM segments) AS s") == [{"t": 1, "s": 1}]
    assert store.files(FS, "tensors") == [store.tensor_path(FS, first.tensor_file)]
    assert store.commit_shards([]).committed == []


def test_racing_writers_keep_each_track_once(store):
    """Two writers that took overlapping tracks: the later commit drops the overlap."""
    a, _ = write_shard(store, "s-a", [("t1", 7.0), ("t2", 2.0)])
    b, _ = write_shard(store, "s-b", [("t2", 2.0), ("t3", 4.0)])
    c, _ = write_shard(store, "s-c", [("t3", 4.0), ("t4", 2.0)])
    assert store.commit_shards([a]).dropped_tracks == 0
    result = FeatureStore(store.url).commit_shards([b, c])  # another process, one group
    assert (result.committed, result.dropped_tracks) == (["s-b", "s-c"], 2)
    assert store.committed_track_ids(FS) == {"t1", "t2", "t3", "t4"}
    got = {m.shard_id: m.counts.track_ids for m in store.manifests(FS)}
    assert got == {"s-a": ["t1", "t2"], "s-b": ["t3"], "s-c": ["t4"]}
    assert sql(store, "SELECT track_id, shard, count(*) AS n FROM tracks GROUP BY ALL "
                      "ORDER BY 1") == [
        {"track_id": "t1", "shard": "s-a", "n": 1}, {"track_id": "t2", "shard": "s-a", "n": 1},
        {"track_id": "t3", "shard": "s-b", "n": 1}, {"track_id": "t4", "shard": "s-c", "n": 1}]
    assert sql(store, "SELECT track_id, count(*) AS n, count(DISTINCT segment) AS d, "
                      "any_value(shard) AS shard FROM segments GROUP BY 1 ORDER BY 1") == [
        {"track_id": "t1", "n": 3, "d": 3, "shard": "s-a"},
        {"track_id": "t2", "n": 1, "d": 1, "shard": "s-a"},
        {"track_id": "t3", "n": 2, "d": 2, "shard": "s-b"},
        {"track_id": "t4", "n": 1, "d": 1, "shard": "s-c"}]
    # the rewritten shards' tensor rows still point at their own segments
    seg = read_table(store, FS, "segments").to_pydict()
    for tid, s, f, row in zip(seg["track_id"], seg["segment"], seg["tensor_file"],
                              seg["tensor_row"], strict=True):
        t = read_tensors(store, f)
        assert (t["track_id"][row].as_py(), t["segment"][row].as_py()) == (tid, s)
    # a reader of the snapshot sees each committed segment once
    reader = TensorReader(store)
    pairs = sorted(zip(reader.index.track_id.tolist(), reader.index.segment.tolist(),
                       strict=True))
    assert len(reader) == 7, (
        "BUG featurestore/reader.py TensorReader: it indexes every row of every tensors "
        "file the snapshot names, so the rows of tracks dropped by commit_shards (still in "
        f"s-b's and s-c's tensors files) are served twice: {pairs}")


def test_crash_between_the_two_transactions_is_rolled_back(store, monkeypatch):
    done, _ = write_shard(store, "s-ccc", [("t1", 3.0)])
    store.commit_shards([done])
    write_shard(store, "s-ddd", [("t3", 3.0)])  # written, never committed
    crashed, _ = write_shard(store, "s-eee", [("t2", 7.0)])

    real = tables.commit_files
    calls = []

    def crash_before_tracks(store_, path, *args, **kwargs):
        calls.append(path.rsplit("/", 1)[1])
        if path.endswith("/tracks"):
            raise KeyboardInterrupt("killed between the transactions")
        return real(store_, path, *args, **kwargs)

    monkeypatch.setattr(tables, "commit_files", crash_before_tracks)
    with pytest.raises(KeyboardInterrupt):
        store.commit_shards([crashed])
    monkeypatch.undo()
    assert calls == ["segments", "tracks"]
    # the orphan segments are committed, the tracks are not, and the intent says so
    [intent] = store.fs.glob(store.path("_locks", "intent-*.json"))
    record = store.read_record(intent)
    assert record["shards"] == ["s-eee"]
    assert (record["check"], record["rollback"]) == (store.table_path(FS, "tracks"),
                                                     store.table_path(FS, "segments"))
    assert store.committed_track_ids(FS) == {"t1"}
    assert sql(store, "SELECT shard, count(*) AS n FROM segments GROUP BY 1 ORDER BY 1") == [
        {"shard": "s-ccc", "n": 1}, {"shard": "s-eee", "n": 3}]

    # another process recovers: 1 shard rolled back
    other = FeatureStore(store.url)
    assert other.recover() == 1
    assert store.fs.glob(store.path("_locks", "intent-*.json")) == []
    assert not store.fs.exists(store.path("_staging"))
    assert store.committed_track_ids(FS) == {"t1"}
    assert sql(store, "SELECT shard, count(*) AS n FROM segments GROUP BY 1") == [
        {"shard": "s-ccc", "n": 1}]
    assert len(TensorReader(store)) == 1
    assert other.recover() == 0  # nothing left

    # the crashed shard can be done again, once
    redo, _ = write_shard(store, "s-eee", [("t2", 7.0)])
    assert store.commit_shards([redo]).committed == ["s-eee"]
    assert sql(store, "SELECT shard, count(*) AS n FROM segments GROUP BY 1 ORDER BY 1") == [
        {"shard": "s-ccc", "n": 1}, {"shard": "s-eee", "n": 3}]


def test_intent_of_a_finished_pair_is_removed_without_rollback(store):
    """A crash after the second transaction but before the intent went: nothing to undo."""
    written, _ = write_shard(store, "s-ok", [("t1", 7.0)])
    store.commit_shards([written])
    versions = store.table_versions(FS)
    store.write_record(store.path("_locks", "intent-0123456789abcdef.json"), {
        "check": store.table_path(FS, "tracks"), "rollback": store.table_path(FS, "segments"),
        "shards": ["s-ok"], "created_at": "2026-01-01T00:00:00+00:00"})
    assert store.recover() == 0  # nothing rolled back
    assert store.fs.glob(store.path("_locks", "intent-*.json")) == []
    assert store.table_versions(FS) == versions
    assert len(read_table(store, FS, "segments")) == 3


def test_an_intent_written_by_hand_rolls_back_committed_segments(store):
    """The pieces of commit_pair by hand: intent, segments commit, no tracks commit."""
    written, _ = write_shard(store, "s-half", [("t1", 3.0)])
    store.write_record(store.path("_locks", "intent-fedcba9876543210.json"), {
        "check": store.table_path(FS, "tracks"), "rollback": store.table_path(FS, "segments"),
        "shards": ["s-half"], "created_at": "2026-01-01T00:00:00+00:00"})
    tables.commit_files(store, store.table_path(FS, "segments"), [written.segments_file],
                        segments_schema(C), metadata={"mtag.shards": ["s-half"]})
    assert read_table(store, FS, "segments").num_rows == 1
    with CommitLease(store, timeout=5):
        assert store.resolve_intents() == 1
    assert store.read(FS, "segments").num_rows == 0
    assert store.fs.glob(store.path("_locks", "intent-*.json")) == []


def test_scratch_folders_outlive_recover_and_go_with_compaction(store):
    """Scratch folders of attempts that died: another writer's running task may own one, so
    recover leaves them; compaction deletes those older than its retention."""
    from featurestore.maintenance import compact

    for shard in ("s-x", "s-y", "s-z"):
        write_shard(store, shard, [(shard, 2.0)], staging=True)
    assert len(store.fs.ls(store.path("_staging", FS))) == 3
    assert store.recover() == 0
    assert len(store.fs.ls(store.path("_staging", FS))) == 3
    assert compact(store).scratch_deleted == 0  # younger than a week
    assert compact(store, retention_hours=0).scratch_deleted == 3
    assert not store.fs.glob(store.path("_staging", FS, "*"))


def test_a_held_commit_lease_makes_other_committers_wait(store, monkeypatch):
    written, _ = write_shard(store, "s-l", [("t1", 3.0)])
    other = FeatureStore(store.url)  # another process's view of the store
    with store.commit_lease(ttl=30):
        with pytest.raises(StoreError, match=r"commit lease \(generation 1\) is held by pid"):
            CommitLease(other, timeout=0.5).acquire()
        monkeypatch.setattr(other, "commit_lease",
                            lambda **kw: CommitLease(other, timeout=0.5, poll=0.05))
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="held by pid"):
            other.commit_shards([written])
        assert time.monotonic() - t0 >= 0.5
        monkeypatch.undo()
        assert other.committed_track_ids(FS) == set()

        # with the default timeout it waits for the holder instead
        outcome = {}
        waiter = threading.Thread(target=lambda: outcome.update(r=other.commit_shards([written])))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and other.committed_track_ids(FS) == set()
    waiter.join(30)
    assert not waiter.is_alive() and outcome["r"].committed == ["s-l"]
    assert store.committed_track_ids(FS) == {"t1"}


def test_versions_as_of_reads_an_earlier_snapshot(store):
    first, _ = write_shard(store, "s-1", [("t1", 7.0)])
    v1 = store.commit_shards([first]).tracks_version
    at_first = store.table_versions(FS)
    second, _ = write_shard(store, "s-2", [("t2", 4.0)])
    v2 = store.commit_shards([second]).tracks_version
    assert (v1, v2) == (1, 2) and at_first == {"tracks": 1, "segments": 1}
    assert store.versions_as_of(FS) == {"tracks": 2, "segments": 2}
    assert store.versions_as_of(FS, {"tracks": 1, "segments": "1"}) == at_first
    # a timestamp between the two commits names the first snapshot
    stamp = next(h["timestamp"] for h in tables.open_table(
        store, store.table_path(FS, "tracks")).history() if h["version"] == v1)
    when = dt.datetime.fromtimestamp(stamp / 1000 + 0.001, dt.UTC).isoformat()
    assert store.versions_as_of(FS, when) == at_first

    versions = at_first
    assert set(store.read(FS, "tracks", version=versions["tracks"])["track_id"].to_pylist()) \
        == {"t1"}
    assert set(store.read(FS, "segments", version=versions["segments"])["shard"].to_pylist()) \
        == {"s-1"}
    assert [m.shard_id for m in store.manifests(FS, versions["tracks"])] == ["s-1"]
    assert len(TensorReader(store, FS, version=versions["segments"])) == 3
    assert len(TensorReader(store, FS)) == 5
    query = ("SELECT (SELECT string_agg(track_id, ',' ORDER BY track_id) FROM tracks) AS t, "
             "(SELECT count(*) FROM segments) AS s")
    assert sql(store, query, as_of=versions) == [{"t": "t1", "s": 3}]
    assert sql(store, query, as_of=when) == [{"t": "t1", "s": 3}]
    assert sql(store, query) == [{"t": "t1,t2", "s": 5}]
    with pytest.raises(StoreError, match="no version"):
        store.versions_as_of(FS, 99)

    # a tracks version number: that version, with the segments version of its commit
    for as_of in (v1, str(v1)):
        got = store.versions_as_of(FS, as_of)
        assert got == at_first, (
            "BUG featurestore/store.py FeatureStore.versions_as_of: it reads the commit "
            "timestamp from history() of the table loaded at the old version, and delta-rs "
            "numbers that history from the loaded version down while listing every later "
            f"commit too, so 'version {as_of}' gets the newest commit's timestamp: {got}")


def test_sources_cache_keeps_latest(store):
    assert store.known_sources() == {}
    store.record_sources([])  # nothing to append
    assert store.source_files() == []
    store.record_sources([{"uri": "/a.wav", "size_bytes": 1, "mtime": 1.0,
                           "content_hash": "h1", "track_id": "h1"}])
    store.record_sources([{"uri": "/a.wav", "size_bytes": 2, "mtime": 2.0,
                           "content_hash": "h2", "track_id": "h2"},
                          {"uri": "/b.wav", "size_bytes": -1, "mtime": 0.0,
                           "content_hash": None, "track_id": None}])
    assert store.known_sources() == {"/a.wav": (2, 2.0, "h2")}
    assert len(store.source_files()) == 2
    assert run_query(connect(store), "SELECT uri, size_bytes, content_hash FROM sources "
                                     "ORDER BY 1").to_pylist() == [
        {"uri": "/a.wav", "size_bytes": 2, "content_hash": "h2"},
        {"uri": "/b.wav", "size_bytes": -1, "content_hash": None}]


def test_duckdb_views_and_outputs(store, tmp_path):
    written, _ = write_shard(store, "s-q", [("t1", 7.0), ("t2", 4.0)])
    store.commit_shards([written])
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


def test_empty_store_views_have_columns(tmp_path, store):
    s = FeatureStore(str(tmp_path / "empty"), create=True)
    con = connect(s)
    assert run_query(con, "SELECT count(*) AS n FROM tracks").to_pydict() == {"n": [0]}
    assert run_query(con, "SELECT * FROM tracks").column_names == TRACKS_SCHEMA.names
    for view in ("segments", "sources", "scores", "segment_scores", "neighbours"):
        assert run_query(con, f"SELECT count(*) AS n FROM {view}").to_pydict() == {"n": [0]}
    # a registered feature set without commits: its own columns
    con = connect(store, FS)
    assert run_query(con, "SELECT * FROM segments").column_names == segments_schema(C).names


def test_check_schema_reports_drift():
    with pytest.raises(SchemaError, match="missing"):
        check_schema(pa.schema([pa.field("track_id", pa.string())]), TRACKS_SCHEMA, "tracks")
    with pytest.raises(SchemaError, match="wrong types"):
        check_schema(TRACKS_SCHEMA.set(0, pa.field("track_id", pa.int64())), TRACKS_SCHEMA,
                     "tracks")
    check_schema(TRACKS_SCHEMA, TRACKS_SCHEMA, "tracks")


def test_reading_every_tensor_copies_nothing(store, monkeypatch):
    """Rows come from the memory-mapped record batches: no concatenation, no copy in RAM."""
    import tracemalloc

    from featurestore import writer

    monkeypatch.setattr(writer, "ROWS_PER_BATCH", 4)  # many record batches per shard
    written, _ = write_shard(store, "s-many", [(f"t{i}", 12.0) for i in range(8)])
    store.commit_shards([written])
    reader = TensorReader(store)
    assert len(reader) == 32 and len(reader.chunks) > 2

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
