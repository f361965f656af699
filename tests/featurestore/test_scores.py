"""Score tables: schemas, row groups, commits of parts, crash leftovers, views, neighbour runs."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from featurestore import scores as sc
from featurestore import tables
from featurestore.neighbours import NEIGHBOURS_SCHEMA
from featurestore.query import connect, run_query
from featurestore.scores import ScoredModel, ScorePartWriter, ScoreStore
from featurestore.store import FeatureStore
from tasks.errors import ParameterError, StoreError
from tasks.predictions import score_rows

MODEL = ScoredModel(name="genre/tagger v2", version="3", run_id="r" * 32,
                    feature_set="fs-000000000000", classes=["a", "b", "c"], multi_label=False,
                    threshold=0.6, embed_dim=4, input="logmel", architecture="cnn")


def rows(rng, n_tracks, per_track=2, prefix="t"):
    ids = np.repeat(np.array([f"{prefix}{i:04d}" for i in range(n_tracks)], dtype=object),
                    per_track)
    probs = rng.dirichlet(np.ones(3), size=len(ids)).astype(np.float32)
    emb = rng.standard_normal((len(ids), 4)).astype(np.float32)
    tracks, segs = score_rows(ids, np.tile(np.arange(per_track), n_tracks), probs, emb,
                              MODEL.classes, threshold=MODEL.threshold, multi_label=False)
    tracks["path"] = [f"/music/{t}.flac" for t in tracks["track_id"]]
    segs["start_s"] = segs["segment"] * 3.0
    return tracks, segs


def write_part(scores, rng, part_id, n_tracks, prefix="t", shards=None):
    """Write one part of two feature shards (``n_tracks // 2`` tracks each); return its
    WrittenPart (uncommitted).
    """
    shards = shards or [f"s-{part_id}-0", f"s-{part_id}-1"]
    with ScorePartWriter(scores, MODEL, part_id) as w:
        for chunk, shard in enumerate(shards):
            w.add(*rows(rng, n_tracks // len(shards), prefix=f"{prefix}{chunk}-"), shard=shard)
    return w.written


def file_path(scores, table, data_file):
    return f"{scores.table_path(MODEL.name, MODEL.version, table)}/{data_file.path}"


@pytest.fixture
def scores(tmp_path):
    s = ScoreStore(FeatureStore(str(tmp_path / "store"), create=True))
    s.register_model(MODEL)
    return s


def test_model_folder_names_are_safe_and_distinct(scores, tmp_path):
    assert sc.model_dir_name("tagger") == "tagger"
    assert "/" not in sc.model_dir_name("genre/tagger v2")
    assert sc.model_dir_name("a/b") != sc.model_dir_name("a_b")
    name = sc.model_dir_name(MODEL.name)
    assert name.startswith("genre_tagger_v2-")
    root = tmp_path / "store"
    assert os.listdir(root / "scores") == [name]
    assert os.listdir(root / "scores" / name / "v3") == ["model.json"]
    assert scores.table_path(MODEL.name, "3", "scores") == str(root / "scores" / name / "v3"
                                                               / "scores")
    assert scores.table_path(MODEL.name, "3", "neighbours") == str(
        root / "neighbours" / name / "v3" / "neighbours")


def test_part_round_trip_row_groups_and_metadata(scores, rng, monkeypatch):
    monkeypatch.setattr(sc, "SCORES_ROW_GROUP", 16)
    written = write_part(scores, rng, "p-one", 40)
    assert (written.part_id, written.n_tracks, written.n_segments) == ("p-one", 40, 80)
    assert written.shards == ["s-p-one-0", "s-p-one-1"]
    assert (written.scores_file.rows, written.segment_scores_file.rows) == (40, 80)
    for table, f in (("scores", written.scores_file),
                     ("segment_scores", written.segment_scores_file)):
        assert f.path.startswith("p-one-") and f.path.endswith(".parquet")
        assert os.path.getsize(file_path(scores, table, f)) == f.size
    # written into place, invisible until committed
    assert scores.files(MODEL.name, MODEL.version, "scores") == []
    assert scores.scored_shards(MODEL.name, MODEL.version) == set()
    assert scores.models() == []
    with pytest.raises(StoreError, match="no scores yet"):
        scores.latest()

    assert scores.commit_parts(MODEL, [written], run="run-7") == ["p-one"]
    [path] = scores.files(MODEL.name, MODEL.version, "scores")
    assert path == file_path(scores, "scores", written.scores_file)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 40
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [16, 16, 8]
    table = pq.read_table(path)
    assert table.schema.field("embedding").type.list_size == 4
    assert table.schema.field("probabilities").type.list_size == 3
    assert table.schema.metadata[b"mtag.classes"] == b'["a", "b", "c"]'
    assert json.loads(table.schema.metadata[b"mtag.model"]) == MODEL.to_dict()
    assert set(table["model_version"].to_pylist()) == {"3"}
    assert set(table["model_run_id"].to_pylist()) == {MODEL.run_id}
    assert table["shard"].to_pylist() == ["s-p-one-0"] * 20 + ["s-p-one-1"] * 20
    [seg_path] = scores.files(MODEL.name, MODEL.version, "segment_scores")
    assert pq.ParquetFile(seg_path).metadata.num_rows == 80
    assert scores.read(MODEL.name, MODEL.version, "segment_scores").num_rows == 80
    assert scores.scored_shards(MODEL.name, MODEL.version) == {"s-p-one-0", "s-p-one-1"}
    assert scores.latest() == MODEL
    [record] = scores.models()
    assert (record["n_tracks"], record["table_version"]) == (40, 1)
    commit = tables.open_table(scores.store, scores.table_path(MODEL.name, MODEL.version,
                                                               "scores")).history(1)[0]
    assert (commit["mtag.operation"], commit["mtag.run"], commit["mtag.model"]) == (
        "score", "run-7", f"{MODEL.name}/3")
    assert json.loads(commit["mtag.shards"]) == ["s-p-one-0", "s-p-one-1"]
    tracks, emb = scores.embeddings(MODEL)
    assert len(tracks) == 40 and emb.shape == (40, 4) and emb.dtype == np.float32


def test_commit_twice_keeps_one_copy(scores, rng):
    first = write_part(scores, rng, "p-a", 4)
    assert scores.commit_parts(MODEL, [first]) == ["p-a"]
    again = write_part(scores, rng, "p-a", 4)  # a retried task
    overlap = write_part(scores, rng, "p-b", 4, prefix="u", shards=["s-p-a-1", "s-new"])
    fresh = write_part(scores, rng, "p-c", 4, prefix="v")
    assert scores.commit_parts(MODEL, [again, overlap, fresh]) == ["p-c"]
    for part in (again, overlap):  # left out: their files are deleted
        for table, f in (("scores", part.scores_file),
                         ("segment_scores", part.segment_scores_file)):
            assert not os.path.exists(file_path(scores, table, f))
    assert len(scores.files(MODEL.name, MODEL.version, "segment_scores")) == 2
    assert scores.scored_shards(MODEL.name, MODEL.version) == {
        "s-p-a-0", "s-p-a-1", "s-p-c-0", "s-p-c-1"}
    got = run_query(connect(scores.store), "SELECT count(*) AS n, count(DISTINCT track_id) "
                                           "AS t FROM scores").to_pylist()
    assert got == [{"n": 8, "t": 8}]
    assert scores.commit_parts(MODEL, []) == []


def test_two_parts_of_one_shard_in_one_commit_keep_one(scores, rng):
    """Two racing attempts at the same shards committed together: one copy."""
    a = write_part(scores, rng, "p-x", 4, shards=["s-1", "s-2"])
    b = write_part(scores, rng, "p-y", 4, shards=["s-1", "s-2"])
    kept = scores.commit_parts(MODEL, [a, b])
    n = scores.read(MODEL.name, MODEL.version, "scores").num_rows
    assert (kept, n) == (["p-x"], 4), (
        "BUG featurestore/scores.py ScoreStore.commit_parts: `done` is not updated while "
        "choosing `keep`, so parts of one call covering the same shard are all committed "
        f"(commit_shards does update it): kept {kept}, {n} score rows for 4 tracks")


def test_crash_between_the_two_transactions_is_rolled_back(scores, rng, monkeypatch):
    store = scores.store
    done = write_part(scores, rng, "p-ok", 4)
    scores.commit_parts(MODEL, [done])
    crashed = write_part(scores, rng, "p-crash", 4, prefix="c")
    real = tables.commit_files

    def crash_before_scores(store_, path, *args, **kwargs):
        if path.endswith("/scores"):
            raise KeyboardInterrupt("killed between the transactions")
        return real(store_, path, *args, **kwargs)

    monkeypatch.setattr(tables, "commit_files", crash_before_scores)
    with pytest.raises(KeyboardInterrupt):
        scores.commit_parts(MODEL, [crashed])
    monkeypatch.undo()
    [intent] = store.fs.glob(store.path("_locks", "intent-*.json"))
    assert store.read_record(intent)["shards"] == ["s-p-crash-0", "s-p-crash-1"]
    seg = scores.read(MODEL.name, MODEL.version, "segment_scores", ["shard"])
    assert seg.num_rows == 16  # the orphan segment scores are committed
    assert scores.scored_shards(MODEL.name, MODEL.version) == {"s-p-ok-0", "s-p-ok-1"}

    assert FeatureStore(store.url).recover() == 2  # two shards rolled back
    assert store.fs.glob(store.path("_locks", "intent-*.json")) == []
    seg = scores.read(MODEL.name, MODEL.version, "segment_scores", ["shard"])
    assert sorted(set(seg["shard"].to_pylist())) == ["s-p-ok-0", "s-p-ok-1"]
    assert seg.num_rows == 8
    # the crashed part can be scored again
    redo = write_part(scores, rng, "p-crash", 4, prefix="c")
    assert scores.commit_parts(MODEL, [redo]) == ["p-crash"]
    assert scores.read(MODEL.name, MODEL.version, "segment_scores").num_rows == 16


def test_views_pick_a_model_and_list_classes(tmp_path, rng):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    scores = ScoreStore(store)
    con = connect(store)
    assert run_query(con, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 0}]
    assert run_query(con, "SELECT count(*) AS n FROM score_models").to_pylist() == [{"n": 0}]
    scores.register_model(MODEL)
    scores.commit_parts(MODEL, [write_part(scores, rng, "p-a", 6)])
    con = connect(store)
    got = run_query(con, "SELECT count(*) AS n, count(DISTINCT track_id) AS t, "
                         "any_value(model_name) AS m FROM scores").to_pylist()
    assert got == [{"n": 6, "t": 6, "m": MODEL.name}]
    classes = run_query(con, "SELECT position, class FROM score_classes ORDER BY 1").to_pylist()
    assert classes == [{"position": 1, "class": "a"}, {"position": 2, "class": "b"},
                       {"position": 3, "class": "c"}]
    probs = run_query(con, "SELECT probabilities[2] AS b FROM scores s ORDER BY track_id "
                           "LIMIT 1").to_pylist()[0]["b"]
    assert 0.0 <= probs <= 1.0
    models = run_query(con, "SELECT model_name, model_version, tracks, in_views "
                            "FROM score_models").to_pylist()
    assert models == [{"model_name": MODEL.name, "model_version": "3", "tracks": 6,
                       "in_views": True}]
    # a second version scored later becomes the default; the first stays reachable
    v4 = dataclasses.replace(MODEL, version="4", run_id="s" * 32)
    scores.register_model(v4)
    with ScorePartWriter(scores, v4, "p-4") as w:
        w.add(*rows(rng, 2, prefix="z"), shard="s-z")
    scores.commit_parts(v4, [w.written])
    assert scores.pick().version == "4" and scores.pick(MODEL.name).version == "4"
    assert scores.pick(f"models:/{MODEL.name}/3") == MODEL
    assert run_query(connect(store), "SELECT count(*) AS n FROM scores").to_pylist() == [
        {"n": 2}]
    assert run_query(connect(store, model=f"{MODEL.name}/3"),
                     "SELECT count(*) AS n FROM segment_scores").to_pylist() == [{"n": 12}]
    with pytest.raises(ParameterError, match=r"no scores of model .other."):
        connect(store, model="other")


def test_neighbours_run_is_visible_only_once_current(scores, rng):
    name, version = MODEL.name, MODEL.version
    scores.commit_parts(MODEL, [write_part(scores, rng, "p-a", 4)])
    assert scores.neighbours_current(name, version) is None
    ids = np.array(["t0-0000", "t0-0001", "t1-0000", "t1-0001"], dtype=object)

    def run_part(run_id, start, similarity):
        run = scores.neighbour_run(name, version, run_id)
        run.write_inputs(ids, rng.standard_normal((4, 4)).astype(np.float32))
        part = run.write_part(start, ids, np.ones(4, np.int32), ids[::-1],
                              np.full(4, similarity, np.float32), model_name=name,
                              model_version=version, method="exact")
        return run, part

    run1, part1 = run_part("r-1", 0, 0.5)
    assert part1.path.startswith("r-1-000000000-") and part1.rows == 4
    assert scores.neighbours_files(name, version) == []  # written, not current
    assert run_query(connect(scores.store), "SELECT count(*) AS n FROM neighbours"
                     ).to_pylist() == [{"n": 0}]
    scores.commit_neighbours(name, version, {"run_id": "r-1", "k": 1, "method": "exact",
                                             "tracks": 4, "source_digest": "x"}, [part1])
    table = scores.table_path(name, version, "neighbours")
    assert scores.neighbours_files(name, version) == [f"{table}/{part1.path}"]
    assert scores.neighbours_current(name, version)["run_id"] == "r-1"
    assert scores.neighbours_of(name, version, "t0-0000").to_dict("records") == [
        {"rank": 1, "neighbour_id": "t1-0001", "similarity": 0.5}]
    assert os.path.isdir(run1.directory)
    v1 = tables.version_of(scores.store, table)

    # the next run replaces the rows in one transaction
    run2, part2 = run_part("r-2", 0, 0.9)
    scores.commit_neighbours(name, version, {"run_id": "r-2", "k": 1, "method": "exact",
                                             "tracks": 4, "source_digest": "y"}, [part2])
    assert scores.neighbours_files(name, version) == [f"{table}/{part2.path}"]
    assert tables.version_of(scores.store, table) == v1 + 1
    assert not os.path.exists(run1.directory) and os.path.isdir(run2.directory)
    assert scores.neighbours_current(name, version)["run_id"] == "r-2"
    got = run_query(connect(scores.store), "SELECT count(*) AS n, min(similarity) AS s, "
                                           "any_value(method) AS m FROM neighbours").to_pylist()
    assert got == [{"n": 4, "s": pytest.approx(0.9), "m": "exact"}]
    assert tables.file_uris(scores.store, table, v1) == [f"{table}/{part1.path}"]
    schema = tables.open_table(scores.store, table).schema().to_arrow()
    assert [f.name for f in schema] == NEIGHBOURS_SCHEMA.names
    # an empty run empties the table
    scores.commit_neighbours(name, version, {"run_id": "r-3", "k": 1, "method": "exact",
                                             "tracks": 0, "source_digest": "z"}, [])
    assert scores.neighbours_files(name, version) == []
    assert not os.path.exists(run2.directory)


def test_missing_model_is_an_error(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    with pytest.raises(StoreError, match="no scores yet"):
        ScoreStore(store).latest()
    with pytest.raises(StoreError, match="no scores yet"):
        ScoreStore(store).pick("tagger")


def test_same_version_from_another_registry_is_refused(scores):
    scores.register_model(MODEL)  # the same run again: fine
    other = dataclasses.replace(MODEL, run_id="x" * 32)
    with pytest.raises(StoreError, match="another registry"):
        scores.register_model(other)
