"""`mtag verify` names every damaged file; `--repair` quarantines it and removes exactly the
tracks it held, so the next ingest processes them again, and leaves the rest of the store
queryable and untouched."""

from __future__ import annotations

import pytest
from factories import write_shard

from featurestore.query import connect, run_query
from featurestore.store import FeatureStore
from featurestore.verify import repair, verify
from tasks.config import FeatureConfig
from tasks.errors import StoreError

FS = FeatureConfig().feature_set_id


@pytest.fixture
def store(tmp_path):
    s = FeatureStore(str(tmp_path / "store"), create=True)
    s.register_feature_set(FeatureConfig())
    for i in range(3):
        written, _ = write_shard(s, f"s-{i}", [(f"t{i}a", 4.0), (f"t{i}b", 7.0)])
        s.commit_shards([written])
    return s


def n_tracks(store):
    return run_query(connect(store), "SELECT count(*) AS n FROM tracks").to_pylist()[0]["n"]


def segments_file_of(store, shard):
    for path in store.files(FS, "segments"):
        if f"/{shard}-" in path:
            return path
    raise AssertionError(shard)


def test_a_sound_store_verifies(store):
    report = verify(store)
    assert report.ok, report.render()
    assert (report.tables, report.files, report.tensors_files) == (2, 6, 3)  # no sources yet
    assert report.rows == 6 + 3 * (2 + 3)


def test_a_truncated_segments_file_is_named_and_repaired(store):
    victim = segments_file_of(store, "s-1")
    with open(victim, "r+b") as fh:
        fh.truncate(200)
    report = verify(store)
    kinds = [p.kind for p in report.problems]
    assert kinds[0] == "size" and set(kinds) <= {"size", "unreadable"}  # the table, then
    assert victim in report.problems[0].where and "--repair" in report.render()  # the file
    assert n_tracks(store) == 6  # the other table is still queryable
    fixed = repair(store)
    assert (fixed.files_quarantined, fixed.tracks_removed, fixed.problems_left) == (1, 2, 0)
    assert verify(store).ok
    ids = run_query(connect(store), "SELECT track_id FROM tracks ORDER BY 1")
    assert ids["track_id"].to_pylist() == ["t0a", "t0b", "t2a", "t2b"]
    assert store.fs.glob(store.path("_quarantine", "*", "features", FS, "segments", "*"))


def test_a_damaged_tensors_file_removes_its_tracks(store):
    path = store.tensor_path(FS, store.manifests(FS)[0].tensor_file)
    with open(path, "wb") as fh:
        fh.write(b"not an arrow file")
    report = verify(store)
    assert [p.kind for p in report.problems] == ["tensors"] and path in report.problems[0].where
    fixed = repair(store)
    assert fixed.tracks_removed == 2 and fixed.problems_left == 0
    assert n_tracks(store) == 4 and verify(store).ok


def test_a_missing_tracks_file_and_a_garbage_record(store):
    victim = next(p for p in store.files(FS, "tracks") if "/s-2-" in p)
    store.fs.rm(victim)
    report = verify(store)
    assert [p.kind for p in report.problems] == ["missing-file", "incomplete"] or \
        "missing-file" in {p.kind for p in report.problems}
    fixed = repair(store)
    assert fixed.problems_left == 0 and n_tracks(store) == 4
    segs = run_query(connect(store), "SELECT count(*) AS n FROM segments").to_pylist()
    assert segs == [{"n": 2 * (2 + 3)}]  # s-2's segments went with its tracks
    with open(store.path("features", FS, "featureset.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(StoreError, match=r"damaged store record .*featureset\.json"):
        store.config(FS)
