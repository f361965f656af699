"""Model choice by cross-validation, pooled track features and temperature scaling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    log_scores,
    reliability,
)
from training.classic import POOL_STATS, pool_segments, pooled_columns
from training.select import choose, cv_folds, folds_per_repeat, spread


def test_choice_keeps_the_cheapest_within_one_standard_error():
    folds = 5
    scores = {"linear": [0.80, 0.78, 0.84, 0.76, 0.82],  # mean 0.80
              "gbm": [0.86, 0.70, 0.90, 0.74, 0.85],  # mean 0.81, the best, std 0.087
              "mfcc_cnn": [0.60, 0.62, 0.58, 0.66, 0.64]}
    got = choose(scores, folds)
    assert got["best"] == "gbm" and got["chosen"] == "linear"
    gbm = next(r for r in got["table"] if r["model"] == "gbm")
    assert gbm["std"] == pytest.approx(np.std(scores["gbm"], ddof=1))
    assert gbm["se"] == pytest.approx(gbm["std"] / np.sqrt(folds))
    assert got["bar"] == pytest.approx(gbm["mean"] - gbm["se"])
    # a gain larger than the best's standard error is kept, even by a dearer model
    clear = {"linear": [0.70, 0.72, 0.68, 0.71, 0.69], "gbm": scores["gbm"]}
    assert choose(clear, folds)["chosen"] == "gbm"
    # cost order, not dict order, decides among the eligible; NaN folds are skipped
    ties = {"mfcc_cnn": [0.8, 0.8, np.nan], "gbm": [0.8, 0.8, 0.8]}
    assert choose(ties, 3)["chosen"] == "gbm"
    assert [r["model"] for r in choose(ties, 3)["table"]] == ["gbm", "mfcc_cnn"]
    assert np.isnan(spread([np.nan], 5)["mean"])


def test_cv_folds_are_stratified_grouped_and_never_touch_test():
    rng = np.random.default_rng(0)
    n = 90
    labels = [["a"], ["b"], ["c"]] * (n // 3)
    frame = pd.DataFrame({"track_id": [f"t{i}" for i in range(n)], "labels": labels,
                          "group": [f"g{i // 3}" for i in rng.permutation(n)]})
    side_of = dict(zip(sorted(set(frame["group"])), rng.choice(
        ["train", "train", "train", "valid", "test"], n // 3), strict=True))
    splits = frame["group"].map(side_of)
    folds = cv_folds(frame, splits, folds=5, repeats=2, seed=1)
    assert len(folds) == 10 and folds_per_repeat(folds) == 5
    test = splits.to_numpy() == "test"
    for r in range(2):
        held = np.zeros(n, int)
        for f in folds[r * 5:(r + 1) * 5]:
            side = f.to_numpy()
            assert (side[test] == "excluded").all()
            held += side == "valid"
            for g, rows in frame.groupby("group").groups.items():  # a group on one side
                assert len(set(side[list(rows)])) == 1, g
            assert {lab[0] for lab in frame["labels"][side == "valid"]} == {"a", "b", "c"}
        assert (held[~test] == 1).all()  # every non-test track held out once per repeat
    assert not folds[0].equals(folds[5])  # repeats reshuffle


def test_pooled_features_per_track():
    ids = np.array(["b", "a", "b", "a", "a"], dtype=object)
    seg = np.array([1, 2, 0, 0, 1])
    x = np.array([[4.0, 1.0], [3.0, 0.0], [2.0, 1.0], [1.0, 0.0], [5.0, 0.0]])
    tracks, pooled, inverse = pool_segments(ids, seg, x)
    assert list(tracks) == ["a", "b"] and pooled.shape == (2, 2 * len(POOL_STATS))
    names = pooled_columns(["x", "y"])
    a = dict(zip(names, pooled[0], strict=True))
    # track a in segment order: x = 1, 5, 3
    assert a["x__mean"] == pytest.approx(3.0)
    assert a["x__std"] == pytest.approx(np.std([1, 5, 3]))
    assert a["x__p10"] == pytest.approx(np.percentile([1, 5, 3], 10))
    assert a["x__p50"] == pytest.approx(3.0) and a["x__p90"] == pytest.approx(4.6)
    assert a["x__delta"] == pytest.approx((4 + 2) / 2)  # |5-1|, |3-5|
    b = dict(zip(names, pooled[1], strict=True))
    assert b["x__delta"] == pytest.approx(2.0) and b["y__delta"] == pytest.approx(0.0)
    assert list(tracks[inverse]) == list(ids)
    _, single, _ = pool_segments(np.array(["z"], object), None, x[:1])
    assert single[0, names.index("x__std")] == 0 and single[0, names.index("x__delta")] == 0


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model():
    rng = np.random.default_rng(3)
    n, k = 600, 4
    truth = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), truth] += 1.5  # right about 70 % of the time ...
    logits *= 6.0  # ... but almost sure every time
    targets = np.eye(k, dtype=np.float32)[truth]
    ids = np.array([f"t{i:04d}" for i in range(n)], dtype=object)
    by_id = dict(zip(ids, targets, strict=True))

    def targets_of(track_ids):
        return np.stack([by_id[t] for t in track_ids])

    fit, held = slice(0, 400), slice(400, None)
    t = fit_temperature(ids[fit], logits[fit], targets_of, multi_label=False)
    assert t > 2.0
    before = apply_temperature(logits[held], 1.0, multi_label=False)
    after = apply_temperature(logits[held], t, multi_label=False)
    ece_before = expected_calibration_error(targets[held], before, multi_label=False)
    ece_after = expected_calibration_error(targets[held], after, multi_label=False)
    assert ece_before > 0.2 and ece_after < ece_before / 2, (ece_before, ece_after)
    assert (after.argmax(1) == before.argmax(1)).all()  # the ranking does not move
    rel = reliability(targets[held], after, multi_label=False)
    assert sum(rel["count"]) == 200 and len(rel["edges"]) == 16
    # log-probabilities round-trip (what classic models are calibrated through)
    p = apply_temperature(logits[:5], 1.0, multi_label=False)
    np.testing.assert_allclose(apply_temperature(log_scores(p, multi_label=False), 1.0,
                                                 multi_label=False), p, rtol=1e-5)
