"""Scoring math: aggregation, top-k, the open-set flag, tags and the row builder."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import ParameterError
from tasks.predictions import (
    aggregate_tracks,
    align_classes,
    confident,
    l2_normalize,
    score_rows,
    tags,
    top_k,
)


def test_aggregate_is_the_mean_per_track_in_any_order(rng):
    ids = np.array(["b", "a", "b", "c", "a", "b"], dtype=object)
    probs = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
    emb = rng.standard_normal((6, 3)).astype(np.float32)
    out = aggregate_tracks(ids, probs, emb)
    assert out.track_ids.tolist() == ["a", "b", "c"]
    assert out.n_segments.tolist() == [2, 3, 1]
    np.testing.assert_allclose(out.probabilities[1], probs[[0, 2, 5]].mean(0), rtol=1e-6)
    want = emb[[1, 4]].mean(0)
    np.testing.assert_allclose(out.embeddings[0], want / np.linalg.norm(want), rtol=1e-5)
    perm = rng.permutation(6)  # one at a time == shuffled batch
    again = aggregate_tracks(ids[perm], probs[perm], emb[perm])
    np.testing.assert_allclose(again.probabilities, out.probabilities, rtol=1e-6)
    np.testing.assert_allclose(again.embeddings, out.embeddings, rtol=1e-5)


def test_aggregate_checks_rows_and_handles_empty():
    with pytest.raises(ParameterError, match="same rows"):
        aggregate_tracks(np.array(["a"], dtype=object), np.zeros((2, 3)))
    empty = aggregate_tracks(np.array([], dtype=object), np.zeros((0, 3)), np.zeros((0, 4)))
    assert empty.probabilities.shape == (0, 3) and empty.embeddings.shape == (0, 4)


def test_align_classes_reorders_and_fills_unknown_classes_with_zero():
    p = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], dtype=np.float32)
    model = ["a", "b", "c"]
    np.testing.assert_array_equal(align_classes(p, model, ["c", "a", "b"]), p[:, [2, 0, 1]])
    out = align_classes(p, model, ["b", "new", "a"])  # "new": never learned, "c": dropped
    want = np.array([[0.2, 0.0, 0.1], [0.3, 0.0, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(out, want)
    assert out.dtype == np.float32
    same = align_classes(p, model, list(model))
    np.testing.assert_array_equal(same, p)
    with pytest.raises(ParameterError, match=r"\(n, 3\)"):
        align_classes(p[:, :2], model, model)


def test_l2_normalize_unit_rows_and_zero_rows_stay_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    with pytest.raises(ParameterError, match=r"\(n, d\)"):
        l2_normalize(np.zeros(3))


def test_top_k_order_ties_and_cap():
    p = np.array([[0.1, 0.4, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1]], dtype=np.float32)
    idx, val = top_k(p, 3)
    assert idx.tolist() == [[1, 2, 0], [0, 1, 2]]  # ties: lower class first
    np.testing.assert_allclose(val[0], [0.4, 0.4, 0.1])
    assert top_k(p, 10)[0].shape == (2, 4)
    with pytest.raises(ParameterError, match="k must be"):
        top_k(p, 0)


def test_confident_is_top_probability_at_threshold():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    assert confident(p, 0.8).tolist() == [False, True, True]
    assert confident(np.zeros((0, 2)), 0.5).shape == (0,)


def test_tags_single_and_multi_label():
    p = np.array([[0.6, 0.7, 0.1], [0.2, 0.3, 0.4]], dtype=np.float32)
    classes = ["rock", "pop", "jazz"]
    assert tags(p, classes, multi_label=False) == [["pop"], ["jazz"]]
    assert tags(p, classes, multi_label=True) == [["pop", "rock"], []]


def test_score_rows_tracks_and_segments_agree(rng):
    ids = np.array(["t2", "t1", "t2"], dtype=object)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], dtype=np.float32)
    emb = rng.standard_normal((3, 5)).astype(np.float32)
    tracks, segs = score_rows(ids, np.array([0, 0, 1]), probs, emb, ["a", "b"],
                              threshold=0.75, multi_label=False, top=1)
    assert tracks["track_id"].tolist() == ["t1", "t2"]
    assert tracks["label"].tolist() == ["b", "a"]
    np.testing.assert_allclose(tracks["probability"], [0.8, 0.8], rtol=1e-6)
    assert tracks["confident"].tolist() == [True, True]
    assert tracks["top_labels"] == [["b"], ["a"]] and tracks["n_segments"].tolist() == [1, 2]
    assert segs["label"].tolist() == ["a", "b", "a"]
    assert segs["confident"].tolist() == [True, True, False]
    np.testing.assert_allclose(np.linalg.norm(tracks["embedding"], axis=1), 1.0, rtol=1e-6)


def test_score_rows_with_a_detector_flag_by_novelty_not_probability():
    ids = np.array(["t2", "t1", "t2", "t3"], dtype=object)
    probs = np.array([[0.99, 0.01], [0.55, 0.45], [0.98, 0.02], [0.6, 0.4]], np.float32)
    novelty = (np.array(["t1", "t2"], dtype=object), np.array([0.4, 3.0], np.float32))
    tracks, segs = score_rows(ids, np.array([0, 0, 1, 0]), probs, None, ["a", "b"],
                              threshold=0.9, multi_label=False, novelty=novelty)
    # t1: uncertain but like the labelled tracks; t2: sure but unlike them; t3: not measured
    assert tracks["track_id"].tolist() == ["t1", "t2", "t3"]
    assert tracks["confident"].tolist() == [True, False, False]
    np.testing.assert_allclose(tracks["novelty"][:2], [0.4, 3.0])
    assert np.isnan(tracks["novelty"][2])
    assert segs["confident"].tolist() == [False, True, False, False]
    plain, _ = score_rows(ids, np.array([0, 0, 1, 0]), probs, None, ["a", "b"],
                          threshold=0.9, multi_label=False)
    assert plain["confident"].tolist() == [False, True, False]
    assert np.isnan(plain["novelty"]).all()
