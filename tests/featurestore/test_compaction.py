"""Compaction keeps file counts flat as commits add up, and never breaks a reader: a query and a
training read running across a compaction see one consistent snapshot, and a pinned (recorded)
training set stays readable even after a vacuum with no retention."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from factories import write_shard

from featurestore.maintenance import compact
from featurestore.query import connect, run_query
from featurestore.reader import TensorReader
from featurestore.store import FeatureStore
from tasks.config import FeatureConfig

FS = FeatureConfig().feature_set_id


@pytest.fixture
def store(tmp_path):
    """A store of 8 shards committed one by one (8 commits per table, as 8 nightly runs)."""
    s = FeatureStore(str(tmp_path / "store"), create=True)
    s.register_feature_set(FeatureConfig())
    for i in range(8):
        written, _ = write_shard(s, f"s-{i}", [(f"t{i}a", 4.0), (f"t{i}b", 7.0)])
        s.commit_shards([written])
    return s


def counts(con):
    return run_query(con, "SELECT (SELECT count(*) FROM tracks) AS t, (SELECT count(*) FROM "
                          "segments) AS s, (SELECT round(sum(centroid_mean), 3) FROM segments) "
                          "AS c").to_pylist()[0]


def test_compaction_makes_one_file_per_table_and_changes_no_row(store):
    before = counts(connect(store))
    assert len(store.files(FS, "segments")) == 8
    report = compact(store)
    by_table = {t.table.rsplit("/", 1)[-1]: t for t in report.tables}
    assert by_table["segments"].files_before == 8 and by_table["segments"].files_after == 1
    assert by_table["tracks"].files_after == 1
    assert len(store.files(FS, "segments")) == 1
    assert counts(connect(store)) == before == {"t": 16, "s": before["s"], "c": before["c"]}
    assert before["s"] == 8 * (2 + 3)  # 4 s -> 2 segments, 7 s -> 3 segments


def test_readers_across_a_compaction_see_one_snapshot(store):
    con = connect(store)  # a query opened before: its views name the pre-compaction files
    reader = TensorReader(store, FS)  # a training read in progress
    expected = counts(con)
    first = [np.array(reader.matrix("logmel", i)) for i in range(len(reader))]
    done = threading.Event()
    seen = []

    def query_while_compacting():
        while not done.is_set():
            seen.append(counts(con))

    thread = threading.Thread(target=query_while_compacting)
    thread.start()
    try:
        compact(store)  # default retention: the replaced files stay for running readers
    finally:
        done.set()
        thread.join()
    assert seen and all(c == expected for c in seen)
    assert counts(con) == expected  # still readable after the compaction committed
    again = [np.array(reader.matrix("logmel", i)) for i in range(len(reader))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert counts(connect(store)) == expected


def test_a_pinned_training_set_survives_a_vacuum_without_retention(store):
    pinned = store.versions_as_of(FS, 4)  # the training set after the 4th nightly commit
    store.pin(FS, pinned, "model m v1")
    old = TensorReader(store, FS, version=pinned["segments"])
    want = {(t, int(s)) for t, s in zip(old.index.track_id, old.index.segment, strict=True)}
    compact(store, retention_hours=0)
    con = connect(store, as_of=pinned)
    assert run_query(con, "SELECT count(*) AS n FROM tracks").to_pylist() == [{"n": 8}]
    again = TensorReader(store, FS, version=pinned["segments"])
    assert {(t, int(s)) for t, s in zip(again.index.track_id, again.index.segment,
                                        strict=True)} == want
    assert len(again) == len(old) and len(again) < len(TensorReader(store, FS))


def test_committed_ids_follow_other_writers_and_compaction(store):
    ids = store.committed_track_ids(FS)  # this object caches them per data file
    assert len(ids) == 16
    other = FeatureStore(store.url)  # another writer commits a shard
    written, _ = write_shard(other, "s-new", [("tnew", 4.0)])
    other.commit_shards([written])
    assert store.committed_track_ids(FS) == ids | {"tnew"}
    compact(store)  # every file replaced by one
    assert store.committed_track_ids(FS) == ids | {"tnew"}
    table = store.table_path(FS, "tracks")
    from featurestore import tables

    tables.open_table(store, table).delete("track_id = 'tnew'")  # a repair removes a track
    assert store.committed_track_ids(FS) == ids


def test_a_read_of_some_shards_opens_only_their_files_before_and_after_compaction(store):
    import pyarrow.dataset as ds

    from featurestore import tables

    want = ["s-1", "s-5"]

    def opened():
        table = tables.open_table(store, store.table_path(FS, "segments"))
        return len(tables.snapshot_dataset(store, table, tables.shard_file_filter(want)).files)

    def rows(t):
        return sorted(zip(t["shard"].to_pylist(), t["track_id"].to_pylist(),
                          t["segment"].to_pylist(), strict=True))

    filtered = store.read(FS, "segments", filter=ds.field("shard").isin(want))
    got = store.read(FS, "segments", shards=want)
    assert rows(got) == rows(filtered) and {s for s, _, _ in rows(got)} == set(want)
    assert got.num_rows == 2 * (2 + 3)
    assert opened() == 2  # the two shards' own files, not the other six
    compact(store)  # one file of every shard: a shard's name no longer says what it holds
    assert opened() == 1
    assert rows(store.read(FS, "segments", shards=want)) == rows(got)
    # a filter and shards together: both hold
    one = store.read(FS, "segments", filter=ds.field("track_id") == "t1a", shards=want)
    assert {t for _, t, _ in rows(one)} == {"t1a"}
