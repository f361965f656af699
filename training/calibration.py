"""Probability calibration: temperature scaling fitted on held-out tracks, expected calibration
error and reliability bins.

Every model's raw output is a log-domain score per segment (a network's logits; a classic
model's log-probabilities, or log-odds for multi-label); the probability is
``softmax(score / T)`` (``sigmoid(score / T)`` for multi-label) with one temperature ``T`` per
model, stored in the artifact (``meta['temperature']``, 1 for models trained before it). A
track's probability is the mean of its segments' (as everywhere else), so ``T`` is fitted on
the *track* probabilities of held-out tracks: the negative log-likelihood of their labels is
minimised over ``log T`` (Guo et al. 2017, "On calibration of modern neural networks").
Temperature scaling does not change which class is on top, so accuracy and macro-F1 do not
move; only the confidence does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.predictions import aggregate_tracks

ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)


def apply_temperature(scores: np.ndarray, temperature: float, *, multi_label: bool
                      ) -> np.ndarray:
    """Probabilities ``(n, n_classes)`` float32 from log-domain ``scores`` at ``temperature``.

    ``-inf`` scores (a class a classic model never saw) get probability 0.
    """
    s = np.asarray(scores, dtype=np.float64) / float(temperature)
    if multi_label:
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-s))).astype(np.float32)
    if s.shape[0] == 0:
        return s.astype(np.float32)
    top = np.max(np.where(np.isfinite(s), s, -np.inf), axis=1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    return (e / np.maximum(e.sum(1, keepdims=True), 1e-300)).astype(np.float32)


def log_scores(probabilities: np.ndarray, *, multi_label: bool) -> np.ndarray:
    """Log-domain scores whose :func:`apply_temperature` at T = 1 gives ``probabilities``
    back: log-probabilities (single label) or log-odds (multi-label), float64.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore"):
        if multi_label:
            return np.log(p) - np.log1p(-np.minimum(p, 1.0))
        return np.log(p)


def track_probabilities(track_ids: np.ndarray, scores: np.ndarray, temperature: float, *,
                        multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted track ids, mean segment probabilities)`` at ``temperature``."""
    agg = aggregate_tracks(track_ids, apply_temperature(scores, temperature,
                                                        multi_label=multi_label))
    return agg.track_ids, agg.probabilities


def _nll(targets: np.ndarray, probs: np.ndarray, multi_label: bool) -> float:
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    if multi_label:
        return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log1p(-p)))
    t = targets / np.maximum(targets.sum(1, keepdims=True), 1e-12)
    return float(-np.mean((t * np.log(p)).sum(1)))


def fit_temperature(track_ids: np.ndarray, scores: np.ndarray, targets_of: Any, *,
                    multi_label: bool) -> float:
    """The temperature minimising the track-level NLL of held-out segments' ``scores``.

    Parameters
    ----------
    track_ids : np.ndarray [shape=(m,)]
        Track of each segment row.
    scores : np.ndarray [shape=(m, n_classes)]
        Uncalibrated log-domain scores (see :func:`log_scores`).
    targets_of : callable
        Sorted track ids -> multi-hot targets (e.g. :meth:`training.labels.LabelSet.targets`).

    Returns
    -------
    float
        In :data:`T_BOUNDS`; 1.0 without held-out rows.
    """
    from scipy.optimize import minimize_scalar  # 0.22 s to import: fitting only, not scoring

    if len(track_ids) == 0:
        return 1.0
    ids = aggregate_tracks(track_ids, np.zeros((len(track_ids), 1), np.float32)).track_ids
    targets = np.asarray(targets_of(ids), np.float64)

    def loss(log_t: float) -> float:
        _, probs = track_probabilities(track_ids, scores, float(np.exp(log_t)),
                                       multi_label=multi_label)
        return _nll(targets, probs, multi_label)

    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    grid = np.linspace(lo, hi, 25)  # a coarse grid first: the NLL need not be convex in log T
    start = grid[int(np.argmin([loss(g) for g in grid]))]
    step = grid[1] - grid[0]
    res = minimize_scalar(loss, bounds=(max(lo, start - step), min(hi, start + step)),
                          method="bounded", options={"xatol": 1e-3})
    best = float(res.x) if res.success and loss(float(res.x)) <= loss(start) else float(start)
    return float(np.exp(best))


def _events(targets: np.ndarray, probs: np.ndarray, multi_label: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, correct)`` pairs the calibration error is measured on."""
    t, p = np.asarray(targets), np.asarray(probs, np.float64)
    if multi_label:  # every (track, class) probability is a yes/no forecast
        return p.ravel(), (t >= 0.5).ravel().astype(np.float64)
    top = p.argmax(1)
    return p[np.arange(len(p)), top], (t[np.arange(len(t)), top] >= 0.5).astype(np.float64)


def reliability(targets: np.ndarray, probs: np.ndarray, *, multi_label: bool,
                bins: int = ECE_BINS) -> dict[str, Any]:
    """Reliability bins and the expected calibration error (ECE).

    Single label: the top class's probability against whether it is right; multi-label:
    every class probability against whether the class is a label. ``bins`` equal-width bins
    over [0, 1]; ECE is the count-weighted mean ``|accuracy - confidence|`` over the bins.

    Returns
    -------
    dict
        ``ece``, and per bin ``edges`` (``bins + 1``), ``confidence``, ``accuracy`` (None for
        an empty bin) and ``count``.
    """
    conf, correct = _events(targets, probs, multi_label)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sum_conf = np.bincount(which, weights=conf, minlength=bins)
    sum_acc = np.bincount(which, weights=correct, minlength=bins)
    filled = count > 0
    mean_conf = np.where(filled, sum_conf / np.maximum(count, 1), np.nan)
    mean_acc = np.where(filled, sum_acc / np.maximum(count, 1), np.nan)
    ece = float(np.sum(np.abs(mean_acc - mean_conf)[filled] * count[filled]) / len(conf)) \
        if len(conf) else float("nan")
    return {"ece": ece, "edges": edges.round(6).tolist(),
            "confidence": [None if not f else round(float(c), 6)
                           for f, c in zip(filled, mean_conf, strict=True)],
            "accuracy": [None if not f else round(float(a), 6)
                         for f, a in zip(filled, mean_acc, strict=True)],
            "count": count.astype(int).tolist()}


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, *, multi_label: bool,
                               bins: int = ECE_BINS) -> float:
    """ECE of ``probs`` (see :func:`reliability`)."""
    return float(reliability(targets, probs, multi_label=multi_label, bins=bins)["ece"])
