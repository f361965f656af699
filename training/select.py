"""Model choice that holds on small data: repeated stratified (grouped) k-fold
cross-validation over the train + valid tracks, and the one-standard-error rule.

On a small labelled set one validation split decides nothing: with 20 validation tracks one
track moves macro-F1 by 0.05. Below :data:`CV_MAX_TRACKS` labelled tracks ``--model auto``
scores every candidate on :data:`CV_FOLDS`-fold cross-validation over the non-test tracks
(repeated :data:`CV_REPEATS` times for the classic models), and :func:`choose` keeps the
cheapest candidate whose mean macro-F1 is within one standard error of the best mean. The
chosen candidate is then refitted on train + valid (:func:`refit_split`) and evaluated once on
the test tracks, which cross-validation never sees.

Networks in a fold train for the full ``epochs`` of the schedule (no early stopping on the
held-out fold, which would select on the data it is scored on); the epoch with the best
*mean* held-out macro-F1 over the folds is the network's CV score and the epoch count of its
refit (same schedule, cut after that epoch), so no step of the refit looks at test tracks.
The out-of-fold predictions (at that epoch for a network) calibrate the refitted model
(:func:`training.trainer.calibrate`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from training.calibration import track_probabilities
from training.classic import CLASSIC_MODELS
from training.evaluate import report
from training.loop import TrainConfig, predict
from training.trainer import (
    HeldOut,
    Prepared,
    _fit_classic,
    _fit_network,
    held_out_scores,
)

CV_MAX_TRACKS = 2000
"""Labelled tracks below which ``--model auto`` chooses by cross-validation (see
docs/training.md: at 2,000 tracks a 15 % validation split holds 300 tracks, where the
standard error of macro-F1 is still about 0.02–0.03, the size of the gaps between models)."""
CV_FOLDS = 5
CV_REPEATS = 2
"""Repeats of the k-fold partition for the classic models (different shuffles)."""
NETWORK_REPEATS = 1
"""Repeats for networks: one k-fold pass (each fold is a full training run)."""
COST_ORDER = ("linear", "gbm", "mfcc_cnn", "cnn", "transformer", "short_chunk_resnet", "crnn",
              "ensemble")
"""Candidates from cheapest to dearest to train and run (docs/training-results.md); the
ensemble (:mod:`training.ensemble`) runs several of the others, so it comes last: under the
one-standard-error rule it wins only when its mean beats every single's by more than its
standard error."""
RULE = ("cheapest candidate whose mean CV macro-F1 is within one standard error "
        "(std over folds / sqrt(folds per repeat)) of the best mean")


def stratum_labels(frame: pd.DataFrame) -> pd.Series:
    """Each track's rarest label (what the splits stratify on)."""
    counts = Counter(lab for labs in frame["labels"] for lab in labs)
    return frame["labels"].map(lambda labs: min(labs, key=lambda x: (counts[x], x)))


def cv_folds(frame: pd.DataFrame, splits: pd.Series, *, folds: int = CV_FOLDS,
             repeats: int = CV_REPEATS, seed: int = 0) -> list[pd.Series]:
    """Fold assignments over the train + valid tracks: ``repeats`` × ``k`` series.

    Each series (same index as ``splits``) names a track ``train`` (fit), ``valid`` (the
    held-out fold) or ``excluded`` (the test tracks, never used). Stratified on the rarest
    label, grouped by ``frame['group']`` when present (a group never straddles a fold
    boundary), seeded. ``k`` is ``folds``, lowered to the fewest units (tracks or groups) a
    class has among train + valid (at least 2), so every class can be held out in every fold.
    Repeat ``r`` is a fresh shuffle (seed ``seed + r``); order: repeat-major.
    """
    side = splits.to_numpy(object)
    pool = np.flatnonzero((side == "train") | (side == "valid"))
    strat = stratum_labels(frame).to_numpy(object)[pool]
    groups = (frame["group"] if "group" in frame.columns else frame["track_id"]).astype(
        str).to_numpy(object)[pool]
    units = Counter(s for s, _ in set(zip(strat, groups, strict=True)))
    k = max(2, min(folds, min(units.values()) if units else 2, len(set(groups))))
    out = []
    for r in range(repeats):
        sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
        with warnings.catch_warnings():  # "the least populated class has only n members"
            warnings.simplefilter("ignore", UserWarning)
            parts = list(sgkf.split(np.zeros(len(pool)), strat, groups))
        for fit, held in parts:
            names = np.full(len(side), "excluded", dtype=object)
            names[pool[fit]] = "train"
            names[pool[held]] = "valid"
            out.append(pd.Series(names, index=splits.index, dtype=object))
    out[0].attrs["folds"] = k
    return out


