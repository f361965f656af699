"""The ``train_flow`` flow: prepare → fit candidates → evaluate → register → promote.

Each fit is an MLflow run (nested under one parent run per invocation) in the experiment named
after the registered model. ``--model auto`` on fewer than
:data:`~training.select.CV_MAX_TRACKS` labelled tracks cross-validates its candidates over
train + valid and keeps the cheapest within one standard error of the best
(:func:`training.select.choose`), refitted on train + valid; on more, the best candidate on
validation macro-F1. The ensemble of the best few singles (:mod:`training.ensemble`) is a
candidate too, the dearest one. The chosen one is registered and gets alias ``candidate``; alias
``champion`` moves only if the candidate beats the current champion on the same evaluation
split (the candidate's test tracks), and the comparison is logged.

Wiring only: the task bodies are in :mod:`flows.train_worker`; the flow logs its progress and
returns a :class:`TrainSummary` that callers render (it prints nothing).

:func:`run_train` is how the command line trains: :func:`preflight` checks the parameters and
the labels file against the store *before* a flow run starts (as :func:`flows.ingest.look_up`
does for ingest), so a bad input is one :class:`~tasks.errors.MtagError` and no Prefect
traceback; an expected error that only shows inside the run is kept off the console too
(:func:`quiet_expected_errors`). The flow runs the same checks, for callers that start it
directly (the schedules).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.progress import Progress
from flows.records import from_fields
from flows.report import publish, run_id
from flows.train_worker import ensemble_and_log, fit_and_log, register_and_promote
from tasks.errors import MtagError, ParameterError, StoreError
from training import tracking
from training.artifact import Predictor
from training.artifact import load as load_artifact
from training.ensemble import DEFAULT_SIZE, ENSEMBLE, MIN_SIZE, pick_members
from training.labels import DROP_REASONS, read_labels, require_classes, tag_source
from training.loop import TrainConfig, pick_device
from training.select import CV_MAX_TRACKS, choose, cv_folds, folds_per_repeat
from training.split import check_sizes, check_split
from training.trainer import MODEL_NAMES, Prepared, evaluate_split, prepare

DEFAULT_NAME = "mtag-tagger"
SMALL_DATA_TRACKS = 300
CANDIDATE_NAMES = (*MODEL_NAMES, ENSEMBLE)
"""What ``--candidates`` may name."""
WORK_PREFIX = "mtag-train-"
"""Prefix of the temporary folder a run without ``workdir`` trains in (removed at its end)."""


CPU_AUTO_PARAMS: dict[str, dict[str, Any]] = {
    "short_chunk_resnet": {"channels": 32, "embed_dim": 256}}
"""Sizes ``--model auto`` uses without a GPU: the short-chunk ResNet at a quarter of its
paper width trained in 9 minutes on 3,724 philharmonia notes on 2 cores and was the best
model there (docs/training-results.md); at full width it takes hours."""


@dataclass(frozen=True)
class TrainSummary:
    """What a train run did.

    Attributes
    ----------
    registered_name : str
        The registered model the best candidate became a version of.
    best : dict
        The best candidate on validation macro-F1 (one of ``candidates``).
    candidates : list of dict
        One result per candidate, in training order (see
        :func:`flows.train_worker.fit_and_log`); the ensemble's last, with its ``members``
        (:func:`flows.train_worker.ensemble_and_log`).
    promotion : dict
        The registered version and the promotion decision (see
        :func:`flows.train_worker.register_and_promote`).
    parent_run_id : str
        The MLflow run the candidates' runs are nested under.
    labels : dict
        Label ``rows`` read, labelled ``tracks``, and the rows dropped per reason:
        ``empty_label``, ``no_key``, ``unmatched``, ``failed``, ``duplicate`` (see
        :meth:`training.labels.LabelSet.counts`).
    labels_report : str
        What matched and what did not (:meth:`training.labels.LabelSet.report`).
    split : dict
        Tracks per split.
    selection : dict
        How ``best`` was chosen: ``regime`` (``cv`` or ``holdout``), ``rule``, ``chosen``
        and, for ``cv``, ``best`` (highest mean), ``bar``, ``folds``, ``repeats`` and
        ``table`` (per candidate ``model``, ``mean``, ``std``, ``se``, ``n``; see
        :func:`training.select.choose`).
    """

    registered_name: str
    best: dict[str, Any]
    candidates: list[dict[str, Any]]
    promotion: dict[str, Any]
    parent_run_id: str
    labels: dict[str, int]
    labels_report: str
    split: dict[str, int]
    selection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-ready) dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSummary:
        """Inverse of :meth:`to_dict`."""
        return from_fields(cls, data)

    def render(self) -> str:
        """The labels report, the split, one line per candidate and how one was chosen."""
        return "\n".join([self.labels_report, split_line(self.split),
                          *(candidate_line(c) for c in self.candidates),
                          *([selection_line(self.selection)] if self.selection else []),
                          open_set_line(self.best.get("open_set"))])


def open_set_line(open_set: dict[str, Any] | None) -> str:
    """How the registered model tells new material from what it knows (its open-set
    detector, :mod:`training.novelty`).
    """
    if not open_set:
        return ("open set: too few labelled tracks for a detector; `confident` is the "
                "probability threshold")
    test = (f"; {open_set['test_known']:.0%} of {open_set['test_tracks']} test tracks "
            "known" if open_set.get("test_tracks") else "")
    return (f"open set: a track is confident within distance {open_set['threshold']:.3g} of "
            f"one of {open_set['reference_tracks']} labelled tracks (level "
            f"{open_set['level']:.3g}: {open_set['held_out_known']:.0%} of them left out one at "
            f"a time{test})")


def split_line(counts: dict[str, int]) -> str:
    """``split (tracks): {...}``."""
    return f"split (tracks): {counts}"


def candidate_line(result: dict[str, Any]) -> str:
    """One candidate's validation (or cross-validation) macro-F1, test accuracy, macro-F1
    and calibration error (an ensemble's line names its members).
    """
    cv = result.get("cv")
    chosen_on = (f"CV macro-F1 {cv['mean']:.4f} ± {cv['std']:.4f} (SE {cv['se']:.4f}, "
                 f"{len(cv['scores'])} folds)" if cv else
                 f"valid macro-F1 {result['valid_macro_f1']:.4f}")
    test = result["test"]
    ece = f", ECE {test['ece']:.3f}" if "ece" in test else ""
    return (f"  {model_label(result)}: {chosen_on}, test accuracy {test['accuracy']:.4f}, "
            f"macro-F1 {test['macro_f1']:.4f}{ece}")


def model_label(result: dict[str, Any]) -> str:
    """A candidate's model name; an ensemble's with its members (``ensemble (linear + gbm)``)."""
    members = result.get("members")
    return f"{result['model']} ({' + '.join(m['model'] for m in members)})" if members \
        else str(result["model"])


def selection_line(selection: dict[str, Any]) -> str:
    """Which candidate was kept, and by what rule."""
    if selection.get("regime") != "cv":
        return f"chosen: {selection.get('chosen')} ({selection.get('rule')})"
    return (f"chosen: {selection['chosen']} ({selection['rule']}: best mean "
            f"{selection['best']}, bar {selection['bar']:.4f}; {selection['folds']}-fold × "
            f"{selection['repeats']} over train + valid, refitted on both)")


def auto_candidates(n_tracks: int, *, accelerated: bool = False) -> list[str]:
    """Single models ``--model auto`` tries: cheap ones always; from 300 tracks the
    short-chunk ResNet (CPU-sized without a GPU, see :data:`CPU_AUTO_PARAMS`) and, on a GPU,
    the transformer and the CRNN (the slowest on CPU: 27 minutes on philharmonia; ``--model
    crnn`` still asks for it). The flow adds the ensemble of the best ones.
    """
    base = ["linear", "gbm", "mfcc_cnn", "cnn"]
    if n_tracks < SMALL_DATA_TRACKS:
        return base
    return [*base, "transformer", "crnn", "short_chunk_resnet"] if accelerated else [
        *base, "short_chunk_resnet"]


def cv_candidates(n_tracks: int, *, accelerated: bool = False) -> list[str]:
    """Models ``--model auto`` cross-validates below :data:`CV_MAX_TRACKS` tracks: on a GPU
    those of :func:`auto_candidates`; on CPU the classic models and the cheapest network
    (``mfcc_cnn``): each fold is a full training run, and five of them per network would
    cost the CNN and the ResNet more time than the whole holdout ``auto``.
    """
    return auto_candidates(n_tracks, accelerated=True) if accelerated else [
        "linear", "gbm", "mfcc_cnn"]


def uses_cv(model: str, n_tracks: int) -> bool:
    """Whether a run chooses by cross-validation: ``auto`` (or ``ensemble``, whose members
    are ``auto``'s candidates) below :data:`CV_MAX_TRACKS`.
    """
    return model in ("auto", ENSEMBLE) and n_tracks < CV_MAX_TRACKS


def check_candidates(model: str, candidates: list[str] | None,
                     ensemble_size: int = DEFAULT_SIZE) -> None:
    """Refuse a ``--candidates`` list (or ``--ensemble-size``) :func:`train_flow` cannot use.

    Raises
    ------
    ParameterError
        Candidates without ``--model auto``, an empty list, an unknown or repeated name, an
        ensemble with fewer than two other candidates, or an ensemble size below two.
    """
    if ensemble_size < MIN_SIZE:
        raise ParameterError(f"--ensemble-size {ensemble_size}: an ensemble averages at "
                             f"least {MIN_SIZE} models")
    if candidates is None:
        return
    if model != "auto":
        raise ParameterError(f"--candidates needs --model auto (got --model {model}); "
                             "leave --candidates out to train that one model")
    if not candidates:
        raise ParameterError("--candidates names no model; pass comma-separated names such "
                             "as linear,gbm,ensemble")
    unknown = [c for c in candidates if c not in CANDIDATE_NAMES]
    if unknown:
        raise ParameterError(f"unknown candidate{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))} (--candidates); choose from "
                             f"{', '.join(CANDIDATE_NAMES)}")
    repeated = sorted({c for c in candidates if candidates.count(c) > 1})
    if repeated:
        raise ParameterError(f"--candidates names {', '.join(repeated)} more than once")
    if ENSEMBLE in candidates and len(candidates) - 1 < MIN_SIZE:
        raise ParameterError(f"--candidates {','.join(candidates)}: an ensemble averages at "
                             f"least {MIN_SIZE} of the other candidates; name two or more "
                             "models beside it")


def auto_params(model: str, *, accelerated: bool) -> dict[str, Any] | None:
    """Model config overrides ``--model auto`` uses for ``model`` (None: its defaults)."""
    return None if accelerated else CPU_AUTO_PARAMS.get(model)


def checked_prepare(store: str, labels: str, *, group_column: str | None = None,
                    valid_size: float = 0.15, test_size: float = 0.15, seed: int = 0,
                    as_of: str | None = None) -> Prepared:
    """:func:`training.trainer.prepare`, then refuse a set that cannot train a tagger: one
    class, or a class too small for a track on each side of the split.

    Raises
    ------
    ParameterError
        For any labels file, split or class problem (the message says what to do).
    """
    check_sizes(valid_size, test_size)
    prep = prepare(store, labels, group_column=group_column, valid_size=valid_size,
                   test_size=test_size, seed=seed, as_of=as_of)
    require_classes(prep.labels, labels)
    check_split(prep.labels.frame, prep.splits, valid_size=valid_size, test_size=test_size,
                group_column=group_column)
    return prep


def preflight(store: str, labels: str, *, model: str = "auto", group_column: str | None = None,
              valid_size: float = 0.15, test_size: float = 0.15,
              train_config: dict[str, Any] | None = None,
              model_params: dict[str, Any] | None = None, as_of: str | None = None,
              candidates: list[str] | None = None, ensemble_size: int = DEFAULT_SIZE
              ) -> Prepared:
    """Check what :func:`train_flow` would be given, before any flow run starts.

    The model name, its parameters, the candidates (:func:`check_candidates`), the training
    config and device, the split sizes, then
    the labels file on its own (missing, empty, not CSV/Parquet, columns) and matched to the
    store (nothing matching, one class, classes too small to split). Returns the prepared
    set (the flow prepares its own).

    Raises
    ------
    MtagError
        A :class:`~tasks.errors.ParameterError` (or :class:`~tasks.errors.StoreError`) that
        says what is wrong and what to do.
    """
    if model != "auto" and model not in CANDIDATE_NAMES:
        raise ParameterError(f"unknown model {model!r} (--model); choose from "
                             f"{', '.join(CANDIDATE_NAMES)} or auto")
    if model_params is not None and not isinstance(model_params, dict):
        raise ParameterError(f"--model-params must be a JSON object such as "
                             f"'{{\"channels\": 64}}', not {json.dumps(model_params)}")
    if model_params and model == ENSEMBLE:
        raise ParameterError("--model-params set one model's config; --model ensemble fits "
                             "auto's candidates at their own settings")
    if model_params and model != "auto":
        _check_model_params(model, model_params)
    check_candidates(model, candidates, ensemble_size)
    tc = _train_config(train_config)
    _check_device(tc.device)
    check_sizes(valid_size, test_size)
    if tag_source(labels) is None:
        read_labels(labels, group_column=group_column)  # the file alone first: no store read
    return checked_prepare(store, labels, group_column=group_column, valid_size=valid_size,
                           test_size=test_size, seed=tc.seed, as_of=as_of)


def run_train(store: str, labels: str, *, model: str = "auto",
              registered_name: str | None = None, group_column: str | None = None,
              valid_size: float = 0.15, test_size: float = 0.15,
              train_config: dict[str, Any] | None = None,
              model_params: dict[str, Any] | None = None, workdir: str | None = None,
              as_of: str | None = None, quiet: bool = True,
              candidates: list[str] | None = None, ensemble_size: int = DEFAULT_SIZE
              ) -> TrainSummary:
    """:func:`preflight`, then :func:`train_flow`; with ``quiet`` an
    :class:`~tasks.errors.MtagError` raised inside the run is not logged to the console
    with its traceback (it still reaches the caller, and the run's API logs).
    """
    preflight(store, labels, model=model, group_column=group_column, valid_size=valid_size,
              test_size=test_size, train_config=train_config, model_params=model_params,
              as_of=as_of, candidates=candidates, ensemble_size=ensemble_size)
    with quiet_expected_errors() if quiet else contextlib.nullcontext():
        return train_flow(store=store, labels=labels, model=model,
                          registered_name=registered_name, group_column=group_column,
                          valid_size=valid_size, test_size=test_size,
                          train_config=train_config, model_params=model_params,
                          workdir=workdir, as_of=as_of, candidates=candidates,
                          ensemble_size=ensemble_size)


class _HideExpected(logging.Filter):
    """Drops the flow and task run records of an :class:`~tasks.errors.MtagError`: the one
    with its traceback and the "Finished in state Failed(...)" lines after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MtagError):
            self.seen.add(f"{type(exc).__name__}: ")
            self.seen.add(f"{type(exc).__name__}(")
            return False
        if self.seen and record.levelno >= logging.INFO:
            message = record.getMessage()
            return not any(mark in message for mark in self.seen)
        return True


@contextlib.contextmanager
def quiet_expected_errors() -> Iterator[None]:
    """Keep Prefect's console handlers from printing an expected error's traceback."""
    from prefect.logging.handlers import PrefectConsoleHandler

    hide = _HideExpected()
    handlers = {h for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")
                for h in logging.getLogger(name).handlers
                if isinstance(h, PrefectConsoleHandler)}
    for handler in handlers:
        handler.addFilter(hide)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(hide)


def _train_config(train_config: dict[str, Any] | None) -> TrainConfig:
    try:
        return TrainConfig(**(train_config or {}))
    except TypeError as exc:
        raise ParameterError(f"bad training option: {exc}") from exc


def _check_model_params(model: str, params: dict[str, Any]) -> None:
    """Refuse ``--model-params`` fields a network's config does not have."""
    from training.models import MODEL_CONFIGS

    if model not in MODEL_CONFIGS:
        return  # the classic models read the keys they know
    try:
        MODEL_CONFIGS[model](**params)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"--model-params do not fit model {model!r}: {exc}") from exc


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _check_device(name: str | None) -> None:
    if not name:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ParameterError(f"--device {name!r} is not a torch device (cpu, cuda, "
                             f"cuda:1...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"--device {name}: no CUDA device is available here; leave "
                             "--device out to train on the CPU")


@task(name="prepare-labels", cache_policy=NO_CACHE)
def prepare_task(store: str, labels: str, group_column: str | None, valid_size: float,
                 test_size: float, seed: int, as_of: str | None = None) -> Prepared:
    return checked_prepare(store, labels, group_column=group_column, valid_size=valid_size,
                           test_size=test_size, seed=seed, as_of=as_of)


@task(name="fit-model", cache_policy=NO_CACHE, task_run_name="fit-{model}")
def fit_task(prep: Prepared, model: str, workdir: str, train_config: TrainConfig,
             model_params: dict[str, Any] | None, name: str,
             folds: list[Any] | None = None) -> dict[str, Any]:
    return fit_and_log(prep, model, workdir, train_config, model_params, name, folds)


@task(name="fit-ensemble", cache_policy=NO_CACHE)
def ensemble_task(prep: Prepared, members: list[dict[str, Any]], workdir: str,
                  train_config: TrainConfig, name: str, folds: list[Any] | None = None
                  ) -> dict[str, Any]:
    return ensemble_and_log(prep, members, workdir, train_config, name, folds)


@task(name="register-and-promote", cache_policy=NO_CACHE)
def promote_task(prep: Prepared, best: dict[str, Any], name: str) -> dict[str, Any]:
    """Register ``best``, set ``candidate``, and move ``champion`` if it wins."""
    decision = register_and_promote(prep, best, name)
    prep.store.pin(prep.feature_set, prep.versions, f"model {name} v{decision['version']}")
    get_run_logger().info("promotion: %s", decision)
    return decision


@flow(name="train-model", validate_parameters=False)
def train_flow(store: str, labels: str, model: str = "auto", registered_name: str | None = None,
               group_column: str | None = None, valid_size: float = 0.15,
               test_size: float = 0.15, train_config: dict[str, Any] | None = None,
               model_params: dict[str, Any] | None = None, workdir: str | None = None,
               as_of: str | None = None, candidates: list[str] | None = None,
               ensemble_size: int = DEFAULT_SIZE) -> TrainSummary:
    """Train, evaluate, register and promote; return a :class:`TrainSummary`.

    ``as_of`` rebuilds a past training set: a ``tracks`` table version or an ISO timestamp
    (the versions read are logged with every run either way). ``candidates`` replaces the
    models ``auto`` tries (cheapest first, e.g. ``["linear", "gbm"]``; ``"ensemble"`` adds
    the ensemble of the best ``ensemble_size`` of the others). ``model="ensemble"`` fits
    ``auto``'s single candidates and registers their ensemble.
    """
    check_candidates(model, candidates, ensemble_size)
    from featurestore.store import FeatureStore

    logger = get_run_logger()
    name = registered_name or DEFAULT_NAME
    tc = TrainConfig(**(train_config or {}))
    prep = prepare_task(store, labels, group_column, valid_size, test_size, tc.seed, as_of)
    logger.info("training set: feature set %s at table versions %s", prep.feature_set,
                prep.versions)
    logger.info("%s", prep.labels.report())
    dropped = {k: n for k, n in prep.labels.dropped().items() if n}
    if dropped:
        logger.warning("%d of %d label rows dropped: %s", sum(dropped.values()),
                       prep.labels.counts()["rows"],
                       ", ".join(f"{n} {DROP_REASONS[k]}" for k, n in dropped.items()))
    logger.info("%s", split_line(prep.split_counts()))
    tracking.configure(FeatureStore(store))
    exp = tracking.experiment(prep.store, name)
    accelerated = pick_device(tc.device).type != "cpu"
    n_tracks = len(prep.labels.frame)
    cv = uses_cv(model, n_tracks)
    several = model in ("auto", ENSEMBLE)
    if not several:
        candidates = [model]
    elif not candidates:
        candidates = [*(cv_candidates if cv else auto_candidates)(
            n_tracks, accelerated=accelerated), ENSEMBLE]
    params = {c: auto_params(c, accelerated=accelerated) if several else model_params
              for c in candidates if c != ENSEMBLE}
    folds = cv_folds(prep.labels.frame, prep.splits, seed=tc.seed) if cv else None
    with _work_folder(workdir) as work:
        flow_run = run_id()
        logger.info("flow run %s: training %s on %s", flow_run, model, store)
        with tracking.parent_run(exp, f"train-{model}", {"prefect_flow_run_id": flow_run}
                                 if flow_run else None) as parent_id:
            results = _fit_candidates(prep, params, work, tc, name, folds)
            if ENSEMBLE in candidates:
                results += _ensemble(prep, results, model, ensemble_size, work, tc, name,
                                     folds)
            best, selection = _select(results, candidates, folds,
                                      forced=ENSEMBLE if model == ENSEMBLE else None)
            logger.info("%s", selection_line(selection))
            tracking.log_params({"best_model": best["model"], "candidates": candidates,
                                 "selection": selection["regime"]}
                                | ({"best_members": [m["model"] for m in best["members"]]}
                                   if best.get("members") else {}))
            tracking.log_metrics({f"cv_{row['model']}_{k}": row[k] for row in
                                  selection.get("table", []) for k in ("mean", "std", "se")})
            tracking.log_document(selection, "model_choice.json")
            decision = promote_task(prep, best, name)
    if workdir is None:  # the folder is gone: its paths would lead nowhere
        for res in results:
            res.update(artifact_dir=None, held_out=None)
    summary = TrainSummary(
        registered_name=name, best=best, candidates=results, promotion=decision,
        parent_run_id=parent_id,
        labels=prep.labels.counts(),
        labels_report=prep.labels.report(), split=prep.split_counts(), selection=selection)
    _publish(summary)
    return summary


@contextlib.contextmanager
def _work_folder(workdir: str | None) -> Iterator[str]:
    """``workdir`` (kept: its checkpoints let a run with the same folder resume), or a
    temporary folder removed when the run ends, failed or not (every model in it has been
    logged to MLflow by then; a run in a fresh temporary folder could never resume from it,
    and each left 7-43 MB behind).
    """
    if workdir is not None:
        yield workdir
        return
    work = tempfile.mkdtemp(prefix=WORK_PREFIX)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fit_candidates(prep: Prepared, params: dict[str, dict[str, Any] | None], work: str,
                    tc: TrainConfig, name: str, folds: list[Any] | None = None
                    ) -> list[dict[str, Any]]:
    """Fit each model of ``params`` (model → config overrides) in turn (cross-validated first
    with ``folds``); their results.
    """
    logger = get_run_logger()
    results = []
    with Progress("train", total=len(params), unit="models", enabled=True) as bar:
        for cand, cand_params in params.items():
            logger.info("training %s ...", cand)
            res = fit_task(prep, cand, work, tc, cand_params, name, folds)
            logger.info("%s", candidate_line(res))
            results.append(res)
            bar.advance(1)
    return results


def _ensemble(prep: Prepared, results: list[dict[str, Any]], model: str, size: int,
              work: str, tc: TrainConfig, name: str, folds: list[Any] | None
              ) -> list[dict[str, Any]]:
    """The ensemble of the best ``size`` of ``results`` as a one-item list (empty, with a
    warning, when fewer than two have a score and ``model`` is ``auto``).
    """
    chosen = pick_members({r["model"]: r["valid_macro_f1"] for r in results}, size)
    if len(chosen) < MIN_SIZE:
        message = (f"no ensemble: it needs {MIN_SIZE} candidates with a score, "
                   f"{len(chosen)} have one")
        if model == ENSEMBLE:
            raise ParameterError(message)
        get_run_logger().warning("%s", message)
        return []
    get_run_logger().info("ensembling %s ...", ", ".join(chosen))
    by_model = {r["model"]: r for r in results}
    res = ensemble_task(prep, [by_model[m] for m in chosen], work, tc, name, folds)
    get_run_logger().info("%s", candidate_line(res))
    return [res]


def _select(results: list[dict[str, Any]], candidates: list[str], folds: list[Any] | None,
            forced: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result to register and how it was chosen (see :attr:`TrainSummary.selection`);
    ``forced`` names the model to register whatever the scores (``--model ensemble``).

    The ensemble competes as the dearest candidate: under cross-validation it is last in the
    cost order of the one-standard-error rule, so it wins only when its mean exceeds every
    single's by more than its standard error; on validation a tie goes to the single.
    """
    if folds:
        k = folds_per_repeat(folds)
        choice = choose({r["model"]: r["cv"]["scores"] for r in results}, k)
        if forced:
            choice |= {"chosen": forced, "rule": f"--model {forced}"}
        best = next(r for r in results if r["model"] == choice["chosen"])
        return best, {"regime": "cv", **choice, "folds": k,
                      "repeats": max(r["cv"]["repeats"] for r in results)}
    if forced:
        best = next(r for r in results if r["model"] == forced)
        return best, {"regime": "holdout", "chosen": forced, "rule": f"--model {forced}"}
    last = len(candidates)  # the ensemble, the dearest, loses ties wherever it is listed
    best = max(results, key=lambda r: (np.nan_to_num(r["valid_macro_f1"], nan=-1.0), -(
        last if r["model"] == ENSEMBLE else candidates.index(r["model"]))))
    return best, {"regime": "holdout", "chosen": best["model"],
                  "rule": "highest validation macro-F1" if len(results) > 1 else
                  "the one model asked for"}


def _publish(summary: TrainSummary) -> None:
    """Attach the run's Markdown summary (best model, promotion, candidates) to the flow run."""
    best, decision, name = summary.best, summary.promotion, summary.registered_name
    publish("train-summary", f"train {name}: {best['model']} v{decision['version']}", {
        "registered model": f"{name} v{decision['version']} (@candidate)",
        "promotion": ("promoted to @champion" if decision["promoted"] else
                      "champion unchanged") + f": {decision['reason']}",
        "best model": best["model"], "labelled tracks": summary.labels["tracks"],
        "label rows dropped": sum(v for k, v in summary.labels.items()
                                  if k not in ("rows", "tracks")),
        "test accuracy": best["test"].get("accuracy"), "test macro-F1":
        best["test"].get("macro_f1"), "MLflow run": summary.parent_run_id},
        [{"model": model_label(r), "valid macro-F1": r["valid_macro_f1"],
          "CV std": (r.get("cv") or {}).get("std"),
          "test accuracy": r["test"].get("accuracy"), "test macro-F1":
          r["test"].get("macro_f1"), "train s": r["train_seconds"]}
         for r in summary.candidates])


def evaluate_model(store: str, labels: str, model_uri: str, *, split: str | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any], Predictor]:
    """Track- and segment-level reports of a registered model on a labelled store.

    The labels file is checked first (as :func:`preflight` does), then the model is loaded.

    Raises
    ------
    MtagError
        For a bad labels file, a model URI that names no registered model, or a model whose
        feature set the store lacks.
    """
    from featurestore.store import FeatureStore

    read_labels(labels)
    if not model_uri.startswith("models:/"):
        raise ParameterError(f"--model-uri {model_uri!r} is not a registered model URI: use "
                             "models:/NAME@ALIAS or models:/NAME/VERSION")
    fstore = FeatureStore(store)
    tracking.configure(fstore)
    try:
        artifact_dir = tracking.load_artifact_dir(model_uri)
    except Exception as exc:
        # MlflowException (mlflow is imported only by training/tracking.py): no such model,
        # alias or version
        if not type(exc).__module__.startswith("mlflow"):
            raise
        raise ParameterError(f"cannot load model {model_uri} from the MLflow registry "
                             f"({_first_line(str(exc))}); check its name and alias or "
                             "version in the MLflow UI") from exc
    try:
        predictor = load_artifact(artifact_dir)  # read whole: the download can go at once
    finally:
        tracking.remove_artifact_dir(artifact_dir)
    fs = predictor.meta["feature_set"]
    if fs not in {r["feature_set"] for r in fstore.feature_sets()}:
        raise StoreError(f"model {model_uri} was trained on feature set {fs}, which store "
                         f"{store} does not have; ingest with that feature config first")
    prep = prepare(store, labels, feature_set=fs, test_size=0.5, valid_size=0.0)
    if split is None:
        prep.splits[:] = "test"  # every labelled track
    seg, track = evaluate_split(predictor, prep, "test")
    return track, seg, predictor
