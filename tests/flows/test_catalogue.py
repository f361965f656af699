"""A catalogue that changes under the pipeline: replaced files supersede their old rows, deleted
files are marked gone and leave the current views (earlier table versions keep both), files
that come back are ingested again, transient failures are tried again and their new row
replaces the old, files that change while read are caught, truncated audio is flagged."""

from __future__ import annotations

import os
import shutil

import pytest
import soundfile as sf
from factories import music_like, write

from featurestore.query import connect, run_query
from featurestore.sources import SourceFile
from featurestore.store import FeatureStore
from featurestore.verify import verify
from flows.ingest import run_ingest
from flows.ingest_worker import probe_one, run_shard
from flows.records import ShardPlan
from tasks.config import FeatureConfig

pytestmark = pytest.mark.slow
C = FeatureConfig()
FS = C.feature_set_id


def ingest(source, store, dask_address, **kwargs):
    return run_ingest(str(source), str(store), dask_address=dask_address, progress=False,
                      **kwargs)


def q(store, sql, **kwargs):
    return run_query(connect(FeatureStore(str(store)), **kwargs), sql).to_pylist()


def current_paths(store):
    return sorted(r["path"].rsplit("/", 1)[1] for r in q(store, "SELECT path FROM tracks"))


def assert_consistent(store):
    """Every file once, no orphan segment, no duplicated key; verify passes."""
    assert q(store, "SELECT path, count(*) AS n FROM tracks GROUP BY 1 HAVING n > 1") == []
    assert q(store, "SELECT track_id, count(*) AS n FROM tracks GROUP BY 1 HAVING n > 1") == []
    assert q(store, "SELECT count(*) AS n FROM segments s ANTI JOIN tracks t "
                    "USING (track_id)") == [{"n": 0}]
    report = verify(FeatureStore(str(store)))
    assert report.ok, report.render()


def test_replaced_deleted_and_restored_files(tmp_path, dask_address):
    cat, store = tmp_path / "cat", tmp_path / "store"
    cat.mkdir()
    for i, name in enumerate("abcd"):
        write(str(cat / f"{name}.wav"), music_like(4.0 + i, 22050, seed=i), 22050)
    shutil.copy(cat / "a.wav", cat / "a-copy.wav")  # same bytes: one track, two paths
    first = ingest(cat, store, dask_address)
    assert (first.ok, first.duplicates) == (4, 1)
    old = {r["path"].rsplit("/", 1)[1]: r["track_id"] for r in q(store, "SELECT * FROM tracks")}
    v1 = FeatureStore(str(store)).versions_as_of(FS)

    write(str(cat / "b.wav"), music_like(5.0, 22050, seed=99), 22050)  # replaced
    c_bytes = (cat / "c.wav").read_bytes()
    os.remove(cat / "c.wav")  # deleted
    os.remove(cat / "a-copy.wav")  # the path its track row names (the first by URI) is
    # deleted, but its bytes live on in a.wav
    second = ingest(cat, store, dask_address)
    assert (second.ok, second.superseded, second.gone) == (1, 1, 2)
    assert "1 replaced files" in second.render() and "2 files no longer listed" in second.render()
    ids = {r["track_id"] for r in q(store, "SELECT track_id FROM tracks")}
    assert old["b.wav"] not in ids and old["c.wav"] not in ids
    assert old["a-copy.wav"] in ids  # still the content of a listed file
    assert len(ids) == 3
    assert q(store, "SELECT count(*) AS n FROM segments WHERE track_id IN (?, ?)".replace(
        "?", "'{}'").format(old["b.wav"], old["c.wav"])) == [{"n": 0}]
    gone = q(store, "SELECT uri FROM sources WHERE status = 'gone' ORDER BY uri")
    assert [r["uri"].rsplit("/", 1)[1] for r in gone] == ["a-copy.wav", "c.wav"]
    # history stays reachable: the tables as the first run left them
    assert len(q(store, "SELECT * FROM tracks", as_of=v1)) == 4
    assert_consistent(store)

    (cat / "c.wav").write_bytes(c_bytes)  # it comes back: ingested again
    third = ingest(cat, store, dask_address)
    assert third.ok == 1
    assert old["c.wav"] in {r["track_id"] for r in q(store, "SELECT track_id FROM tracks")}
    assert_consistent(store)

    os.remove(cat / "d.wav")  # only a deletion: no cluster, still retired
    fourth = run_ingest(str(cat), str(store), progress=False)
    assert (fourth.ok, fourth.gone) == (0, 1) and "Nothing to do" in fourth.render()
    assert "d.wav" not in current_paths(store)
    assert_consistent(store)


