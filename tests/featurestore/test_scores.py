"""Score parts: schemas, row groups, commits, crash leftovers, views, neighbour runs."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from featurestore import scores as sc
from featurestore.query import connect, run_query
from featurestore.scores import ScoredModel, ScoreManifest, ScorePartWriter, ScoreStore
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


def stage(store, rng, part_id, n_tracks, prefix="t"):
    scores = ScoreStore(store)
    staged = scores.staging_dir(MODEL, part_id)
    with ScorePartWriter(store, staged, MODEL) as w:
        for chunk in range(2):
            w.add(*rows(rng, n_tracks // 2, prefix=f"{prefix}{chunk}-"))
    return staged, ScoreManifest(part_id, [f"s-{part_id}"], w.n_tracks, w.n_segments,
                                 MODEL.name, MODEL.version, MODEL.feature_set)


def test_model_folder_names_are_safe_and_distinct():
    assert sc.model_dir_name("tagger") == "tagger"
    assert "/" not in sc.model_dir_name("genre/tagger v2")
    assert sc.model_dir_name("a/b") != sc.model_dir_name("a_b")


def test_part_round_trip_row_groups_and_metadata(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(sc, "SCORES_ROW_GROUP", 16)
    store = FeatureStore(str(tmp_path / "store"), create=True)
    scores = ScoreStore(store)
    scores.register_model(MODEL)
    staged, manifest = stage(store, rng, "p-one", 40)
    assert (manifest.n_tracks, manifest.n_segments) == (40, 80)
    assert scores.files(MODEL.name, MODEL.version, "scores") == []  # staged is invisible
    assert scores.commit(staged, manifest) and not os.path.exists(staged)
    [path] = scores.files(MODEL.name, MODEL.version, "scores")
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 40 and max(meta.row_group(i).num_rows
                                       for i in range(meta.num_row_groups)) <= 16
    table = pq.read_table(path)
    assert table.schema.field("embedding").type.list_size == 4
    assert table.schema.metadata[b"mtag.classes"] == b'["a", "b", "c"]'
    assert set(table["model_version"].to_pylist()) == {"3"}
    assert scores.scored_shards(MODEL.name, MODEL.version) == {"s-p-one"}
    assert scores.latest().name == MODEL.name


def test_commit_twice_and_crash_leftovers(tmp_path, rng):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    scores = ScoreStore(store)
    scores.register_model(MODEL)
    staged, manifest = stage(store, rng, "p-a", 4)
    assert scores.commit(staged, manifest)
    again, _ = stage(store, rng, "p-a", 4)
    assert not scores.commit(again, manifest) and not os.path.exists(again)
    orphan = f"{scores.model_root(MODEL.name, MODEL.version)}/parts/p-orphan"
    os.makedirs(orphan)
    assert scores.recover() == 1 and not os.path.exists(orphan)
    assert len(scores.files(MODEL.name, MODEL.version, "segment_scores")) == 1


def test_views_pick_a_model_and_list_classes(tmp_path, rng):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    scores = ScoreStore(store)
    con = connect(store)
    assert run_query(con, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 0}]
    scores.register_model(MODEL)
    scores.commit(*stage(store, rng, "p-a", 6))
    con = connect(store)
    got = run_query(con, "SELECT count(*) AS n, count(DISTINCT track_id) AS t, "
                         "any_value(model_name) AS m FROM scores").to_pylist()
    assert got == [{"n": 6, "t": 6, "m": MODEL.name}]
    classes = run_query(con, "SELECT position, class FROM score_classes ORDER BY 1").to_pylist()
    assert [r["class"] for r in classes] == MODEL.classes
    probs = run_query(con, "SELECT probabilities[2] AS b FROM scores s ORDER BY track_id "
                           "LIMIT 1").to_pylist()[0]["b"]
    assert 0.0 <= probs <= 1.0
    assert run_query(connect(store, model=f"{MODEL.name}/3"),
                     "SELECT count(*) AS n FROM segment_scores").to_pylist() == [{"n": 12}]
    with pytest.raises(ParameterError, match=r"no scores of model .other."):
        connect(store, model="other")


def test_neighbours_run_is_visible_only_once_current(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    scores = ScoreStore(store)
    assert scores.neighbours_current("m", "1") is None
    run = scores.neighbours_run_dir("m", "1", "r-1")
    os.makedirs(run)
    open(f"{run}/part-000000000.parquet", "wb").close()
    assert scores.neighbours_files("m", "1") == []
    scores.commit_neighbours("m", "1", {"run_id": "r-1", "k": 5, "method": "exact",
                                        "tracks": 2, "parts": ["part-000000000.parquet"],
                                        "source_digest": "x"})
    assert scores.neighbours_files("m", "1") == [f"{run}/part-000000000.parquet"]
    newer = scores.neighbours_run_dir("m", "1", "r-2")
    os.makedirs(newer)
    scores.commit_neighbours("m", "1", {"run_id": "r-2", "k": 5, "method": "exact",
                                        "tracks": 2, "parts": [], "source_digest": "y"})
    assert not os.path.exists(run) and scores.neighbours_current("m", "1")["run_id"] == "r-2"


def test_missing_model_is_an_error(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), create=True)
    with pytest.raises(StoreError, match="no scores yet"):
        ScoreStore(store).latest()


def test_same_version_from_another_registry_is_refused(tmp_path):
    import dataclasses

    store = FeatureStore(str(tmp_path / "store"), create=True)
    scores = ScoreStore(store)
    scores.register_model(MODEL)
    scores.register_model(MODEL)  # the same run again: fine
    other = dataclasses.replace(MODEL, run_id="x" * 32)
    with pytest.raises(StoreError, match="another registry"):
        scores.register_model(other)
