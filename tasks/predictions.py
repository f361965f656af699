"""Scoring math: from segment probabilities and embeddings to track tags and embeddings.

Pure functions on arrays (no model, no I/O). A track's probabilities are the mean of its
segments' (as in training's track-level evaluation), its embedding the L2-normalised mean of its
segments' embeddings; top-k labels, the multi-label tag rule, the open-set ``confident`` flag and
the alignment of a model's classes to a label set's are decided here so training, the writer,
the tests and the benchmarks share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.errors import ParameterError

MULTI_LABEL_TAG_THRESHOLD = 0.5
"""A multi-label class is a tag of a track when its probability reaches this value."""


@dataclass(frozen=True)
class TrackScores:
    """Scores of ``n`` tracks.

    Attributes
    ----------
    track_ids : np.ndarray [shape=(n,), dtype=object]
        Sorted unique track ids.
    n_segments : np.ndarray [shape=(n,), dtype=int32]
        Segments averaged per track.
    probabilities : np.ndarray [shape=(n, n_classes), dtype=float32]
        Mean segment probabilities.
    embeddings : np.ndarray [shape=(n, d), dtype=float32] or None
        L2-normalised mean segment embeddings.
    """

    track_ids: np.ndarray
    n_segments: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray | None


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Scale each row of ``x`` to unit Euclidean length (all-zero rows stay zero).

    Parameters
    ----------
    x : np.ndarray [shape=(n, d)]
    eps : float
        Rows with a norm below ``eps`` are left at zero instead of divided.

    Returns
    -------
    np.ndarray [shape=(n, d), dtype=float32]
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ParameterError(f"expected a (n, d) array, got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return np.where(norms > eps, x / np.maximum(norms, eps), 0.0).astype(np.float32)


def aggregate_tracks(track_ids: np.ndarray, probabilities: np.ndarray,
                     embeddings: np.ndarray | None = None) -> TrackScores:
    """Average segment rows per track.

    Parameters
    ----------
    track_ids : np.ndarray [shape=(m,)]
        Track id of each segment row (any order).
    probabilities : np.ndarray [shape=(m, n_classes)]
    embeddings : np.ndarray [shape=(m, d)], optional

    Returns
    -------
    TrackScores
        One row per distinct track id, sorted by id; embeddings are L2-normalised after the
        mean.
    """
    track_ids = np.asarray(track_ids, dtype=object)
    if len(track_ids) != len(probabilities) or (
            embeddings is not None and len(embeddings) != len(track_ids)):
        raise ParameterError("track_ids, probabilities and embeddings need the same rows")
    if len(track_ids) == 0:
        d = 0 if embeddings is None else embeddings.shape[1]
        return TrackScores(np.array([], dtype=object), np.array([], dtype=np.int32),
                           np.zeros((0, probabilities.shape[1]), np.float32),
                           None if embeddings is None else np.zeros((0, d), np.float32))
    order = np.argsort(track_ids, kind="stable")
    ids, start = np.unique(track_ids[order], return_index=True)
    counts = np.diff(np.append(start, len(order)))

    def mean(values: np.ndarray) -> np.ndarray:
        sums = np.add.reduceat(np.asarray(values, np.float64)[order], start, axis=0)
        return (sums / counts[:, None]).astype(np.float32)

    emb = None if embeddings is None else l2_normalize(mean(embeddings))
    return TrackScores(ids, counts.astype(np.int32), mean(probabilities), emb)


def align_classes(probabilities: np.ndarray, model_classes: list[str], classes: list[str]
                  ) -> np.ndarray:
    """Reorder a model's probability columns to ``classes``.

    A class the model never learned (in ``classes``, not in ``model_classes``) gets probability
    0 in every row; a class of the model missing from ``classes`` is dropped.

    Parameters
    ----------
    probabilities : np.ndarray [shape=(n, len(model_classes))]
        Column ``i`` is the probability of ``model_classes[i]``.
    model_classes : list of str
        The classes of the model, in its column order.
    classes : list of str
        The wanted column order (e.g. a label set's classes).

    Returns
    -------
    np.ndarray [shape=(n, len(classes))]
        Column ``j`` is the probability of ``classes[j]``; float32, or ``probabilities``
        itself when ``model_classes`` already equals ``classes``.

    Raises
    ------
    ParameterError
        If ``probabilities`` is not ``(n, len(model_classes))``.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(model_classes):
        raise ParameterError(f"expected a (n, {len(model_classes)}) array, got shape "
                             f"{probabilities.shape}")
    if list(model_classes) == list(classes):
        return probabilities
    index = {c: i for i, c in enumerate(model_classes)}
    known = [j for j, c in enumerate(classes) if c in index]
    out = np.zeros((len(probabilities), len(classes)), dtype=np.float32)
    out[:, known] = probabilities[:, [index[classes[j]] for j in known]]
    return out


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest probabilities of each row, largest first.

    Ties keep the lower class index first. ``k`` is capped at the number of classes.

    Returns
    -------
    index : np.ndarray [shape=(n, k'), dtype=int64]
    values : np.ndarray [shape=(n, k'), dtype=float32]
    """
    if k < 1:
        raise ParameterError(f"k must be >= 1, got {k}")
    p = np.asarray(probabilities, dtype=np.float32)
    k = min(k, p.shape[1])
    index = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return index, np.take_along_axis(p, index, axis=1)


def confident(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Open-set flag of a model without a detector: the top probability reaches ``threshold``.

    The threshold is chosen on validation data when the model is trained (the max-probability
    that keeps 95 % of the correct validation predictions) and stored with it. Models trained
    since decision 56 carry an open-set detector instead (:mod:`training.novelty`; see
    :func:`score_rows`).

    Returns
    -------
    np.ndarray [shape=(n,), dtype=bool]
    """
    p = np.asarray(probabilities, dtype=np.float32)
    if p.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return p.max(axis=1) >= np.float32(threshold)


def tags(probabilities: np.ndarray, classes: list[str], *, multi_label: bool,
         threshold: float = MULTI_LABEL_TAG_THRESHOLD) -> list[list[str]]:
    """The tags of each row: the top class (single label) or every class at ``threshold``.

    Returns
    -------
    list of list of str
        One list per row, in class-probability order (largest first).
    """
    p = np.asarray(probabilities, dtype=np.float32)
    if not multi_label:
        return [[classes[i]] for i in p.argmax(axis=1)] if p.shape[0] else []
    order = np.argsort(-p, axis=1, kind="stable")
    return [[classes[j] for j in row if p[i, j] >= threshold] for i, row in enumerate(order)]


def score_rows(track_ids: np.ndarray, segments: np.ndarray, probabilities: np.ndarray,
               embeddings: np.ndarray | None, classes: list[str], *, threshold: float,
               multi_label: bool, top: int = 5,
               novelty: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Columns of the ``scores`` (per track) and ``segment_scores`` (per segment) rows.

    Parameters
    ----------
    track_ids, segments : np.ndarray [shape=(m,)]
        Track id and segment number of each scored segment.
    probabilities : np.ndarray [shape=(m, n_classes)]
        Segment probabilities in ``classes`` order.
    embeddings : np.ndarray [shape=(m, d)], optional
    classes : list of str
    threshold : float
        Open-set threshold of the model (see :func:`confident`).
    multi_label : bool
    top : int
        Labels kept in ``top_labels``.
    novelty : (np.ndarray, np.ndarray), optional
        ``(track ids, novelty)`` of the model's open-set detector (:mod:`training.novelty`);
        given, a track (and each of its segments) is ``confident`` when its novelty is at
        most 1, and ``threshold`` is not used. A track it lacks gets NaN, not confident.

    Returns
    -------
    tracks : dict
        ``track_id``, ``label``, ``probability``, ``confident``, ``novelty`` (NaN without a
        detector), ``tags``, ``top_labels``, ``top_probabilities``, ``probabilities``,
        ``embedding``, ``n_segments``; one row per track, sorted by id.
    segments : dict
        ``track_id``, ``segment``, ``label``, ``probability``, ``confident``,
        ``probabilities``; in input order.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    names = np.array(classes, dtype=object)
    agg = aggregate_tracks(track_ids, probs, embeddings)
    top_i, top_p = top_k(agg.probabilities, top) if len(agg.track_ids) else (
        np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))
    track_novelty = np.full(len(agg.track_ids), np.nan, np.float32)
    if novelty is not None:
        have = dict(zip(novelty[0], np.asarray(novelty[1], np.float32), strict=True))
        track_novelty = np.array([have.get(t, np.nan) for t in agg.track_ids], np.float32)
        known = track_novelty <= 1.0  # NaN: not known
        by_track = dict(zip(agg.track_ids, known, strict=True))
        seg_confident = np.array([by_track[t] for t in track_ids], dtype=bool)
    else:
        known = confident(agg.probabilities, threshold)
        seg_confident = confident(probs, threshold)
    tracks = {
        "track_id": agg.track_ids,
        "label": names[agg.probabilities.argmax(1)] if len(agg.track_ids) else names[:0],
        "probability": agg.probabilities.max(1) if len(agg.track_ids) else np.zeros(0),
        "confident": known,
        "novelty": track_novelty,
        "tags": tags(agg.probabilities, classes, multi_label=multi_label),
        "top_labels": [list(names[r]) for r in top_i],
        "top_probabilities": [r.tolist() for r in top_p],
        "probabilities": agg.probabilities,
        "embedding": agg.embeddings,
        "n_segments": agg.n_segments,
    }
    seg = {
        "track_id": np.asarray(track_ids, dtype=object),
        "segment": np.asarray(segments, dtype=np.int32),
        "label": names[probs.argmax(1)] if len(probs) else names[:0],
        "probability": probs.max(1) if len(probs) else np.zeros(0, np.float32),
        "confident": seg_confident,
        "probabilities": probs,
    }
    return tracks, seg
