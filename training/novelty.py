"""Open-set detection: whether a track is like anything the model was trained on.

A classifier's top probability does not say so: trained on a few tracks per class, every
model in this project put speech and noise into some class with high confidence (the
small-data benchmark flagged 3-34 % of such tracks at a max-probability threshold). What does
say so is distance: a track whose summary statistics lie far from every labelled track is new
material, whatever the classifier makes of it.

:class:`NoveltyDetector` keeps the *reference*: each labelled non-test track as the mean of
its segments' summary statistics (MFCC, chroma, contrast and spectral statistics, the
``segments`` table columns ingest stored), standardised per column on those tracks. A track's
*distance* is the Euclidean distance of its standardised mean to the nearest reference track;
its *novelty* is that distance over the :attr:`NoveltyDetector.threshold`, and a track is
*known* (``confident`` when scored) when its novelty is at most 1.

The threshold is a split-conformal quantile of the reference tracks' leave-one-out
distances (each to its nearest *other* reference track): the ``ceil((n + 1) level)``-th
smallest of the ``n``, so a new track drawn like the labelled ones is within it with
probability at least ``level`` (:data:`LEVEL`, 0.975: a margin over the 95 % the product
promises, because the labelled tracks are few and a test set is never drawn quite like
them). Below ``1 / (1 - level) - 1`` = 39 reference tracks the threshold is the largest
leave-one-out distance.

The detector is the same for every model of a training run (it depends on the labelled
tracks and their stored features only), so an ensemble, a CNN and a linear model flag the
same tracks. Chosen on the small-data benchmark (docs/training-results.md, decision 56).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

LEVEL = 0.975
"""Conformal coverage of the threshold: the share of in-class tracks meant to stay known."""
MAX_REFERENCE = 20_000
"""Reference tracks kept (a seeded sample above this): scoring cost grows with them."""
MIN_REFERENCE = 2
"""Fewer labelled non-test tracks than this: no detector (probability threshold only)."""
FILE = "novelty.npz"
_CHUNK = 512


def track_means(track_ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each track's segment rows.

    Parameters
    ----------
    track_ids : np.ndarray [shape=(m,)]
    x : np.ndarray [shape=(m, d)]
        Segment summary rows; non-finite values count as 0.

    Returns
    -------
    ids : np.ndarray [shape=(n,), dtype=object]
        Sorted distinct track ids.
    means : np.ndarray [shape=(n, d), dtype=float64]
    """
    ids, inverse = np.unique(np.asarray(track_ids, dtype=object), return_inverse=True)
    values = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    sums = np.zeros((len(ids), values.shape[1]), np.float64)
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    return ids, sums / np.maximum(counts, 1.0)[:, None]


def nearest_distances(query: np.ndarray, reference: np.ndarray, *,
                      exclude_self: bool = False) -> np.ndarray:
    """Euclidean distance of each ``query`` row to its nearest ``reference`` row (with
    ``exclude_self``, ``query`` is ``reference`` and a row never matches itself).
    """
    q = np.asarray(query, dtype=np.float32)
    r = np.asarray(reference, dtype=np.float32)
    out = np.empty(len(q), np.float64)
    if len(r) == 0 or (exclude_self and len(r) < 2):
        out.fill(np.inf)
        return out
    r_sq = np.einsum("ij,ij->i", r, r)
    for start in range(0, len(q), _CHUNK):
        block = q[start:start + _CHUNK]
        d2 = (np.einsum("ij,ij->i", block, block)[:, None] + r_sq[None, :]
              - 2.0 * (block @ r.T)).astype(np.float64)
        if exclude_self:
            rows = np.arange(len(block))
            d2[rows, start + rows] = np.inf
        # the expansion picks the nearest row; its distance is taken from the difference
        # itself: the expansion's cancellation leaves ~1e-7 of a squared norm (4e-4 after
        # the root) that depends on how many rows one product held, so one track scored
        # alone and in a batch got different distances to a row equal to it (0 and 4.5e-4)
        nearest = block - r[d2.argmin(axis=1)]
        out[start:start + len(block)] = np.sqrt(np.einsum("ij,ij->i", nearest, nearest,
                                                          dtype=np.float64))
    return out


