"""Fit and evaluate one model on a labelled feature set (no MLflow, no Prefect here).

:func:`prepare` matches labels to the store's tracks and splits them; :func:`fit_candidate`
trains a named model and returns its predictor, reports and artifact folder; :func:`evaluate_split`
scores any predictor on a split of any prepared labelled set.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from featurestore.query import connect, run_query
from featurestore.reader import TensorReader
from featurestore.store import FeatureStore
from tasks.errors import ParameterError
from tasks.predictions import aggregate_tracks, align_classes
from tasks.version import CODE_VERSION
from training import artifact
from training.calibration import (
    apply_temperature,
    fit_temperature,
    log_scores,
    track_probabilities,
)
from training.classic import (
    CLASSIC_MODELS,
    DEFAULT_POOLING,
    POOLINGS,
    build_classic,
    fit_classic,
    pool_segments,
    pooled_columns,
)
from training.data import SegmentDataset, SplitRows, row_statistics, split_rows, summary_frame
from training.evaluate import confidence_threshold, report
from training.labels import LabelSet, labels_from_tags, match_labels, read_labels, tag_source
from training.loop import (
    TrainConfig,
    TrainResult,
    balanced_weights,
    pick_device,
    predict,
    seed_everything,
    train_network,
)
from training.models import MODEL_CONFIGS, Tagger, build_model
from training.novelty import NoveltyDetector

MODEL_NAMES = (*MODEL_CONFIGS, *CLASSIC_MODELS)
MIXED = "mixed"
"""Input kind of an ensemble whose members read different inputs (see
:mod:`training.ensemble`): a dict ``{kind: input}`` with the same rows in each."""
_EMPTY_REPORT: dict[str, Any] = {"n": 0, "accuracy": float("nan"), "macro_f1": float("nan"),
                                 "weighted_f1": float("nan"), "per_class": []}


@dataclass
class Prepared:
    """A labelled feature set with its split."""

    store: FeatureStore
    feature_set: str
    labels: LabelSet
    splits: pd.Series
    versions: dict[str, int] = field(default_factory=dict)  # table versions read (lineage)
    _reader: TensorReader | None = None
    _summary: tuple[pd.DataFrame, list[str]] | None = None
    _tensor_row_of: dict[tuple[Any, int], int] | None = None
    _novelty: tuple[frozenset[Any], NoveltyDetector | None] | None = None

    @property
    def reader(self) -> TensorReader:
        """Memory-mapped tensors of the feature set (opened once)."""
        if self._reader is None:
            self._reader = TensorReader(self.store, self.feature_set,
                                        version=self.versions.get("segments"))
        return self._reader

    @property
    def summary(self) -> tuple[pd.DataFrame, list[str]]:
        """Segment summary table and its feature columns (read once)."""
        if self._summary is None:
            self._summary = summary_frame(self.store, self.feature_set,
                                          version=self.versions.get("segments"))
        return self._summary

    def track_ids(self, *, test: bool) -> np.ndarray:
        """Labelled track ids of the test split (``test``) or of every other split."""
        ids = self.labels.frame["track_id"].to_numpy(object)
        return ids[(self.splits.to_numpy(object) == "test") == test]

    def novelty(self) -> NoveltyDetector | None:
        """The open-set detector of the labelled non-test tracks (:mod:`training.novelty`),
        fitted once per set of such tracks.
        """
        known = frozenset(self.track_ids(test=False))
        if self._novelty is None or self._novelty[0] != known:
            table, columns = self.summary
            rows = table["track_id"].isin(known).to_numpy()
            self._novelty = (known, NoveltyDetector.fit(
                table["track_id"].to_numpy(object)[rows],
                table.loc[rows, columns].to_numpy(np.float64), columns))
        return self._novelty[1]

    def parts(self, kind: str) -> dict[str, SplitRows]:
        """Segment rows per split, for tensor (``logmel``/``mfcc``) or ``summary`` inputs."""
        if kind == "summary":
            table, _ = self.summary
            return split_rows(table["track_id"].to_numpy(object), self.labels, self.splits)
        return split_rows(self.reader.index.track_id, self.labels, self.splits)

    def split_counts(self) -> dict[str, int]:
        """Tracks per split."""
        return {str(k): int(v) for k, v in self.splits.value_counts().items()}

    def tensor_rows(self, track_ids: np.ndarray, segments: np.ndarray) -> np.ndarray:
        """Reader rows (positions in :attr:`reader`) of the segments ``(track_ids,
        segments)``, e.g. of summary table rows.
        """
        index = self.reader.index
        if self._tensor_row_of is None:
            self._tensor_row_of = {(t, int(g)): i for i, (t, g) in enumerate(
                zip(index.track_id, index.segment, strict=True))}
        try:
            return np.array([self._tensor_row_of[(t, int(g))] for t, g in
                             zip(track_ids, segments, strict=True)], dtype=np.int64)
        except KeyError as exc:
            raise ParameterError(f"segment {exc.args[0]} has no tensor row in feature set "
                                 f"{self.feature_set}") from exc


@dataclass
class HeldOut:
    """Uncalibrated predictions of held-out segments: what the temperature and the open-set
    threshold are fitted on (the valid split, or the out-of-fold predictions of
    cross-validation).
    """

    track_ids: np.ndarray  # (m,) object: each segment row's track
    scores: np.ndarray  # (m, n_classes) log-domain scores (see training.calibration)
    source: str = "valid"  # or "cv" (out-of-fold)

    def __len__(self) -> int:
        return int(len(self.track_ids))

    def save(self, path: str) -> str:
        """Write to an ``.npz`` file (no pickles); return ``path``."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        np.savez(path, track_ids=np.asarray(self.track_ids, dtype=str),
                 scores=np.asarray(self.scores, np.float64), source=np.array(self.source))
        return path

    @classmethod
    def load(cls, path: str) -> HeldOut:
        """Inverse of :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            return cls(data["track_ids"].astype(object), data["scores"], str(data["source"]))


@dataclass
class FitOutput:
    """A trained model and how it did."""

    model: str
    predictor: artifact.Predictor
    artifact_dir: str
    params: dict[str, Any]
    valid: dict[str, Any]
    test_segment: dict[str, Any]
    test_track: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    segments_per_s: float = 0.0
    data_wait_share: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    held_out: HeldOut | None = None  # what calibrated it (uncalibrated scores)


def prepare(store_url: str, labels_path: str, *, feature_set: str | None = None,
            group_column: str | None = None, valid_size: float = 0.15,
            test_size: float = 0.15, seed: int = 0,
            as_of: str | int | dict[str, int] | None = None) -> Prepared:
    """Match a labels file to a store's tracks and split them by track.

    The tables are read at fixed versions (the current ones, or those ``as_of`` names: see
    :meth:`featurestore.store.FeatureStore.versions_as_of`), recorded in
    :attr:`Prepared.versions`, so the same training set can be rebuilt later.
    """
    from training.split import split_tracks

    store = FeatureStore(store_url)
    fs = feature_set or store.default_feature_set()
    versions = store.versions_as_of(fs, as_of)
    tag = tag_source(labels_path)
    extra = "".join(f", {c}" for c in dict.fromkeys([tag, group_column]) if c) if tag else ""
    con = connect(store, fs, as_of=versions)
    try:
        tracks = run_query(con, f"SELECT track_id, path, status{extra} FROM tracks").to_pandas()
        sources = run_query(con, "SELECT uri, track_id FROM sources").to_pandas()
    finally:
        con.close()
    rows = (labels_from_tags(tracks, tag, group_column=group_column) if tag else
            read_labels(labels_path, group_column=group_column))
    labels = match_labels(rows, tracks, sources)
    splits = split_tracks(labels.frame, valid_size=valid_size, test_size=test_size, seed=seed)
    labels.frame["split"] = splits.to_numpy()
    return Prepared(store, fs, labels, splits, versions)


def fit_candidate(prep: Prepared, model: str, workdir: str, *,
                  train_config: TrainConfig | None = None,
                  model_params: dict[str, Any] | None = None, resume: bool = True,
                  on_epoch: Any = None, held_out: HeldOut | None = None,
                  epochs: int | None = None) -> FitOutput:
    """Train ``model`` on the train split, select on valid, calibrate, report on test.

    ``held_out`` (out-of-fold predictions) calibrates the model instead of the valid split;
    ``epochs`` trains a network for exactly that many epochs and keeps the last weights
    (no early stopping: the refit on train + valid after cross-validation).
    """
    if model not in MODEL_NAMES:
        raise ParameterError(f"unknown model {model!r}; choose from {list(MODEL_NAMES)} or auto")
    tc = train_config or TrainConfig()
    started = time.perf_counter()
    result: TrainResult | None = None
    if model in CLASSIC_MODELS:
        predictor, params = _fit_classic(prep, model, tc, model_params)
    else:
        predictor, params, result = _fit_network(prep, model, workdir, tc, model_params,
                                                 resume=resume, on_epoch=on_epoch,
                                                 epochs=epochs)
    return _finish(prep, predictor, params, workdir, result=result, started=started,
                   held_out=held_out)


def _base_meta(prep: Prepared, model: str) -> dict[str, Any]:
    """Artifact metadata every model kind shares."""
    labels = prep.labels
    return {
        "model": model, "classes": labels.classes, "multi_label": labels.multi_label,
        "feature_set": prep.feature_set, "feature_config": prep.store.config(
            prep.feature_set).to_dict(),
        "label_set": labels.digest, "code_version": CODE_VERSION,
        "table_versions": dict(prep.versions),
    }


def _fit_classic(prep: Prepared, model: str, tc: TrainConfig,
                 model_params: dict[str, Any] | None) -> tuple[artifact.Predictor, dict[str, Any]]:
    """Fit a scikit-learn model on the summary columns, pooled per track unless
    ``{"pooling": "segment"}``; its predictor and params.
    """
    multi = prep.labels.multi_label
    params = {"pooling": DEFAULT_POOLING[model], **(model_params or {})}
    if params["pooling"] not in POOLINGS:
        raise ParameterError(f"--model-params pooling {params['pooling']!r}: choose from "
                             f"{', '.join(POOLINGS)}")
    table, columns = prep.summary
    train = prep.parts("summary")["train"]
    x = table[columns].to_numpy(np.float32)[train.rows]
    est = build_classic(model, multi_label=multi, seed=tc.seed, params=params,
                        balance=tc.balance)
    meta = _base_meta(prep, model) | {"input": "summary", "columns": columns,
                                      "pooling": params["pooling"],
                                      "model_config": {"name": model, **params}}
    if params["pooling"] == "track":
        ids, pooled, _ = pool_segments(train.track_ids,
                                       table["segment"].to_numpy()[train.rows], x)
        fit_classic(est, pooled, prep.labels.targets(ids), multi_label=multi)
        meta["features"] = pooled_columns(columns)
    else:
        fit_classic(est, x, train.targets, multi_label=multi)
    return artifact.Predictor(meta, sklearn_model=est), {"model": model, **params}


def _fit_network(prep: Prepared, model: str, workdir: str, tc: TrainConfig,
                 model_params: dict[str, Any] | None, *, resume: bool, on_epoch: Any,
                 epochs: int | None = None, score: Callable[..., float] | None = None,
                 checkpoints: bool = True
                 ) -> tuple[artifact.Predictor, dict[str, Any], TrainResult]:
    """Train a network on segment tensors, checkpointing under ``workdir/model``.

    ``epochs``: stop after that many epochs of the configured schedule and keep the last
    weights (no validation needed); ``score``: ``(net, valid dataset) -> float`` instead of
    the track macro-F1 on valid.
    """
    labels = prep.labels
    cfg = MODEL_CONFIGS[model](**(model_params or {}))
    seed_everything(tc.seed)  # weights are initialised from the seed, not from history
    reader = prep.reader
    parts = prep.parts(cfg.input)
    net = build_model(cfg, reader.shapes[cfg.input][0], len(labels.classes))
    net.multi_label = labels.multi_label  # type: ignore[assignment]
    net.standardize.set(*row_statistics(reader, parts["train"], cfg.input, seed=tc.seed))
    train_ds = SegmentDataset(reader, parts["train"], cfg.input, crop_frames=tc.crop_frames,
                              seed=tc.seed)
    valid_ds = SegmentDataset(reader, parts["valid"], cfg.input)
    weights = balanced_weights(parts["train"].targets, multi_label=labels.multi_label) \
        if tc.balance and len(parts["train"]) else None
    run_tc = tc
    if epochs is not None:  # the schedule of tc.epochs, cut after `epochs` epochs
        per_epoch = max(1, -(-len(train_ds) // tc.batch_size))
        steps = epochs * per_epoch if not tc.max_steps else min(tc.max_steps,
                                                                 epochs * per_epoch)
        run_tc = replace(tc, max_steps=steps, patience=tc.epochs + 1)
    result = train_network(net, train_ds, valid_ds, run_tc, multi_label=labels.multi_label,
                           score=(lambda n: score(n, valid_ds)) if score else
                           _valid_score(labels, valid_ds), class_weights=weights,
                           checkpoint_dir=os.path.join(
                               workdir, model, "refit" if epochs is not None else "",
                               "checkpoints") if checkpoints else None,
                           resume=resume, on_epoch=on_epoch, keep_last=epochs is not None)
    net.cpu()
    meta = _base_meta(prep, model) | {"input": cfg.input, "model_config": cfg.to_dict(),
                                      "shape": list(reader.shapes[cfg.input])}
    params = {**cfg.to_dict(), **{f"train.{k}": v for k, v in tc.to_dict().items()}}
    return artifact.Predictor(meta, torch_model=net), params, result


def _valid_score(labels: LabelSet, valid_ds: SegmentDataset) -> Callable[[Tagger], float]:
    """Track-level validation macro-F1 of a network (0 without validation segments)."""

    def score(net: Tagger) -> float:
        if len(valid_ds) == 0:
            return 0.0
        probs, _ = predict(net, valid_ds)
        agg = aggregate_tracks(valid_ds.part.track_ids, probs)
        return float(report(labels.targets(agg.track_ids), agg.probabilities, labels.classes,
                            multi_label=labels.multi_label)["macro_f1"])

    return score


def calibrate(predictor: artifact.Predictor, labels: LabelSet, held_out: HeldOut, *,
              temperature: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the temperature on ``held_out`` tracks and set it and the open-set threshold (on
    the calibrated probabilities) in ``predictor.meta``; a given ``temperature`` is kept
    instead of fitted (an ensemble's 1: its members are calibrated).

    Returns
    -------
    tuple of dict
        The calibrated track report of the held-out tracks, and the calibration record:
        ``temperature``, ``source``, ``tracks``, ``ece_before`` and ``ece_after``.
    """
    multi = labels.multi_label
    if not len(held_out):
        predictor.meta |= {"temperature": temperature or 1.0, "threshold": 0.0}
        return _EMPTY_REPORT, {"temperature": temperature or 1.0, "source": held_out.source,
                               "tracks": 0}
    if temperature is None:
        temperature = fit_temperature(held_out.track_ids, held_out.scores, labels.targets,
                                      multi_label=multi)
    ids, before = track_probabilities(held_out.track_ids, held_out.scores, 1.0,
                                      multi_label=multi)
    _, probs = track_probabilities(held_out.track_ids, held_out.scores, temperature,
                                   multi_label=multi)
    targets = labels.targets(ids)
    rep = report(targets, probs, labels.classes, multi_label=multi)
    predictor.meta["temperature"] = temperature
    predictor.meta["threshold"] = confidence_threshold(targets, probs, multi_label=multi)
    ece_before = report(targets, before, labels.classes, multi_label=multi)["ece"]
    return rep, {"temperature": temperature, "source": held_out.source, "tracks": len(ids),
                 "ece_before": ece_before, "ece_after": rep["ece"]}