def folds_per_repeat(folds: Sequence[pd.Series]) -> int:
    """``k`` of a :func:`cv_folds` result."""
    return int(folds[0].attrs.get("folds", len(folds))) if folds else 0


def refit_split(prep: Prepared) -> Prepared:
    """``prep`` with the valid tracks moved to train (the refit after cross-validation);
    test unchanged.
    """
    splits = prep.splits.where(prep.splits != "valid", "train")
    splits.attrs = dict(prep.splits.attrs)
    return replace(prep, splits=splits)


@dataclass
class CVResult:
    """A candidate's cross-validation."""

    model: str
    scores: list[float]  # held-out track macro-F1 per fold, repeat-major
    folds: int  # k
    held_out: HeldOut  # out-of-fold segment scores (the first repeat)
    epochs: int | None = None  # networks: the refit's epoch count
    curve: list[float] = field(default_factory=list)  # networks: mean held-out F1 per epoch
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """``scores``, ``mean``, ``std`` (over folds, ddof 1), ``se``, ``folds``,
        ``repeats``, ``epochs``, ``seconds``.
        """
        return {"scores": [round(float(s), 6) for s in self.scores], **spread(
            self.scores, self.folds), "folds": self.folds,
            "repeats": max(1, len(self.scores) // max(1, self.folds)), "epochs": self.epochs,
            "seconds": round(self.seconds, 3)}


def spread(scores: Sequence[float], folds: int) -> dict[str, float]:
    """``mean``, ``std`` (ddof 1; 0 for one score) and ``se`` = std / sqrt(folds) of the
    finite ``scores`` (NaN when none is finite).
    """
    s = np.asarray([x for x in scores if np.isfinite(x)], dtype=np.float64)
    if len(s) == 0:
        return {"mean": float("nan"), "std": float("nan"), "se": float("nan")}
    std = float(s.std(ddof=1)) if len(s) > 1 else 0.0
    return {"mean": float(s.mean()), "std": std, "se": std / math.sqrt(max(1, folds))}


def choose(scores: dict[str, Sequence[float]], folds: int | dict[str, int],
           order: Sequence[str] = COST_ORDER) -> dict[str, Any]:
    """The one-standard-error rule over cross-validation fold scores.

    Parameters
    ----------
    scores : dict
        Candidate -> its macro-F1 per fold.
    folds : int or dict
        Folds per repeat ``k`` (per candidate, or one for all): the standard error is
        ``std / sqrt(k)``.
    order : sequence of str
        Cheapest first; candidates not in it come after, in ``scores`` order.

    Returns
    -------
    dict
        ``rule``, ``best`` (highest mean), ``chosen`` (the cheapest candidate whose mean is at
        least ``best mean - best se``), ``bar`` (that value) and ``table`` (per candidate, in
        cost order: ``model``, ``mean``, ``std``, ``se``, ``n``).
    """
    rank = {m: i for i, m in enumerate(order)}
    names = sorted(scores, key=lambda m: (rank.get(m, len(rank)), list(scores).index(m)))
    table: list[dict[str, Any]] = [
        {"model": m, **spread(scores[m], folds[m] if isinstance(folds, dict) else folds),
         "n": len(scores[m])} for m in names]
    finite = [row for row in table if np.isfinite(float(row["mean"]))]
    if not finite:
        return {"rule": RULE, "best": names[0] if names else None,
                "chosen": names[0] if names else None, "bar": float("nan"), "table": table}
    best = max(finite, key=lambda row: float(row["mean"]))  # ties: the cheaper (first) one
    bar = float(best["mean"]) - float(best["se"])
    chosen = next(row for row in finite if float(row["mean"]) >= bar - 1e-12)
    return {"rule": RULE, "best": best["model"], "chosen": chosen["model"], "bar": bar,
            "table": table}


def cross_validate(prep: Prepared, model: str, folds: Sequence[pd.Series], workdir: str, *,
                   train_config: TrainConfig | None = None,
                   model_params: dict[str, Any] | None = None) -> CVResult:
    """Fit ``model`` on each fold's train tracks and score its held-out tracks.

    Classic models use every fold; networks the first repeat only (:data:`NETWORK_REPEATS`).
    """
    tc = train_config or TrainConfig()
    started = time.perf_counter()
    k = folds_per_repeat(folds)
    if model in CLASSIC_MODELS:
        return _cv_classic(prep, model, folds, k, tc, model_params, started)
    return _cv_network(prep, model, list(folds)[:k * NETWORK_REPEATS], k, workdir, tc,
                       model_params, started)


def _fold(prep: Prepared, assignment: pd.Series) -> Prepared:
    return replace(prep, splits=assignment)


def _macro_f1(prep: Prepared, held: HeldOut) -> float:
    if not len(held):
        return float("nan")
    multi = prep.labels.multi_label
    ids, probs = track_probabilities(held.track_ids, held.scores, 1.0, multi_label=multi)
    return float(report(prep.labels.targets(ids), probs, prep.labels.classes,
                        multi_label=multi)["macro_f1"])


def _cv_classic(prep: Prepared, model: str, folds: Sequence[pd.Series], k: int,
                tc: TrainConfig, params: dict[str, Any] | None, started: float) -> CVResult:
    scores, oof_ids, oof_scores = [], [], []
    for i, assignment in enumerate(folds):
        fold = _fold(prep, assignment)
        predictor, _ = _fit_classic(fold, model, tc, params)
        held = held_out_scores(predictor, fold, "valid")
        scores.append(_macro_f1(prep, held))
        if i < k:
            oof_ids.append(held.track_ids)
            oof_scores.append(held.scores)
    return CVResult(model, scores, k, _concat(oof_ids, oof_scores, prep),
                    seconds=time.perf_counter() - started)


def _cv_network(prep: Prepared, model: str, folds: Sequence[pd.Series], k: int, workdir: str,
                tc: TrainConfig, params: dict[str, Any] | None, started: float) -> CVResult:
    full = replace(tc, patience=tc.epochs + 1)  # the whole schedule: no early stop per fold
    curves: list[list[float]] = []
    held_per_fold: list[list[HeldOut]] = []
    for i, assignment in enumerate(folds):
        fold = _fold(prep, assignment)
        epochs_held: list[HeldOut] = []

        def score(net: Any, valid_ds: Any, fold: Prepared = fold,
                  epochs_held: list[HeldOut] = epochs_held) -> float:
            logits, _ = predict(net, valid_ds, logits=True)
            held = HeldOut(valid_ds.part.track_ids, logits.astype(np.float64), "cv")
            epochs_held.append(held)
            return _macro_f1(fold, held)

        _, _, result = _fit_network(fold, model, f"{workdir}/cv{i}", full, params,
                                    resume=False, on_epoch=None, score=score,
                                    checkpoints=False)
        curves.append([h["valid_score"] for h in result.history])
        held_per_fold.append(epochs_held)
    n_epochs = min(len(c) for c in curves)
    mean_curve = np.nanmean(np.array([c[:n_epochs] for c in curves], dtype=np.float64), 0)
    best = int(np.nanargmax(mean_curve)) if np.isfinite(mean_curve).any() else n_epochs - 1
    oof = [h[best] for h in held_per_fold[:k]]
    return CVResult(model, [c[best] for c in curves], k,
                    _concat([h.track_ids for h in oof], [h.scores for h in oof], prep),
                    epochs=best + 1, curve=[float(v) for v in mean_curve],
                    seconds=time.perf_counter() - started)


def _concat(ids: list[np.ndarray], scores: list[np.ndarray], prep: Prepared) -> HeldOut:
    n = len(prep.labels.classes)
    return HeldOut(np.concatenate(ids) if ids else np.array([], dtype=object),
                   np.concatenate(scores) if scores else np.zeros((0, n)), "cv")
