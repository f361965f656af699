"""``mtag migrate``: a real format-1 store (shards written from generated audio, then laid out
exactly as the previous release did) becomes format 2: the same shards, rows and tensors,
score tables with their shards, the current neighbours run, no format-1 file left; a re-run
after a crash at any step gives the same store. Real files, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from factories import music_like

from featurestore import tables
from featurestore.migrate import Migration, migrate, tensor_file_name
from featurestore.neighbours import NEIGHBOURS_SCHEMA
from featurestore.query import connect, run_query
from featurestore.reader import TensorReader
from featurestore.schema import SOURCES_SCHEMA, TRACKS_SCHEMA, segments_schema, tensors_schema
from featurestore.scores import (
    ScoredModel,
    ScoreStore,
    model_dir_name,
    scores_schema,
    segment_scores_schema,
)
from featurestore.store import FeatureStore
from featurestore.writer import ShardWriter
from tasks.config import FeatureConfig
from tasks.errors import StoreError
from tasks.features import SpectralExtractor
from tasks.predictions import score_rows
from tasks.track import extract_track

C = FeatureConfig()
FS = C.feature_set_id
MODEL = ScoredModel(name="genre/tagger v2", version="3", run_id="r" * 32, feature_set=FS,
                    classes=["a", "b", "c"], multi_label=False, threshold=0.6, embed_dim=4,
                    input="logmel", architecture="cnn")
SHARDS = {
    "s-aaa": [("t1", 7.0), ("t2", 2.0)],
    "s-bbb": [("t3", 4.0), ("bad", 3.0), ("t4", 3.0)],
    "s-ccc": [("t5", 5.0)],
    "s-ddd": [("bad2", 2.0)],  # failed tracks only: an empty tensors file
}
FAIL = {"bad", "bad2"}
PARTS = {"p-one": ["s-aaa", "s-bbb"], "p-two": ["s-ccc"]}
RUN = "r-20260101T000000-abcdef"

F1_TRACKS = pa.schema([f for f in TRACKS_SCHEMA if f.name != "tensor_file"])
F1_SEGMENTS = pa.schema([f for f in segments_schema(C)
                         if f.name not in ("shard", "tensor_file", "tensor_row")])
# format 1 had no shard column in its score parts, and no novelty (a later column)
F1_SCORES = pa.schema([f for f in scores_schema(MODEL) if f.name not in ("shard", "novelty")])
F1_SEGMENT_SCORES = pa.schema([f for f in segment_scores_schema(MODEL) if f.name != "shard"])


# --- a format-1 store, as the previous release wrote it --------------------------------------
def _json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)


def _format1_store(root, scratch):
    """Write shards with today's ShardWriter into ``scratch``, then lay them out in ``root``
    exactly as format 1 did (no tensor_file / shard / tensor_row columns, one folder per shard,
    manifests), with sources, a scored model version, a neighbours run and crash leftovers.
    """
    s2 = FeatureStore(str(scratch), create=True)
    s2.register_feature_set(C)
    ex = SpectralExtractor(C)
    feat = os.path.join(root, "features", FS)
    os.makedirs(feat)
    shutil.copy(s2.path("features", FS, "featureset.json"), feat)
    rng = np.random.default_rng(7)
    seg_rows = {}
    for shard, tracks in SHARDS.items():
        staged = s2.staging_dir(FS, shard)
        with ShardWriter(s2, staged, C, shard) as w:
            for i, (tid, seconds) in enumerate(tracks):
                row = {"track_id": tid, "path": f"/music/{tid}.wav", "status": "ok",
                       "content_hash": tid * 2, "format": "wav", "size_bytes": 1000 + i}
                w.begin_track(tid)
                result = extract_track([music_like(seconds, 22050, seed=i)[None]], 22050, C,
                                       ex, w.add_batch)
                if tid in FAIL:
                    w.fail_track(row | {"status": "failed", "stage": "features",
                                        "error": "boom"})
                else:
                    w.end_track(row | {"duration_s": result.duration_s}, result)
        written = w.written
        base = os.path.join(feat, "shards", shard)
        os.makedirs(base)
        tr = pq.read_table(f"{s2.table_path(FS, 'tracks')}/{written.tracks_file.path}")
        pq.write_table(tr.drop(["tensor_file"]).cast(F1_TRACKS), f"{base}/tracks.parquet")
        if written.segments_file:
            seg = pq.read_table(f"{s2.table_path(FS, 'segments')}/{written.segments_file.path}")
            seg = seg.drop(["shard", "tensor_file", "tensor_row"]).cast(F1_SEGMENTS)
        else:
            seg = F1_SEGMENTS.empty_table()
        pq.write_table(seg, f"{base}/segments.parquet")
        seg_rows[shard] = seg
        if written.tensor_file:  # rows shuffled, small batches: tensor_row must be looked up
            t = ipc.open_file(s2.tensor_path(FS, written.tensor_file)).read_all()
            t = t.take(rng.permutation(t.num_rows))
        else:
            t = tensors_schema(C).empty_table()
        with ipc.new_file(f"{base}/tensors.arrow", t.schema) as out:
            out.write_table(t, max_chunksize=3)
        c = written.counts
        _json(f"{feat}/_manifests/{shard}.json", {
            "shard_id": shard, "feature_set": FS, "n_tracks": c.n_tracks, "n_ok": c.n_ok,
            "n_failed": c.n_failed, "n_segments": c.n_segments, "audio_s": c.audio_s,
            "track_ids": c.track_ids, "committed_at": "2026-01-01T00:00:00+00:00",
            "code_version": "0.9.0"})
    orphan = os.path.join(feat, "shards", "s-orphan")  # a crash between move and manifest
    os.makedirs(orphan)
    pq.write_table(pa.table({"track_id": ["t-orphan"]}), f"{orphan}/tracks.parquet")
    os.makedirs(os.path.join(root, "_staging", FS, "s-zzz-1234abcd"))
    with open(os.path.join(root, "_staging", FS, "s-zzz-1234abcd", "spill.arrows"), "wb") as fh:
        fh.write(b"partial")

    now = pa.scalar(np.datetime64("2026-01-02T03:04:05.123456", "us")).cast(
        pa.timestamp("us", tz="UTC")).as_py()
    sources = [[{"uri": "/music/t1.wav", "size_bytes": 10, "mtime": 1.5, "content_hash": "h1",
                 "track_id": "t1", "seen_at": now},
                {"uri": "/music/t2.wav", "size_bytes": 20, "mtime": 2.5, "content_hash": "h2",
                 "track_id": "t2", "seen_at": now}],
               [{"uri": "/music/t1.wav", "size_bytes": 11, "mtime": 3.5, "content_hash": "h1b",
                 "track_id": "t1", "seen_at": now.replace(year=2027)},
                {"uri": "/music/t3.wav", "size_bytes": 30, "mtime": 4.5, "content_hash": "h3",
                 "track_id": "t3", "seen_at": now},
                {"uri": "/music/gone.wav", "size_bytes": 0, "mtime": 0.0, "content_hash": None,
                 "track_id": None, "seen_at": now}]]
    os.makedirs(os.path.join(root, "sources"))
    for i, rows in enumerate(sources):
        name = f"part-2026010{i}T000000-a{i}b{i}c{i}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA),
                       os.path.join(root, "sources", name))

    version_root = os.path.join(root, "scores", model_dir_name(MODEL.name), f"v{MODEL.version}")
    _json(f"{version_root}/model.json", MODEL.to_dict() | {"registered_at": "2026-01-03"})
    for part, shards in PARTS.items():
        seg = pa.concat_tables([seg_rows[s] for s in shards])
        ids = np.asarray(seg["track_id"].to_pylist(), dtype=object)
        probs = rng.dirichlet(np.ones(3), size=len(ids)).astype(np.float32)
        emb = rng.standard_normal((len(ids), 4)).astype(np.float32)
        trk, sgs = score_rows(ids, seg["segment"].to_numpy(), probs, emb, MODEL.classes,
                              threshold=MODEL.threshold, multi_label=False)
        stamp = {"model_name": MODEL.name, "model_version": MODEL.version,
                 "model_run_id": MODEL.run_id, "feature_set": FS, "scored_at": now}
        trk["path"] = [f"/music/{t}.wav" for t in trk["track_id"]]
        sgs["start_s"] = seg["start_s"].to_numpy()
        out = os.path.join(version_root, "parts", part)
        os.makedirs(out)
        for name, cols, schema in (("scores", trk, F1_SCORES),
                                   ("segment_scores", sgs, F1_SEGMENT_SCORES)):
            n = len(cols["track_id"])
            arrays = []
            for f in schema:
                v = cols.get(f.name, [stamp.get(f.name)] * n)
                if pa.types.is_fixed_size_list(f.type):
                    v = pa.FixedSizeListArray.from_arrays(
                        pa.array(np.asarray(v, np.float32).ravel()), f.type.list_size)
                arrays.append(pa.array(v, f.type) if not isinstance(v, pa.Array) else v)
            pq.write_table(pa.Table.from_arrays(arrays, schema=schema),
                           f"{out}/{name}.parquet")
        _json(f"{version_root}/_manifests/{part}.json", {
            "part_id": part, "shards": shards, "n_tracks": len(trk["track_id"]),
            "n_segments": len(ids), "model_name": MODEL.name,
            "model_version": MODEL.version, "feature_set": FS,
            "committed_at": "2026-01-04", "code_version": "0.9.0", "extra": {}})
    os.makedirs(os.path.join(version_root, "parts", "p-orphan"))  # published, no manifest

    nb_root = os.path.join(root, "neighbours", model_dir_name(MODEL.name), f"v{MODEL.version}")
    run_dir = os.path.join(nb_root, "runs", RUN)
    os.makedirs(run_dir)
    ok = ["t1", "t2", "t3", "t4", "t5"]
    np.save(f"{run_dir}/embeddings.npy", rng.standard_normal((5, 4)).astype(np.float32))
    pq.write_table(pa.table({"track_id": ok}), f"{run_dir}/ids.parquet")
    for i, block in enumerate((ok[:3], ok[3:])):
        rows = [{"track_id": t, "rank": r + 1, "neighbour_id": [o for o in ok if o != t][r],
                 "similarity": 0.9 - 0.1 * r, "model_name": MODEL.name,
                 "model_version": MODEL.version, "method": "exact"}
                for t in block for r in range(2)]
        pq.write_table(pa.Table.from_pylist(rows, schema=NEIGHBOURS_SCHEMA),
                       f"{run_dir}/part-{3 * i:09d}.parquet")
    digest = hashlib.blake2b("\n".join(sorted(PARTS)).encode(), digest_size=8).hexdigest()
    _json(f"{nb_root}/current.json", {
        "run_id": RUN, "k": 2, "method": "exact", "tracks": 5,
        "parts": ["part-000000000.parquet", "part-000000003.parquet"],
        "source_digest": digest, "ann": None, "build_s": 0.0, "recall_sample": None,
        "committed_at": "2026-01-05"})
    os.makedirs(os.path.join(nb_root, "runs", "r-crashed"))  # a run never made current
    with open(os.path.join(nb_root, "runs", "r-crashed", "part-000000000.parquet"), "wb") as fh:
        fh.write(b"partial")
    _json(os.path.join(root, "_lock.json"), {"host": socket.gethostname(), "pid": 2 ** 22 + 7,
                                             "since": "2026-01-01"})  # a dead writer's lock
    _json(os.path.join(root, "store.json"), {"format": 1, "created_at": "2026-01-01"})


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("format1") / "store"
    _format1_store(str(root), tmp_path_factory.mktemp("scratch") / "store")
    return root


@pytest.fixture
def old(template, tmp_path):
    """A fresh copy of the format-1 store."""
    target = tmp_path / "store"
    shutil.copytree(template, target)
    return str(target)


# --- what the format-1 store holds -----------------------------------------------------------
def _format1(root):
    feat = os.path.join(root, "features", FS)
    manifests = {}
    for name in sorted(os.listdir(f"{feat}/_manifests")):
        with open(f"{feat}/_manifests/{name}") as fh:
            manifests[name[:-5]] = json.load(fh)
    tracks = pa.concat_tables(pq.read_table(f"{feat}/shards/{s}/tracks.parquet")
                              for s in manifests)
    segments = pa.concat_tables(pq.read_table(f"{feat}/shards/{s}/segments.parquet")
                                for s in manifests)
    tensors = {}
    for s in manifests:
        t = ipc.open_file(f"{feat}/shards/{s}/tensors.arrow").read_all()
        for i, (tid, seg) in enumerate(zip(t["track_id"].to_pylist(), t["segment"].to_pylist(),
                                           strict=True)):
            tensors[tid, seg] = (np.asarray(t["logmel"][i].values).reshape(C.n_mels, -1),
                                 np.asarray(t["mfcc"][i].values).reshape(C.n_mfcc, -1))
    version_root = os.path.join(root, "scores", model_dir_name(MODEL.name), f"v{MODEL.version}")
    scores = pa.concat_tables(pq.read_table(f"{version_root}/parts/{p}/scores.parquet")
                              for p in PARTS)
    segment_scores = pa.concat_tables(
        pq.read_table(f"{version_root}/parts/{p}/segment_scores.parquet") for p in PARTS)
    return {"manifests": manifests, "tracks": tracks, "segments": segments,
            "tensors": tensors, "scores": scores, "segment_scores": segment_scores}


def _rows(table, keys):
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def _contents(url):
    """Everything a format-2 reader sees, for comparing two migrated stores."""
    store = FeatureStore(url)
    scores = ScoreStore(store)
    con = connect(store)
    out = {name: _rows(run_query(con, f"SELECT * FROM {name}"), keys) for name, keys in (
        ("tracks", ["track_id"]), ("segments", ["track_id", "segment"]),
        ("sources_log", ["uri", "seen_at"]), ("scores", ["track_id"]),
        ("segment_scores", ["track_id", "segment"]),
        ("neighbours", ["track_id", "rank"]))}
    out["manifests"] = [m.to_dict() for m in store.manifests(FS)]
    current = scores.neighbours_current(MODEL.name, MODEL.version)
    assert current is not None
    out["current"] = {k: v for k, v in current.items()
                      if k not in ("migrated_at", "committed_at", "parts")}
    out["tensors"] = {os.path.relpath(f, url): open(f, "rb").read()
                      for f in store.files(FS, "tensors")}
    return out


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


# --- tests -------------------------------------------------------------------------------------
def test_format1_store_is_refused_with_a_hint(old):
    with pytest.raises(StoreError, match="mtag migrate"):
        FeatureStore(old)


def test_migration_keeps_every_shard_row_and_tensor(old):
    f1 = _format1(old)
    lines: list[str] = []
    report = migrate(old, progress=lines.append)
    assert lines and "format 2" in report.render()
    assert (report.feature_sets, report.shards, report.tracks, report.tensor_files) == (1, 4, 7, 3)
    assert report.segments == f1["segments"].num_rows > 0
    assert (report.source_rows, report.score_parts, report.score_rows) == (5, 2, 5)
    assert report.segment_score_rows == f1["segment_scores"].num_rows
    assert report.neighbour_rows == 10 and report.stale_neighbours == 0
    assert (report.uncommitted_shards, report.staging_entries, report.uncommitted_score_parts,
            report.uncommitted_neighbour_runs) == (1, 1, 1, 1)
    assert report.commits == 6 and report.duplicate_tracks == report.unmatched_score_rows == 0

    store = FeatureStore(old)
    assert store.format == 2
    with open(os.path.join(old, "store.json")) as fh:
        marker = json.load(fh)
    assert marker["format"] == 2 and "migration_cleanup" not in marker
    assert marker["created_at"] == "2026-01-01"

    # the manifests (commit records) equal format 1's exactly
    got = {m.shard_id: m for m in store.manifests(FS)}
    assert set(got) == set(f1["manifests"]) == set(SHARDS)
    for shard, m1 in f1["manifests"].items():
        c = got[shard].counts
        assert (c.n_tracks, c.n_ok, c.n_failed, c.n_segments) == (
            m1["n_tracks"], m1["n_ok"], m1["n_failed"], m1["n_segments"])
        assert c.audio_s == pytest.approx(m1["audio_s"])
        assert sorted(c.track_ids) == sorted(m1["track_ids"])
        assert got[shard].tensor_file == (None if shard == "s-ddd" else tensor_file_name(shard))

    # every row once, equal to format 1's, with the new columns
    con = connect(store)
    q = lambda sql: run_query(con, sql).to_pylist()[0]  # noqa: E731
    assert q("SELECT count(*) n, count(DISTINCT track_id) d FROM tracks") == {"n": 7, "d": 7}
    n_seg = f1["segments"].num_rows
    assert q("SELECT count(*) n, count(DISTINCT (track_id, segment)) d FROM segments") == {
        "n": n_seg, "d": n_seg}
    tracks = store.read(FS, "tracks")
    assert _rows(tracks.select(F1_TRACKS.names), ["track_id"]) == _rows(f1["tracks"],
                                                                       ["track_id"])
    files = dict(zip(tracks["track_id"].to_pylist(), tracks["tensor_file"].to_pylist(),
                     strict=True))
    assert files["bad"] is None and files["bad2"] is None
    assert files["t1"] == files["t2"] == tensor_file_name("s-aaa")
    segments = store.read(FS, "segments")
    assert _rows(segments.select(F1_SEGMENTS.names), ["track_id", "segment"]) == _rows(
        f1["segments"], ["track_id", "segment"])
    assert q("SELECT count(*) n FROM segments s JOIN tracks t USING (track_id) "
             "WHERE s.shard = t.shard AND s.tensor_file = t.tensor_file") == {"n": n_seg}
    assert q("SELECT count(*) n, count(DISTINCT uri) d FROM sources_log") == {"n": 5, "d": 4}
    assert q("SELECT size_bytes, content_hash FROM sources WHERE uri = '/music/t1.wav'") == {
        "size_bytes": 11, "content_hash": "h1b"}
    assert store.known_sources()["/music/t3.wav"] == (30, 4.5, "h3")
    assert q("SELECT count(*) n, count(DISTINCT track_id) d FROM scores") == {"n": 5, "d": 5}
    assert q("SELECT count(*) n FROM scores s JOIN tracks t USING (track_id) "
             "WHERE s.shard = t.shard") == {"n": 5}
    assert q("SELECT count(*) n FROM segment_scores s JOIN segments g "
             "USING (track_id, segment) WHERE s.shard = g.shard") == {
        "n": f1["segment_scores"].num_rows}
    # novelty: a column added after format 1, null in its migrated rows
    assert _rows(run_query(con, "SELECT * EXCLUDE (shard, novelty) FROM scores WHERE novelty "
                                "IS NULL"), ["track_id"]) == \
        _rows(f1["scores"], ["track_id"])
    assert q("SELECT count(*) n, count(DISTINCT (track_id, rank)) d FROM neighbours") == {
        "n": 10, "d": 10}

    # tensors: the same matrices, and every tensor_row points at its own row
    reader = TensorReader(store)
    assert len(reader) == len(f1["tensors"]) == n_seg
    for i, (tid, seg) in enumerate(zip(reader.index.track_id, reader.index.segment,
                                       strict=True)):
        logmel, mfcc = f1["tensors"][tid, int(seg)]
        np.testing.assert_array_equal(reader.matrix("logmel", i), logmel)
        np.testing.assert_array_equal(reader.matrix("mfcc", i), mfcc)
    opened: dict[str, pa.Table] = {}
    for row in segments.select(["track_id", "segment", "tensor_file", "tensor_row"]).to_pylist():
        path = store.tensor_path(FS, row["tensor_file"])
        t = opened.setdefault(path, ipc.open_file(path).read_all())
        assert t["track_id"][row["tensor_row"]].as_py() == row["track_id"]
        assert t["segment"][row["tensor_row"]].as_py() == row["segment"]
    assert sorted(os.listdir(os.path.join(old, "features", FS, "tensors"))) == [
        "s-aaa-v1.arrow", "s-bbb-v1.arrow", "s-ccc-v1.arrow"]

    # scores and neighbours as the format-2 flows read them
    scores = ScoreStore(store)
    assert scores.scored_shards(MODEL.name, MODEL.version) == {"s-aaa", "s-bbb", "s-ccc"}
    current = scores.neighbours_current(MODEL.name, MODEL.version)
    assert current is not None
    assert (current["run_id"], current["k"], current["method"], current["tracks"]) == (
        RUN, 2, "exact", 5)
    assert current["source_digest"] == scores.source_digest(MODEL.name, MODEL.version)
    assert [os.path.basename(f) for f in scores.neighbours_files(MODEL.name, MODEL.version)] \
        == current["parts"]
    assert scores.neighbours_of(MODEL.name, MODEL.version, "t1")["rank"].tolist() == [1, 2]

    # nothing of format 1 is left; uncommitted work was not migrated
    listing = _listing(old)
    version = f"{model_dir_name(MODEL.name)}/v{MODEL.version}"
    for gone in (f"features/{FS}/shards/", f"features/{FS}/_manifests/", "_staging/",
                 "_migrate/", f"scores/{version}/parts/", f"scores/{version}/_manifests/",
                 f"neighbours/{version}/runs/r-crashed/", "_lock.json", "sources/part-2026"):
        assert not any(p.startswith(gone) for p in listing), gone
    assert f"neighbours/{version}/runs/{RUN}/embeddings.npy" in listing
    assert not any(p.startswith(f"neighbours/{version}/runs/{RUN}/part-") for p in listing)
    assert "t-orphan" not in store.committed_track_ids(FS)


def test_second_migration_says_already_format_2(old):
    migrate(old)
    before = {p: os.path.getmtime(os.path.join(old, p)) for p in _listing(old)}
    report = migrate(old)
    assert report.already and "already format 2" in report.render()
    assert {p: os.path.getmtime(os.path.join(old, p)) for p in _listing(old)} == before


@pytest.mark.parametrize("stop", ["features", "scores", "neighbours", "verify"])
def test_interrupted_migration_then_full_run_equals_a_clean_one(template, tmp_path, stop):
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    shutil.copytree(template, clean)
    shutil.copytree(template, crashed)
    migrate(clean)

    m = Migration(crashed, group_shards=1)
    m.reset()
    plan = m.plan()
    with m.store.commit_lease() as lease:
        m.features(plan, lease, limit=2 if stop == "features" else None)
        if stop != "features":
            m.sources(plan, lease)
            m.scores(plan, lease)
        if stop in ("neighbours", "verify"):
            m.neighbours(plan, lease)
        if stop == "verify":
            m.verify(plan)
        # a crash between the two transactions of a group leaves an intent behind
        m.store.write_record(m.store.path("_locks", "intent-crashed.json"), {
            "check": m.store.table_path(FS, "tracks"),
            "rollback": m.store.table_path(FS, "segments"), "shards": ["s-ccc"],
            "created_at": "2026-01-01"})
    # ... then the process dies: the store is still format 1, every format-1 file is there
    with pytest.raises(StoreError, match="mtag migrate"):
        FeatureStore(crashed)
    assert len(os.listdir(os.path.join(crashed, "features", FS, "_manifests"))) == 4
    assert all(os.path.exists(os.path.join(crashed, "features", FS, "shards", s,
                                           "tensors.arrow")) for s in SHARDS)
    with open(os.path.join(crashed, "neighbours", model_dir_name(MODEL.name),
                           f"v{MODEL.version}", "current.json")) as fh:
        assert "part-000000000.parquet" in json.load(fh)["parts"] or stop in (
            "neighbours", "verify")

    report = migrate(crashed)
    assert report.shards == 4 and report.commits == 6
    assert _contents(crashed) == _contents(clean)
    assert _listing(crashed) != [] and not os.path.exists(os.path.join(crashed, "_migrate"))
    assert not os.path.exists(os.path.join(crashed, "_locks", "intent-crashed.json"))


def test_crash_after_the_switch_finishes_the_cleanup(template, tmp_path):
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    shutil.copytree(template, clean)
    shutil.copytree(template, crashed)
    migrate(clean)
    m = Migration(crashed)
    m.reset()
    plan = m.plan()
    with m.store.commit_lease() as lease:
        for step in (m.features, m.sources, m.scores, m.neighbours):
            step(plan, lease)
        m.verify(plan)
        m.switch(plan)
    # dies before deleting anything: already a format-2 store, old files still there
    assert FeatureStore(crashed).format == 2
    assert os.path.isdir(os.path.join(crashed, "features", FS, "shards"))
    report = migrate(crashed)
    assert report.resumed_cleanup and report.deleted > 0 and "cleanup" in report.render()
    assert not os.path.exists(os.path.join(crashed, "features", FS, "shards"))
    assert _contents(crashed) == _contents(clean)
    assert migrate(crashed).already


def test_damaged_manifest_is_named_and_nothing_changes(old):
    path = os.path.join(old, "features", FS, "_manifests", "s-bbb.json")
    with open(path, "w") as fh:
        fh.write('{"shard_id": "s-bbb", "n_tra')
    with pytest.raises(StoreError, match=r"damaged manifest .*s-bbb\.json"):
        migrate(old)
    with open(path, "w") as fh:
        json.dump({"shard_id": "s-bbb", "feature_set": FS}, fh)
    with pytest.raises(StoreError, match=r"s-bbb\.json: n_tracks"):
        migrate(old)
    with pytest.raises(StoreError, match="mtag migrate"):
        FeatureStore(old)
    assert not os.path.exists(os.path.join(old, "features", FS, "tracks"))


def test_shard_disagreeing_with_its_manifest_is_an_error(old):
    path = os.path.join(old, "features", FS, "shards", "s-ccc", "tensors.arrow")
    with ipc.new_file(path, tensors_schema(C)):
        pass  # the tensors are gone
    with pytest.raises(StoreError, match=r"s-ccc.*no row for"):
        migrate(old)
    os.remove(os.path.join(old, "features", FS, "shards", "s-aaa", "tracks.parquet"))
    with pytest.raises(StoreError, match=r"s-aaa/tracks\.parquet is missing"):
        migrate(old)


def test_unknown_format_and_missing_store_are_refused(old, tmp_path):
    _json(os.path.join(old, "store.json"), {"format": 7})
    with pytest.raises(StoreError, match="format 7"):
        migrate(old)
    _json(os.path.join(old, "store.json"), {"format": "one"})
    with pytest.raises(StoreError, match=r"store\.json"):
        migrate(old)
    with pytest.raises(StoreError, match="no feature store"):
        migrate(str(tmp_path / "nowhere"))


def test_a_live_format1_writer_blocks_the_migration(old):
    _json(os.path.join(old, "_lock.json"), {"host": socket.gethostname(), "pid": os.getpid(),
                                            "since": "now"})
    with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
        migrate(old)


def test_stale_neighbours_stay_stale(old):
    nb = os.path.join(old, "neighbours", model_dir_name(MODEL.name), f"v{MODEL.version}",
                      "current.json")
    with open(nb) as fh:
        record = json.load(fh)
    _json(nb, record | {"source_digest": "0123456789abcdef"})  # computed before p-two
    report = migrate(old)
    assert report.stale_neighbours == 1 and "mtag neighbours" in report.render()
    scores = ScoreStore(FeatureStore(old))
    current = scores.neighbours_current(MODEL.name, MODEL.version)
    assert current is not None
    assert current["source_digest"] == "0123456789abcdef" != scores.source_digest(
        MODEL.name, MODEL.version)


def test_groups_make_few_commits(old):
    report = Migration(old, group_shards=3).run()
    assert report.commits == 2 * 2 + 1 + 2 + 1  # two feature groups (3 + 1 shards)
    table = tables.open_table(FeatureStore(old), FeatureStore(old).table_path(FS, "tracks"))
    assert table is not None and len(table.file_uris()) == 2


# --- S3 (moto) ----------------------------------------------------------------------------
@pytest.mark.slow
def test_migration_on_s3(template, moto_endpoint, monkeypatch, tmp_path):
    import boto3
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "key",
                       "AWS_SECRET_ACCESS_KEY": "not-a-real-secret",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"migrate-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem()
    for rel in _listing(template):
        fs.put_file(os.path.join(template, rel), f"{bucket}/store/{rel}")
    url = f"s3://{bucket}/store"
    try:
        with pytest.raises(StoreError, match="mtag migrate"):
            FeatureStore(url)
        report = migrate(url)
        assert (report.shards, report.tracks, report.tensor_files, report.score_rows,
                report.neighbour_rows) == (4, 7, 3, 5, 10)
        local = str(tmp_path / "local")
        shutil.copytree(template, local)
        migrate(local)
        remote, here = _contents_s3(url), _contents_s3(local)
        assert remote == here
        left = [p[len(bucket) + 7:] for p in fs.find(f"{bucket}/store")]
        assert not any(p.startswith((f"features/{FS}/shards/", "_staging/", "_migrate/",
                                     "sources/part-2026")) for p in left)
        assert sorted(p for p in left if p.startswith(f"features/{FS}/tensors/")) == [
            f"features/{FS}/{tensor_file_name(s)}" for s in ("s-aaa", "s-bbb", "s-ccc")]
        assert migrate(url).already
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def _contents_s3(url):
    """What a reader sees (tensors through TensorReader), for a store anywhere."""
    store = FeatureStore(url)
    con = connect(store)
    out = {name: _rows(run_query(con, f"SELECT * EXCLUDE (shard) FROM {name}"), keys)
           for name, keys in (("tracks", ["track_id"]), ("segments", ["track_id", "segment"]),
                              ("scores", ["track_id"]))}
    out["n"] = run_query(con, "SELECT (SELECT count(*) FROM neighbours) a, (SELECT count(*) "
                              "FROM sources_log) b").to_pylist()
    reader = TensorReader(store)
    out["tensors"] = sorted((t, int(s), reader.matrix("logmel", i).tobytes())
                            for i, (t, s) in enumerate(zip(reader.index.track_id,
                                                           reader.index.segment, strict=True)))
    out["manifests"] = [m.to_dict() for m in store.manifests(FS)]
    return out


def test_a_track_in_two_shards_is_kept_once(old):
    """Two format-1 writers on two hosts could commit a track twice: the later shard loses it
    (rows and tensors), the rest of it is migrated."""
    feat = os.path.join(old, "features", FS)
    a, c = f"{feat}/shards/s-aaa", f"{feat}/shards/s-ccc"
    rename = lambda t: t.set_column(  # noqa: E731
        0, t.schema.field(0), pa.array([{"t2": "t6"}.get(x, x) for x in t["track_id"].to_pylist()],
                                       pa.string()))
    pick = lambda t, tid: t.filter(pc.equal(t["track_id"], tid))  # noqa: E731
    base = f"{feat}/shards/s-zzz"
    os.makedirs(base)
    for name in ("tracks", "segments"):
        pq.write_table(pa.concat_tables([pick(pq.read_table(f"{c}/{name}.parquet"), "t5"),
                                         rename(pick(pq.read_table(f"{a}/{name}.parquet"),
                                                     "t2"))]), f"{base}/{name}.parquet")
    tensors = pa.concat_tables([pick(ipc.open_file(f"{c}/tensors.arrow").read_all(), "t5"),
                                rename(pick(ipc.open_file(f"{a}/tensors.arrow").read_all(),
                                            "t2"))])
    with ipc.new_file(f"{base}/tensors.arrow", tensors.schema) as out:
        out.write_table(tensors)
    n_seg = pq.read_metadata(f"{base}/segments.parquet").num_rows
    _json(f"{feat}/_manifests/s-zzz.json", {
        "shard_id": "s-zzz", "feature_set": FS, "n_tracks": 2, "n_ok": 2, "n_failed": 0,
        "n_segments": n_seg, "audio_s": 7.0, "track_ids": ["t5", "t6"]})
    f1 = _format1(old)

    report = migrate(old)
    assert report.duplicate_tracks == 1 and "kept once" in report.render()
    store = FeatureStore(old)
    got = {m.shard_id: m.counts for m in store.manifests(FS)}
    assert got["s-zzz"].track_ids == ["t6"] and got["s-ccc"].track_ids == ["t5"]
    reader = TensorReader(store)
    keys = list(zip(reader.index.track_id.tolist(), reader.index.segment.tolist(), strict=True))
    assert len(keys) == len(set(keys)) == len({k for k in f1["tensors"]})
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(reader.matrix("logmel", i), f1["tensors"][key][0])
    segments = store.read(FS, "segments")
    assert segments.num_rows == len(keys)
    for row in segments.filter(pc.equal(segments["shard"], "s-zzz")).to_pylist():
        t = ipc.open_file(store.tensor_path(FS, row["tensor_file"])).read_all()
        assert t.num_rows == n_seg - got["s-ccc"].n_segments
        assert t["track_id"][row["tensor_row"]].as_py() == "t6"
        assert t["segment"][row["tensor_row"]].as_py() == row["segment"]