def conformal_threshold(loo: np.ndarray, level: float = LEVEL) -> float:
    """The ``ceil((n + 1) level)``-th smallest of ``n`` leave-one-out distances (the largest
    when that rank passes ``n``).
    """
    values = np.sort(np.asarray(loo, dtype=np.float64))
    rank = min(len(values), math.ceil((len(values) + 1) * level))
    return float(values[rank - 1])


@dataclass
class NoveltyDetector:
    """Distance of tracks to the labelled tracks a model was trained on (module docstring)."""

    columns: list[str]
    center: np.ndarray  # (d,) float64
    scale: np.ndarray  # (d,) float64
    reference: np.ndarray  # (n, d) float32, standardised
    threshold: float
    level: float = LEVEL
    held_out_known: float = float("nan")  # leave-one-out share within the threshold

    @classmethod
    def fit(cls, track_ids: np.ndarray, x: np.ndarray, columns: Sequence[str], *,
            level: float = LEVEL, max_reference: int = MAX_REFERENCE, seed: int = 0
            ) -> NoveltyDetector | None:
        """Fit on the segment summary rows ``x`` of the labelled tracks; None with fewer than
        :data:`MIN_REFERENCE` tracks.
        """
        ids, means = track_means(track_ids, x)
        if len(ids) < MIN_REFERENCE:
            return None
        if len(ids) > max_reference:
            keep = np.sort(np.random.default_rng(seed).choice(len(ids), max_reference,
                                                              replace=False))
            means = means[keep]
        center = means.mean(axis=0)
        # a column (nearly) constant on the labelled tracks must not dominate every distance
        scale = np.maximum(means.std(axis=0), np.maximum(1e-2 * np.abs(center), 1e-6))
        reference = ((means - center) / scale).astype(np.float32)
        loo = nearest_distances(reference, reference, exclude_self=True)
        threshold = conformal_threshold(loo, level)
        return cls(list(columns), center, scale, reference, threshold, level,
                   float(np.mean(loo <= threshold)))

    def novelty(self, track_ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per track of the segment rows ``x``: ``(sorted ids, distance / threshold)``
        (float32; above 1: unlike every labelled track).
        """
        ids, means = track_means(track_ids, x)
        z = ((means - self.center) / self.scale).astype(np.float32)
        dist = nearest_distances(z, self.reference)
        return ids, (dist / max(self.threshold, 1e-12)).astype(np.float32)

    def frame_novelty(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`novelty` of a segments frame holding ``track_id`` and :attr:`columns`."""
        return self.novelty(frame["track_id"].to_numpy(object),
                            frame[self.columns].to_numpy(np.float64))

    def summary(self) -> dict[str, Any]:
        """What ``meta.json`` records of the detector (``open_set``)."""
        return {"method": "nearest labelled track (standardised segment-mean statistics)",
                "file": FILE, "level": self.level, "threshold": self.threshold,
                "reference_tracks": len(self.reference), "columns": len(self.columns),
                "held_out_known": self.held_out_known}

    def save(self, directory: str) -> str:
        """Write :data:`FILE` into ``directory``; return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE)
        np.savez(path, columns=np.array(self.columns, dtype=str), center=self.center,
                 scale=self.scale, reference=self.reference,
                 threshold=np.float64(self.threshold), level=np.float64(self.level),
                 held_out_known=np.float64(self.held_out_known))
        return path

    @classmethod
    def load(cls, directory: str) -> NoveltyDetector | None:
        """The detector saved in ``directory`` (None if there is none)."""
        path = os.path.join(directory, FILE)
        if not os.path.exists(path):
            return None
        with np.load(path, allow_pickle=False) as data:
            return cls([str(c) for c in data["columns"]], data["center"], data["scale"],
                       data["reference"], float(data["threshold"]), float(data["level"]),
                       float(data["held_out_known"]))
