"""Classic classifiers on summary statistics: ``linear`` and ``gbm``.

``linear`` sees one row per *track* by default: each segment summary column pooled over the
track's segments (:data:`POOL_STATS`: mean, spread, 10th/50th/90th percentiles and the mean
absolute change between consecutive segments), computed from the ``segments`` table rows
that ingest stored, never from audio. ``gbm`` keeps one row per segment by default (on the
demo catalogue pooled rows cost it 0.14 of CV macro-F1 and took 3 x as long: 540 columns
over a hundred rows); ``{"pooling": "track"}`` or ``{"pooling": "segment"}`` chooses
(:data:`DEFAULT_POOLING`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

# scikit-learn is imported where a model is built or fitted, not with this module: a scoring
# worker of a network imports training.artifact (and so this module) and never needs it
# (scikit-learn and the scipy.stats it pulls in were 1.3 CPU-s of the fork server's boot)

CLASSIC_MODELS = ("linear", "gbm")
POOL_STATS = ("mean", "std", "p10", "p50", "p90", "delta")
"""Statistics over a track's segments, per segment summary column, in feature order."""
POOLINGS = ("track", "segment")
DEFAULT_POOLING = {"linear": "track", "gbm": "segment"}
SERIAL_ROWS = 10_000
"""Below this many training rows classic models fit on one thread."""


def pooled_columns(columns: list[str]) -> list[str]:
    """Names of the pooled features of ``columns``: ``<column>__<stat>``, stat-major."""
    return [f"{c}__{stat}" for stat in POOL_STATS for c in columns]


def pool_segments(track_ids: np.ndarray, segments: np.ndarray | None, x: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool segment rows ``x`` ``(m, d)`` into one row per track ``(n, 6 d)``.

    Parameters
    ----------
    track_ids : np.ndarray [shape=(m,)]
    segments : np.ndarray [shape=(m,)], optional
        Segment numbers: consecutive segments for ``delta``; None keeps the row order.
    x : np.ndarray [shape=(m, d)]

    Returns
    -------
    ids : np.ndarray [shape=(n,), dtype=object]
        Sorted distinct track ids.
    pooled : np.ndarray [shape=(n, 6 d), dtype=float32]
        Per track, column blocks in :data:`POOL_STATS` order (see :func:`pooled_columns`):
        mean, population std, 10th/50th/90th percentiles (linear interpolation) and the mean
        of ``|x[s+1] - x[s]|`` over consecutive segments (0 for a one-segment track).
    inverse : np.ndarray [shape=(m,), dtype=int64]
        Row of ``pooled`` each input row belongs to.
    """
    tids = np.asarray(track_ids, dtype=object)
    x = np.asarray(x, dtype=np.float64)
    seg = np.arange(len(tids)) if segments is None else np.asarray(segments)
    order = np.lexsort((seg, tids.astype(str)))
    ids, start, inverse_sorted = np.unique(tids[order], return_index=True, return_inverse=True)
    stop = np.append(start[1:], len(order))
    d = x.shape[1]
    pooled = np.zeros((len(ids), len(POOL_STATS) * d), dtype=np.float64)
    xs = x[order]
    for i, (a, b) in enumerate(zip(start, stop, strict=True)):
        block = xs[a:b]
        q = np.percentile(block, [10, 50, 90], axis=0)
        delta = np.abs(np.diff(block, axis=0)).mean(0) if b - a > 1 else np.zeros(d)
        pooled[i] = np.concatenate([block.mean(0), block.std(0), q[0], q[1], q[2], delta])
    inverse = np.empty(len(tids), dtype=np.int64)
    inverse[order] = inverse_sorted
    return ids.astype(object), pooled.astype(np.float32), inverse


def build_classic(name: str, *, multi_label: bool, seed: int = 0,
                  params: dict[str, Any] | None = None, balance: bool = False) -> Pipeline:
    """A scaler + classifier pipeline (one-vs-rest for multi-label); ``balance`` weights
    classes by inverse frequency.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    params = params or {}
    weight = "balanced" if balance else None
    if name == "linear":
        clf: Any = LogisticRegression(C=params.get("C", 1.0), max_iter=params.get("max_iter",
                                                                                  3000),
                                      class_weight=weight)
    elif name == "gbm":
        # one row per track is a small set: scikit-learn's 100 rounds, not 300 (each round
        # builds a tree per class over 6 x the columns)
        rounds = 100 if params.get("pooling", DEFAULT_POOLING[name]) == "track" else 300
        clf = HistGradientBoostingClassifier(
            max_iter=params.get("max_iter", rounds), learning_rate=params.get("lr", 0.1),
            early_stopping="auto", random_state=seed, class_weight=weight)
    else:
        raise ValueError(f"unknown classic model {name!r}; choose from {CLASSIC_MODELS}")
    if multi_label:
        clf = OneVsRestClassifier(clf)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def fit_classic(model: Pipeline, x: np.ndarray, targets: np.ndarray, *,
                multi_label: bool) -> Pipeline:
    """Fit on ``x`` ``(n, d)`` and multi-hot ``targets`` ``(n, n_classes)``."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.multiclass import OneVsRestClassifier
    from threadpoolctl import threadpool_limits

    y = targets.astype(int) if multi_label else targets.argmax(1)
    clf = model.named_steps["clf"]
    base = clf.estimator if isinstance(clf, OneVsRestClassifier) else clf
    if isinstance(base, HistGradientBoostingClassifier):
        # the default leaf size (20) cannot split small training sets at all
        base.set_params(min_samples_leaf=max(2, min(20, len(x) // 20)))
    if len(x) < SERIAL_ROWS:
        # OpenMP threads on a few thousand rows spin more than they work: on 2 shared cores
        # 60 rows took 12 s with 2 threads and 1 s with one (2,000 rows: 34 s and 9 s)
        with threadpool_limits(1):
            model.fit(x, y)
    else:
        model.fit(x, y)
    return model


def classic_proba(model: Pipeline, x: np.ndarray, n_classes: int,
                  dtype: type = np.float32) -> np.ndarray:
    """Class probabilities ``(n, n_classes)``, with classes absent from training at 0."""
    proba: np.ndarray = np.asarray(model.predict_proba(x), dtype=dtype)
    if proba.shape[1] == n_classes:
        return proba
    out: np.ndarray = np.zeros((len(x), n_classes), dtype=dtype)
    out[:, model.classes_] = proba
    return out
