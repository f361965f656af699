"""The ingest flow on real components: a LocalCluster of 2 worker processes, Prefect's harness,
Parquet read back by DuckDB."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
from factories import awkward_catalogue, music_like, tone, write

from featurestore.query import connect, run_query
from featurestore.reader import TensorReader
from featurestore.store import FeatureStore
from flows.ingest import run_ingest
from tasks.config import FeatureConfig

pytestmark = pytest.mark.slow


def ingest(source, store, dask_address, **kwargs):
    return run_ingest(str(source), str(store), dask_address=dask_address, progress=False,
                      **kwargs)


def rows(store, sql):
    return run_query(connect(FeatureStore(str(store))), sql).to_pylist()


def assert_one_row_per_segment(store):
    dup = rows(store, "SELECT track_id, segment, count(*) AS n FROM segments "
                      "GROUP BY 1, 2 HAVING n > 1")
    assert dup == []
    missing = rows(store, "SELECT t.track_id FROM tracks t LEFT JOIN (SELECT track_id, "
                          "count(*) AS n FROM segments GROUP BY 1) s USING (track_id) "
                          "WHERE t.status = 'ok' AND coalesce(s.n, 0) <> t.n_segments")
    assert missing == []


def test_awkward_catalogue_then_rerun_is_a_no_op(tmp_path, dask_address):
    cat, store = tmp_path / "cat", tmp_path / "store"
    expected = awkward_catalogue(str(cat))
    summary = ingest(cat, store, dask_address)
    got = {os.path.relpath(r["path"], cat): r for r in rows(store, "SELECT * FROM tracks")}
    assert set(got) == set(expected)
    for name, status in expected.items():
        assert got[name]["status"] in status.split("|"), (name, got[name])
        if got[name]["status"] != "ok":
            assert got[name]["stage"] and got[name]["error"], name
    assert got["bad/nan inf.wav"]["stage"] == "decode"
    assert "non-finite" in got["bad/nan inf.wav"]["error"]
    assert got["other/cover.jpg"]["status"] == "unsupported"
    assert got["rates/six channels.wav"]["channels"] == 6
    assert got["rates/96k.wav"]["sample_rate"] == 96000
    assert got["edge/one sample.wav"]["n_segments"] == 1
    assert got["edge/silence.wav"]["peak_dbfs"] is None  # -inf is stored as null
    assert got["good/music.flac"]["duration_s"] == pytest.approx(7.0, abs=1e-3)
    assert_one_row_per_segment(store)
    ok = sum(r["status"] == "ok" for r in got.values())
    assert summary.ok == ok and summary.unsupported == 1
    assert summary.ok + summary.failed + summary.unsupported == len(expected)

    again = ingest(cat, store, dask_address)
    assert (again.ok, again.failed, again.unchanged) == (0, 0, len(expected))
    assert "Nothing to do" in again.render()


def test_added_renamed_and_changed_files(tmp_path, dask_address):
    cat, store = tmp_path / "cat", tmp_path / "store"
    for i in range(3):
        write(str(cat / f"t{i}.wav"), music_like(4.0, 22050, seed=i), 22050)
    first = ingest(cat, store, dask_address)
    assert first.ok == 3

    write(str(cat / "new.wav"), music_like(5.0, 22050, seed=10), 22050)
    os.rename(cat / "t0.wav", cat / "renamed t0.wav")
    write(str(cat / "t1.wav"), music_like(4.0, 22050, seed=99), 22050)  # new content
    second = ingest(cat, store, dask_address)
    assert second.ok == 2  # new.wav and the changed t1.wav; the renamed file is not redone
    assert second.duplicates == 1 and second.unchanged == 1
    srcs = rows(store, "SELECT uri FROM sources")
    assert any(r["uri"].endswith("renamed t0.wav") for r in srcs)
    assert_one_row_per_segment(store)
    # t1's old content left the current views (earlier versions keep it); t0 is a track still
    assert len(rows(store, "SELECT * FROM tracks")) == 4


def test_new_feature_config_writes_a_new_version_beside(tmp_path, dask_address):
    cat, store = tmp_path / "cat", tmp_path / "store"
    write(str(cat / "a.wav"), music_like(6.0, 22050, seed=1), 22050)
    ingest(cat, store, dask_address)
    ingest(cat, store, dask_address, config=FeatureConfig(segment_s=2.0, segment_hop_s=2.0))
    fstore = FeatureStore(str(store))
    sets = [r["feature_set"] for r in fstore.feature_sets()]
    assert len(sets) == 2 and sets[0] == FeatureConfig().feature_set_id
    counts = {fs: len(TensorReader(fstore, fs)) for fs in sets}
    assert counts == {sets[0]: 2, sets[1]: 3}
    assert TensorReader(fstore, sets[1]).matrix("logmel", 0).shape == (128, 86)


def test_worker_killed_mid_run_is_retried(tmp_path, dask_address):
    from distributed import Client

    cat, store = tmp_path / "cat", tmp_path / "store"
    for i in range(16):
        write(str(cat / f"t{i:02d}.wav"), tone(200 + 30 * i, 20.0, 22050, noise=0.05), 22050)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        s=ingest(cat, store, dask_address, shard_minutes=0.5)))
    thread.start()
    tensors = store / "features"
    deadline = time.time() + 120
    while time.time() < deadline and not any(tensors.glob("*/tensors/*.arrow")):
        time.sleep(0.05)
    with Client(dask_address) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    summary = result["s"]
    assert summary.ok == 16 and summary.shards_failed == 0
    assert_one_row_per_segment(store)
    assert len(rows(store, "SELECT * FROM segments")) == 16 * 7


def test_manifest_source(tmp_path, dask_address):
    cat, store = tmp_path / "cat", tmp_path / "store"
    write(str(cat / "x y" / "a.wav"), tone(300, 3.0), 22050)
    write(str(cat / "b.flac"), tone(500, 3.0), 22050)
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"uri\n{cat / 'x y' / 'a.wav'}\ncat/b.flac\n")
    shutil.copytree(cat, tmp_path / "cat2", dirs_exist_ok=True)
    summary = ingest(manifest, store, dask_address)
    assert summary.ok == 2 and summary.files == 2
