"""The open-set detector: conformal threshold, distances, save/load, and what it flags."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.novelty import (
    NoveltyDetector,
    conformal_threshold,
    nearest_distances,
    track_means,
)


def test_track_means_average_each_tracks_segments_and_zero_non_finite():
    ids, means = track_means(np.array(["b", "a", "b"], dtype=object),
                             np.array([[1.0, 2.0], [5.0, np.nan], [3.0, 4.0]]))
    assert list(ids) == ["a", "b"]
    np.testing.assert_allclose(means, [[5.0, 0.0], [2.0, 3.0]])


def test_nearest_distances_match_brute_force_and_leave_self_out(rng):
    ref = rng.normal(size=(700, 5)).astype(np.float32)  # more rows than one chunk
    q = rng.normal(size=(30, 5)).astype(np.float32)
    brute = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nearest_distances(q, ref), brute, rtol=1e-4, atol=1e-4)
    full = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(nearest_distances(ref, ref, exclude_self=True), full.min(1),
                               rtol=1e-4, atol=1e-3)
    assert np.isinf(nearest_distances(q[:1], ref[:1], exclude_self=True)).all()


def test_a_row_equal_to_a_reference_row_is_at_distance_zero_alone_or_in_a_batch(rng):
    """Summary statistics have large norms: the product expansion alone left a squared
    distance of ~1e-7 of them, rooted to ~1e-3, that depended on the batch."""
    ref = (rng.normal(size=(300, 40)) * 30 + 100).astype(np.float32)
    q = np.concatenate([ref[:1], rng.normal(size=(63, 40)).astype(np.float32) * 30 + 100])
    alone, batch = nearest_distances(q[:1], ref), nearest_distances(q, ref)
    assert alone[0] == 0.0 and batch[0] == 0.0
    brute = np.sqrt(((q[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(batch, brute, rtol=1e-5)


def test_conformal_threshold_is_the_rank_ceil_n_plus_1_times_level():
    loo = np.arange(1, 101, dtype=np.float64)[::-1]  # 100 values, unsorted
    assert conformal_threshold(loo, 0.95) == 96.0  # ceil(101 * 0.95) = 96
    assert conformal_threshold(loo[:10], 0.975) == 100.0  # rank 11 > 10: the largest


def test_in_distribution_tracks_stay_known_and_far_ones_are_flagged(rng):
    """Coverage holds on fresh draws from the labelled distribution (the conformal promise,
    checked over many draws), and tracks from elsewhere are flagged.
    """
    cols = [f"c{i}" for i in range(8)]
    scale = rng.uniform(0.5, 50.0, size=8)  # columns on very different scales

    def tracks(n, shift=0.0, prefix="t"):
        ids = np.repeat([f"{prefix}{i}" for i in range(n)], 3)
        centers = rng.normal(shift, 1.0, size=(n, 8))
        x = (np.repeat(centers, 3, axis=0) + rng.normal(0, 0.2, size=(3 * n, 8))) * scale
        return ids, x

    ids, x = tracks(200)
    det = NoveltyDetector.fit(ids, x, cols)
    assert det is not None and len(det.reference) == 200
    assert det.held_out_known >= det.level
    kept = []
    for _ in range(20):
        fid, fx = tracks(50, prefix="new")
        _, nov = det.novelty(fid, fx)
        kept.append(np.mean(nov <= 1.0))
    assert np.mean(kept) >= 0.95
    oid, ox = tracks(50, shift=6.0, prefix="odd")
    _, nov = det.novelty(oid, ox)
    assert np.mean(nov > 1.0) >= 0.95


def test_constant_columns_do_not_dominate_and_too_few_tracks_give_no_detector(rng):
    ids = np.repeat(["a", "b", "c", "d"], 2)
    x = np.column_stack([rng.normal(size=8), np.full(8, 7.0)])
    det = NoveltyDetector.fit(ids, x, ["x", "const"])
    assert det is not None
    # the constant column moves by 1 % of its value: a small distance, not an infinite one
    _, nov = det.novelty(np.array(["q"], dtype=object), np.array([[x[0, 0], 7.07]]))
    assert math.isfinite(float(nov[0])) and nov[0] < 5
    assert NoveltyDetector.fit(np.array(["a"], dtype=object), x[:1], ["x", "const"]) is None


def test_reference_is_capped_with_a_seeded_sample(rng):
    ids = np.arange(300).astype(str).astype(object)
    x = rng.normal(size=(300, 3))
    a = NoveltyDetector.fit(ids, x, list("xyz"), max_reference=100, seed=1)
    b = NoveltyDetector.fit(ids, x, list("xyz"), max_reference=100, seed=1)
    assert a is not None and b is not None and len(a.reference) == 100
    np.testing.assert_array_equal(a.reference, b.reference)


def test_save_and_load_round_trip(tmp_path, rng):
    ids = np.repeat(np.arange(20).astype(str), 2).astype(object)
    det = NoveltyDetector.fit(ids, rng.normal(size=(40, 4)), list("abcd"))
    assert det is not None
    det.save(str(tmp_path))
    back = NoveltyDetector.load(str(tmp_path))
    assert back is not None and back.columns == list("abcd")
    assert back.threshold == pytest.approx(det.threshold)
    q = rng.normal(size=(6, 4))
    qid = np.arange(6).astype(str).astype(object)
    np.testing.assert_allclose(back.novelty(qid, q)[1], det.novelty(qid, q)[1])
    assert NoveltyDetector.load(str(tmp_path / "none")) is None
