"""Ensembles: one model that averages the calibrated probabilities of a few trained taggers.

An :class:`Ensemble` is a :class:`~training.artifact.Predictor` whose probabilities are the
weighted mean (equal weights) of its members' *calibrated* probabilities, each member at its
own temperature. It adds no temperature of its own (its ``temperature`` is 1), so what it
returns is exactly that mean; its open-set threshold is chosen on its own held-out
probabilities (the mean of the members' calibrated held-out probabilities).

Inputs: members may read different inputs (``linear``/``gbm`` the summary rows, networks the
log-mel or MFCC tensors). When every member reads the same one, so does the ensemble
(``input`` is that kind and callers feed it as they feed a single model); otherwise its
``input`` is :data:`~training.trainer.MIXED` and :meth:`Ensemble.predict` takes a dict
``{kind: input}`` (``meta['inputs']`` lists the kinds) whose entries hold the same segments in
the same order: a summary frame with :attr:`Ensemble.input_columns`, and ``(n, rows, frames)``
arrays. A track-pooled member needs all of a track's rows in one call.

Embeddings: the concatenation of the members' L2-normalised embeddings, divided by
``sqrt(members)``. Each row has unit length and the cosine similarity of two rows is the mean
of the members' cosine similarities, so every member counts the same in ``mtag neighbours``
whatever its embedding size (``embed_dim`` is the sum of the members').

The artifact folder (:meth:`Ensemble.save`) holds ``meta.json`` (``kind`` ``"ensemble"``,
``members``: per member ``model``, ``path``, ``weight``, ``score``, ``input``) and one
artifact folder per member under ``members/`` (``members/0-linear``, ...), loaded by
:func:`training.artifact.load`.

:func:`fit_ensemble` builds one from fitted candidates without training anything: their held-out
predictions (out-of-fold after cross-validation, else the valid split) give the ensemble's
held-out probabilities, its threshold and, with folds, its per-fold CV macro-F1.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks.errors import ParameterError
from tasks.predictions import align_classes, l2_normalize
from training import artifact
from training.calibration import log_scores, track_probabilities
from training.novelty import NoveltyDetector
from training.select import COST_ORDER, CVResult, _macro_f1, folds_per_repeat, refit_split
from training.trainer import MIXED, FitOutput, HeldOut, Prepared, _base_meta, _finish

ENSEMBLE = "ensemble"
DEFAULT_SIZE = 3
"""Members of an ensemble: the best three single candidates."""
MIN_SIZE = 2
MEMBERS_DIR = "members"


@dataclass
class Ensemble(artifact.Predictor):
    """The weighted mean of its :attr:`members`' calibrated probabilities (see the module
    docstring for inputs and embeddings).
    """

    members: list[artifact.Predictor] = field(default_factory=list)

    @property
    def weights(self) -> list[float]:
        """Member weights (sum 1), in :attr:`members` order."""
        return [float(m["weight"]) for m in self.meta["members"]]

    @property
    def embed_dim(self) -> int:
        """Sum of the members' embedding sizes."""
        return sum(m.embed_dim for m in self.members)

    def predict(self, x: artifact.ModelInput, *, embeddings: bool = False,
                batch_size: int | None = None, raw: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``(n, n_classes)`` (the weighted mean of the members' calibrated
        ones) and, if asked, embeddings ``(n, embed_dim)``; ``raw``: their log-domain scores
        (log-probabilities, or log-odds for multi-label), at temperature 1.
        """
        inputs = self._inputs(x)
        multi = bool(self.meta["multi_label"])
        total: np.ndarray | None = None
        embs: list[np.ndarray] = []
        for weight, member in zip(self.weights, self.members, strict=True):
            p, e = member.predict(inputs, embeddings=embeddings, batch_size=batch_size)
            p = align_classes(p, member.classes, self.classes).astype(np.float64) * weight
            total = p if total is None else total + p
            if embeddings:
                embs.append(l2_normalize(e if e is not None else
                                         np.zeros((len(p), member.embed_dim), np.float32)))
        assert total is not None
        emb = (np.concatenate(embs, axis=1) / np.float32(math.sqrt(len(embs)))).astype(
            np.float32) if embeddings else None
        if raw:
            return log_scores(total, multi_label=multi), emb
        return total.astype(np.float32), emb

    def _inputs(self, x: artifact.ModelInput) -> Mapping[str, Any]:
        kinds = list(self.meta["inputs"])
        if isinstance(x, Mapping):
            missing = [k for k in kinds if k not in x]
            if missing:
                raise ParameterError(f"this ensemble's members read {', '.join(kinds)}: the "
                                     f"input dict lacks {', '.join(missing)}")
            return x
        if self.input == MIXED:
            raise ParameterError(f"this ensemble's members read {', '.join(kinds)}: pass a "
                                 "dict {kind: input} holding the same segments in each")
        return {self.input: x}

    def save(self, directory: str) -> str:
        """Write ``meta.json`` (kind ``ensemble``) and each member's folder under
        ``members/``; return ``directory``.
        """
        for member, info in zip(self.members, self.meta["members"], strict=True):
            member.save(os.path.join(directory, info["path"]))
        if self.novelty is not None:
            self.novelty.save(directory)
        artifact.write_meta(directory, self.meta | {"kind": ENSEMBLE})
        return directory


def load_ensemble(directory: str, meta: dict[str, Any], *, device: str | None = None
                  ) -> Ensemble:
    """The ensemble of an artifact folder whose ``meta`` (already read) is of kind
    ``ensemble``; its members load on ``device``.
    """
    members = [artifact.load(os.path.join(directory, m["path"]), device=device)
               for m in meta["members"]]
    return Ensemble(meta, members=members, device=_device(members),
                    novelty=NoveltyDetector.load(directory))


def _device(members: Sequence[artifact.Predictor]) -> torch.device:
    return next((m.device for m in members if m.torch_model is not None),
                torch.device("cpu"))


def build(prep: Prepared, members: Sequence[artifact.Predictor], scores: Sequence[float]
          ) -> Ensemble:
    """An equally weighted ensemble of ``members`` (trained on ``prep``'s feature set and
    label set), their selection ``scores`` recorded in its metadata; not yet calibrated.
    """
    if len(members) < MIN_SIZE:
        raise ParameterError(f"an ensemble averages at least {MIN_SIZE} models, got "
                             f"{len(members)}")
    weight = 1.0 / len(members)
    kinds = list(dict.fromkeys(m.input for m in members))
    summary = [m for m in members if m.input == "summary"]
    infos = [{"model": m.meta["model"], "path": f"{MEMBERS_DIR}/{i}-{m.meta['model']}",
              "weight": weight, "score": float(s), "input": m.input}
             for i, (m, s) in enumerate(zip(members, scores, strict=True))]
    meta = _base_meta(prep, ENSEMBLE) | {
        "input": kinds[0] if len(kinds) == 1 else MIXED, "inputs": kinds,
        "columns": list(dict.fromkeys(c for m in summary for c in m.meta["columns"])),
        "pooling": "track" if any(m.pooled for m in summary) else "segment",
        "members": infos, "embedding": "concatenated L2-normalised member embeddings",
        "model_config": {"name": ENSEMBLE, "members": [i["model"] for i in infos],
                         "weights": [weight] * len(members)}}
    if len(kinds) == 1 and "shape" in members[0].meta:
        meta["shape"] = members[0].meta["shape"]
    return Ensemble(meta, members=list(members), device=_device(members))


def pick_members(scores: Mapping[str, float], size: int = DEFAULT_SIZE,
                 order: Sequence[str] = COST_ORDER) -> list[str]:
    """The ``size`` candidates with the highest (finite) score, best first; ties go to the
    cheaper one (``order``). An ``ensemble`` among ``scores`` is never a member.
    """
    if size < MIN_SIZE:
        raise ParameterError(f"an ensemble averages at least {MIN_SIZE} models; got size "
                             f"{size}")
    rank = {m: i for i, m in enumerate(order)}
    usable = [m for m, s in scores.items() if m != ENSEMBLE and np.isfinite(s)]
    return sorted(usable, key=lambda m: (-float(scores[m]), rank.get(m, len(rank))))[:size]


def combine_held_out(held: Sequence[HeldOut], temperatures: Sequence[float],
                     weights: Sequence[float], *, multi_label: bool) -> HeldOut:
    """The ensemble's held-out tracks: each member's calibrated track probabilities (its
    held-out segment scores at its temperature) averaged with ``weights`` over the tracks
    every member holds out. One row per track (sorted), as log-domain scores at temperature 1.
    """
    per = [track_probabilities(h.track_ids, h.scores, t, multi_label=multi_label)
           for h, t in zip(held, temperatures, strict=True)]
    common = functools.reduce(np.intersect1d, [ids for ids, _ in per])
    total = sum((w * p[np.searchsorted(ids, common)].astype(np.float64)
                 for (ids, p), w in zip(per, weights, strict=True)),
                np.zeros((len(common), per[0][1].shape[1])))
    return HeldOut(np.asarray(common, dtype=object), log_scores(total, multi_label=multi_label),
                   held[0].source if held else "valid")


def fold_scores(prep: Prepared, held: HeldOut, folds: Sequence[pd.Series]) -> list[float]:
    """Track macro-F1 of ``held`` (out-of-fold rows) on each fold of the first repeat."""
    track_ids = prep.labels.frame["track_id"].to_numpy(object)
    out = []
    for assignment in list(folds)[:folds_per_repeat(folds)]:
        mask = np.isin(held.track_ids, track_ids[assignment.to_numpy(object) == "valid"])
        out.append(_macro_f1(prep, HeldOut(held.track_ids[mask], held.scores[mask], "cv")))
    return out


@dataclass(frozen=True)
class Member:
    """A fitted candidate an ensemble can take in."""

    model: str
    artifact_dir: str
    held_out: str  # its HeldOut (.npz, see HeldOut.save): what calibrated it
    score: float  # CV mean or valid macro-F1


def fit_ensemble(prep: Prepared, members: Sequence[Member], workdir: str, *,
                 folds: Sequence[pd.Series] | None = None
                 ) -> tuple[FitOutput, CVResult | None]:
    """The ensemble of fitted ``members``: calibrated on their held-out predictions (threshold
    only), reported on test, saved under ``workdir/ensemble/artifact``. No model is trained.

    With ``folds`` (the cross-validation the members went through, whose out-of-fold
    predictions they hold) the result also has the ensemble's CV scores (first repeat: the
    members keep out-of-fold predictions of one repeat) and the ensemble is reported on the
    test split of ``refit_split(prep)``, as its refitted members were.
    """
    started = time.perf_counter()
    predictors = [artifact.load(m.artifact_dir) for m in members]
    ens = build(prep, predictors, [m.score for m in members])
    held = combine_held_out([HeldOut.load(m.held_out) for m in members],
                            [p.temperature for p in predictors], ens.weights,
                            multi_label=prep.labels.multi_label)
    cv = CVResult(ENSEMBLE, fold_scores(prep, held, folds), folds_per_repeat(folds), held) \
        if folds else None
    params = {"model": ENSEMBLE, "members": [m.model for m in members],
              "weights": ens.weights}
    out = _finish(refit_split(prep) if folds else prep, ens, params, workdir, result=None,
                  started=started, held_out=held, temperature=1.0)
    return out, cv  # cv.seconds stays 0: the ensemble's CV score trains nothing