def attach_open_set(predictor: artifact.Predictor, prep: Prepared) -> None:
    """Give ``predictor`` the run's open-set detector and record it in its meta
    (``open_set``: the detector's summary, and ``test_known``, the share of test tracks it
    keeps known, over ``test_tracks``).
    """
    detector = prep.novelty()
    predictor.novelty = detector
    if detector is None:
        predictor.meta["open_set"] = None
        return
    table, _ = prep.summary
    frame = table[table["track_id"].isin(prep.track_ids(test=True))]
    _, novelty = detector.frame_novelty(frame)
    predictor.meta["open_set"] = detector.summary() | {
        "test_tracks": len(novelty),
        "test_known": float(np.mean(novelty <= 1.0)) if len(novelty) else float("nan")}


def held_out_scores(predictor: artifact.Predictor, prep: Prepared, split: str = "valid"
                    ) -> HeldOut:
    """Uncalibrated segment scores of ``split``."""
    ids, scores, _ = predict_split(predictor, prep, split, raw=True)
    return HeldOut(ids, scores, split)


def _finish(prep: Prepared, predictor: artifact.Predictor, params: dict[str, Any],
            workdir: str, *, result: TrainResult | None, started: float,
            held_out: HeldOut | None = None, temperature: float | None = None) -> FitOutput:
    """Calibrate (at ``temperature`` if given) and set the open-set threshold on held-out
    tracks (valid, or ``held_out``), report on test, save the artifact.
    """
    labels, model = prep.labels, predictor.meta["model"]
    held = held_out if held_out is not None else held_out_scores(predictor, prep, "valid")
    valid_track, calibration = calibrate(predictor, labels, held, temperature=temperature)
    predictor.meta["train_tracks"] = int((prep.splits == "train").sum())
    attach_open_set(predictor, prep)
    test_seg, test_track = evaluate_split(predictor, prep, "test")
    out_dir = predictor.save(os.path.join(workdir, model, "artifact"))
    net = predictor.torch_model
    if net is not None:
        predictor = replace(predictor, device=pick_device())
        net.place(predictor.device)
    return FitOutput(model, predictor, out_dir, params, valid_track, test_seg, test_track,
                     history=result.history if result else [],
                     train_seconds=time.perf_counter() - started,
                     segments_per_s=result.segments_per_s if result else 0.0,
                     data_wait_share=result.data_wait_share if result else 0.0,
                     calibration=calibration, held_out=held)