def test_a_source_mostly_missing_retires_nothing_unless_accepted(tmp_path):
    cat, store = tmp_path / "cat", tmp_path / "store"
    cat.mkdir()
    for i in range(12):
        write(str(cat / f"t{i:02d}.wav"), music_like(1.0, 22050, seed=i), 22050)
    run_ingest(str(cat), str(store), progress=False, n_workers=1)
    for i in range(11):
        os.remove(cat / f"t{i:02d}.wav")  # an unmounted disk looks like this
    held = run_ingest(str(cat), str(store), progress=False)
    assert held.gone_held == 11 and "--accept-removals" in held.render()
    assert len(current_paths(store)) == 12
    done = run_ingest(str(cat), str(store), progress=False, accept_removals=True)
    assert done.gone == 11 and current_paths(store) == ["t11.wav"]


def shard_of(store, paths):
    records = [probe_one(SourceFile(p, os.path.getsize(p), os.path.getmtime(p))) for p in paths]
    return records, ShardPlan(f"s-{len(paths)}-{os.path.basename(paths[0])}", FS,
                              tuple(records))


def test_a_transient_failure_is_tried_again_and_its_row_replaced(tmp_path, monkeypatch):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    store.register_feature_set(C)
    path = write(str(tmp_path / "slow.wav"), music_like(3.0, 22050, seed=1), 22050)
    records, plan = shard_of(store, [path])
    monkeypatch.setenv("MTAG_FILE_TIME_LIMIT_S", "-1")  # every decode is over its limit
    failed = run_shard(store.url, C.to_json(), plan)
    assert "time limit" in failed.errors[0][2]
    store.commit_shards([failed.written])
    assert store.retry_track_ids(FS) == {records[0].track_id}
    assert records[0].track_id not in store.committed_track_ids(FS)  # so it is planned again
    monkeypatch.delenv("MTAG_FILE_TIME_LIMIT_S")
    redone = run_shard(store.url, C.to_json(), plan)
    store.commit_shards([redone.written])
    rows = store.read(FS, "tracks", ["track_id", "status", "retry"]).to_pylist()
    assert rows == [{"track_id": records[0].track_id, "status": "ok", "retry": False}]
    assert store.retry_track_ids(FS) == set()
    # an undecodable file whose bytes are unchanged is final: not tried again
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\0\0\0\0WAVEjunkjunk")
    bad_records, bad_plan = shard_of(store, [str(bad)])
    store.commit_shards([run_shard(store.url, C.to_json(), bad_plan).written])
    assert bad_records[0].track_id in store.committed_track_ids(FS)
    assert not bad_records[0].retry


def test_a_file_rewritten_between_probe_and_decode_is_caught(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    store.register_feature_set(C)
    path = write(str(tmp_path / "x.wav"), music_like(3.0, 22050, seed=1), 22050)
    _, plan = shard_of(store, [path])
    write(path, music_like(3.0, 22050, seed=2), 22050)  # new bytes under the old hash
    result = run_shard(store.url, C.to_json(), plan)
    assert result.counts.n_ok == 0 and "changed since it was hashed" in result.errors[0][2]
    store.commit_shards([result.written])
    row = store.read(FS, "tracks", ["status", "retry"]).to_pylist()[0]
    assert row == {"status": "failed", "retry": True}


@pytest.mark.parametrize("fmt,ext", [("OGG", "ogg"), ("MP3", "mp3"), ("WAV", "wav")])
def test_truncated_audio_is_flagged(tmp_path, fmt, ext):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    store.register_feature_set(C)
    y = music_like(12.0, 44100, seed=3)
    full = tmp_path / f"full.{ext}"
    sf.write(str(full), y, 44100, format=fmt)
    cut = tmp_path / f"cut.{ext}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 5 // 12])
    _, plan = shard_of(store, [str(full), str(cut)])
    result = run_shard(store.url, C.to_json(), plan)
    store.commit_shards([result.written])
    rows = {r["path"].rsplit("/", 1)[1]: r for r in store.read(
        FS, "tracks", ["path", "status", "truncated", "warning", "duration_s"]).to_pylist()}
    assert rows[f"full.{ext}"]["status"] == "ok" and rows[f"full.{ext}"]["truncated"] is False
    assert rows[f"cut.{ext}"]["status"] == "ok" and rows[f"cut.{ext}"]["truncated"] is True
    assert rows[f"cut.{ext}"]["warning"].startswith("truncated: decoded")