def predict_split(predictor: artifact.Predictor, prep: Prepared, split: str, *,
                  tracks: bool = False, raw: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(track ids, probabilities, targets)`` for a split, per segment or per track;
    ``raw``: uncalibrated log-domain scores instead of probabilities (per segment).

    A ``mixed`` input (an ensemble of models on different inputs) gets, per batch of whole
    tracks, a dict of each input its members need, row-aligned on the summary table's rows.
    """
    kind = predictor.input
    part = prep.parts("summary" if kind == MIXED else kind)[split]
    if len(part) == 0:
        n = len(prep.labels.classes)
        return np.array([], dtype=object), np.zeros((0, n), np.float32), np.zeros((0, n))
    if kind == "summary":
        table, _ = prep.summary
        probs, _ = predictor.predict(table.iloc[part.rows][predictor.input_columns], raw=raw)
    elif kind == MIXED:
        probs = np.zeros((len(part), len(predictor.classes)), np.float32)
        for at in _whole_tracks(part.track_ids, 512):
            probs[at] = predictor.predict(_mixed_input(prep, predictor, part.rows[at]),
                                          raw=raw)[0]
    else:
        probs = np.concatenate([
            predictor.predict(np.stack([prep.reader.matrix(kind, int(r))
                                        for r in part.rows[i:i + 512]]), raw=raw)[0]
            for i in range(0, len(part), 512)])
    if raw and list(predictor.classes) != list(prep.labels.classes):
        multi = prep.labels.multi_label
        probs = log_scores(align_classes(apply_temperature(probs, 1.0, multi_label=multi),
                                         predictor.classes, prep.labels.classes),
                           multi_label=multi)
    else:
        probs = align_classes(probs, predictor.classes, prep.labels.classes)
    if not tracks or raw:
        return part.track_ids, probs, part.targets
    agg = aggregate_tracks(part.track_ids, probs)
    return agg.track_ids, agg.probabilities, prep.labels.targets(agg.track_ids)


def _whole_tracks(track_ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Positions into ``track_ids`` in batches of about ``size`` that never split a track (a
    track-pooled member needs all of a track's segments in one call).
    """
    order = np.argsort(track_ids, kind="stable")
    ids = track_ids[order]
    bounds = [0]
    for start in np.flatnonzero(ids[1:] != ids[:-1]) + 1:
        if start - bounds[-1] >= size:
            bounds.append(int(start))
    bounds.append(len(ids))
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def _mixed_input(prep: Prepared, predictor: artifact.Predictor, rows: np.ndarray
                 ) -> dict[str, Any]:
    """The inputs of summary table ``rows`` for each input kind of ``predictor``'s members:
    ``summary`` rows, and ``logmel``/``mfcc`` matrices of the same segments.
    """
    table, _ = prep.summary
    frame = table.iloc[rows]
    out: dict[str, Any] = {}
    for kind in predictor.meta["inputs"]:
        if kind == "summary":
            out[kind] = frame[predictor.input_columns]
        else:
            at = prep.tensor_rows(frame["track_id"].to_numpy(object),
                                  frame["segment"].to_numpy())
            out[kind] = np.stack([prep.reader.matrix(kind, int(r)) for r in at])
    return out


def evaluate_split(predictor: artifact.Predictor, prep: Prepared, split: str
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segment-level and track-level reports of ``predictor`` on ``split``."""
    classes, multi = prep.labels.classes, prep.labels.multi_label
    ids, probs, targets = predict_split(predictor, prep, split)
    if len(ids) == 0:
        return _EMPTY_REPORT, _EMPTY_REPORT
    seg = report(targets, probs, classes, multi_label=multi)
    agg = aggregate_tracks(ids, probs)
    return seg, report(prep.labels.targets(agg.track_ids), agg.probabilities, classes,
                       multi_label=multi)
