"""What ``mtag score`` knows before it starts anything: the exact model version, its feature
set, and whether anything is left to score.

Nothing here imports Prefect, Dask or torch, so a score with nothing to do (or a model that
does not exist, or one of another feature set) answers in the time MLflow takes to resolve
the model, with no cluster, no Prefect API and no flow run (the ingest side of this is
:mod:`flows.preflight`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from featurestore.scores import ScoredModel, ScoreStore
from featurestore.store import FeatureStore, mlflow_db_path
from flows.preflight import IngestSummary
from flows.records import ScorePartResult, from_fields
from tasks.errors import StoreError

SCORE_PRELOAD = ("flows.score_worker", "training.artifact")
"""What a local scoring worker imports before it is forked (torch: about 2 CPU-s): imported
once by the fork server instead of once per worker by the warm-up, which then only loads the
model. Not MLflow: local workers load the model from the folder the command downloaded
(:attr:`ScoreStart.model_dir`). The command itself still never imports torch (decision 57)."""
CLASSIC_PRELOAD = ("sklearn.pipeline", "sklearn.preprocessing", "sklearn.linear_model",
                   "sklearn.ensemble", "sklearn.multiclass")
"""Added for a model with scikit-learn parts (input ``summary`` or ``mixed``): what
unpickling its estimators imports."""


def score_preload(source: str | None, model_input: str | None = None) -> tuple[str, ...]:
    """What the fork server imports for a score run's workers (those of ``mtag score
    --source`` extract too); ``model_input`` is the model's input kind (None: not known, so
    scikit-learn too).
    """
    classic = CLASSIC_PRELOAD if model_input in (None, "summary", "mixed") else ()
    return (*SCORE_PRELOAD, *classic, *(("flows.ingest_worker",) if source is not None else ()))


@dataclass
class ScoreSummary:
    """What a score run did."""

    model_name: str
    model_version: str
    feature_set: str
    tracks_in_store: int = 0
    already_scored: int = 0
    tracks: int = 0
    segments: int = 0
    parts: int = 0
    parts_failed: int = 0
    scored_elsewhere: int = 0
    unconfident: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0
    workers: int = 1
    device: str = ""
    label_counts: dict[str, int] = field(default_factory=dict)
    ingest: IngestSummary | None = None

    @property
    def tracks_per_s(self) -> float:
        """Tracks scored per wall second."""
        return self.tracks / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including derived figures."""
        return asdict(self) | {"tracks_per_s": self.tracks_per_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreSummary:
        """Inverse of :meth:`to_dict` (derived figures are recomputed)."""
        return from_fields(cls, data, ingest=IngestSummary.from_dict)

    def add(self, result: ScorePartResult) -> None:
        """Count a committed part."""
        self.tracks += result.n_tracks
        self.segments += result.n_segments
        self.parts += 1
        self.compute_s += result.compute_s
        self.unconfident += result.n_unconfident
        self.device = result.device
        for label, count in result.label_counts.items():
            self.label_counts[label] = self.label_counts.get(label, 0) + count

    def render(self) -> str:
        """Human-readable end-of-run summary."""
        who = f"{self.model_name} v{self.model_version}"
        if self.tracks == 0 and self.parts_failed == 0:
            return (f"Nothing to do: all {self.already_scored} tracks with features in "
                    f"{self.feature_set} are already scored by {who}.")
        top = sorted(self.label_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        lines = [
            f"Scored {self.tracks} tracks ({self.segments} segments) with {who} "
            f"(feature set {self.feature_set}) in {self.parts} parts; {self.unconfident} "
            "not confident",
            f"  wall {self.wall_s:.1f} s = {self.tracks_per_s:.1f} tracks/s "
            f"({self.tracks_per_s / max(1, self.workers):.1f} per worker, {self.workers} "
            f"workers, {self.device or 'cpu'}); {self.already_scored} tracks were already "
            "scored",
            "  top labels: " + ", ".join(f"{k} {v}" for k, v in top),
        ]
        if self.parts_failed:
            lines.append(f"  {self.parts_failed} parts failed after retries; run again to "
                         "finish them")
        return "\n".join(lines)


def tracking_uri_for(store: FeatureStore, tracking_uri: str | None = None) -> str:
    """The MLflow URI to read models from: given, ``MLFLOW_TRACKING_URI``, or the store's own.

    ``tracking_uri`` may also be the folder of another store (its embedded SQLite is used).
    MLflow is not imported for this: where it already is, it is pointed at the URI; every
    MLflow call of a score run points it there first (:func:`training.tracking.use`).
    """
    from training import local_registry

    if tracking_uri and "://" not in tracking_uri:
        db = mlflow_db_path(tracking_uri)
        if not os.path.exists(db):
            raise StoreError(f"{tracking_uri} is neither a URI nor a store with an MLflow "
                             "database")
        tracking_uri = f"sqlite:///{db}"
    uri = tracking_uri or local_registry.store_uri(store)
    if "training.tracking" in sys.modules:
        from training import tracking

        tracking.use(uri)
    return uri


def scored_model(model_uri: str, tracking_uri: str) -> tuple[ScoredModel, dict[str, Any]]:
    """Resolve ``model_uri`` to an exact version; return its record and feature config.

    Reads the model's ``meta.json`` only: the command never loads the model itself (that is
    the workers' job, :func:`flows.score_worker.load_predictor`).
    """
    from training.local_registry import remove_artifact_dir

    model, config, directory = resolve_model(model_uri, tracking_uri)
    remove_artifact_dir(directory)
    return model, config


def resolve_model(model_uri: str, tracking_uri: str
                  ) -> tuple[ScoredModel, dict[str, Any], str]:
    """:func:`scored_model`, keeping the model's downloaded artifact folder: its local path
    comes third (the caller removes it, :func:`training.local_registry.remove_artifact_dir`).

    The embedded registry is read without MLflow where it can be
    (:func:`training.local_registry.resolve`: 2-2.6 CPU-seconds of MLflow's import and store
    saved at the command's start); anything else, a missing model included, asks MLflow.
    """
    from training import local_registry
    from training.meta import embed_dim, read_meta

    found = local_registry.resolve(tracking_uri, model_uri)
    if found is not None:
        ref, directory = found
    else:
        from training import tracking

        tracking.use(tracking_uri)
        ref = tracking.resolve(model_uri)
        directory = tracking.load_artifact_dir(f"models:/{ref['name']}/{ref['version']}")
    try:
        meta = read_meta(directory)
        model = ScoredModel(
            name=ref["name"], version=ref["version"], run_id=ref["run_id"],
            feature_set=meta["feature_set"], classes=list(meta["classes"]),
            multi_label=bool(meta["multi_label"]),
            threshold=float(meta.get("threshold", 0.0)), embed_dim=embed_dim(directory, meta),
            input=str(meta["input"]), architecture=meta["model"])
    except BaseException:
        local_registry.remove_artifact_dir(directory)
        raise
    return model, dict(meta["feature_config"]), directory


def check_feature_set(fstore: FeatureStore, model: ScoredModel, config: dict[str, Any]) -> None:
    """Refuse a model whose feature set the store does not hold (with what differs)."""
    held = [r for r in fstore.feature_sets() if fstore.has_tracks(r["feature_set"])]
    if any(r["feature_set"] == model.feature_set for r in held):
        return
    lines = [f"model {model.name} v{model.version} was trained on feature set "
             f"{model.feature_set}, which store {fstore.url} does not hold; scoring its "
             "features with this model would give garbage."]
    for record in held:
        diff = [f"{k}: model {config.get(k)!r}, store {v!r}" for k, v in
                sorted(record["config"].items()) if config.get(k) != v]
        what = "; ".join(diff) if diff else "same config, computed by other feature code"
        lines.append(f"  store feature set {record['feature_set']}: {what}")
    lines.append("  Pass the audio as SOURCE (`mtag score SOURCE ...`) to compute the model's "
                 "features, or ingest with the model's feature config.")
    raise StoreError("\n".join(lines))


def already_scored(fstore: FeatureStore, model: ScoredModel, config: dict[str, Any]
                   ) -> ScoreSummary | None:
    """The summary of a run with nothing to score (every feature shard of the model's
    feature set already scored by this version), or None when there is work. Refuses a model
    of a feature set the store does not hold, as the flow does. Reads only.
    """
    started = time.perf_counter()
    check_feature_set(fstore, model, config)
    manifests = fstore.manifests(model.feature_set)
    scores = ScoreStore(fstore)
    done = scores.scored_shards(model.name, model.version) if manifests else set()
    if any(m.shard_id not in done for m in manifests):
        return None
    scores.check_model(model)
    n = sum(m.counts.n_ok for m in manifests)
    return ScoreSummary(model.name, model.version, model.feature_set, tracks_in_store=n,
                        already_scored=n, wall_s=time.perf_counter() - started)


@dataclass(frozen=True)
class ScoreStart:
    """A resolved score run: the store, the MLflow URI, the exact model and its feature
    config; ``done`` is the summary when there is nothing to score.
    """

    store: FeatureStore
    tracking_uri: str
    model: ScoredModel
    feature_config: dict[str, Any]
    done: ScoreSummary | None = None
    model_dir: str | None = None
    """The model's artifact folder as the command downloaded it (while there is work): local
    workers load it from there instead of asking MLflow again (:func:`resolved_for_flow`)."""

    def resolved_for_flow(self) -> dict[str, Any]:
        """What :func:`flows.score.score_flow` takes as ``resolved``: the model, its feature
        config and folder, so the flow neither resolves nor downloads the model again.
        """
        return {"model": self.model.to_dict(), "feature_config": self.feature_config,
                "model_dir": self.model_dir}

    def release(self) -> None:
        """Remove :attr:`model_dir` (after the run)."""
        if self.model_dir:
            from training.local_registry import remove_artifact_dir

            remove_artifact_dir(self.model_dir)


def start_score(store: str, model_uri: str, *, source: str | None = None,
                tracking_uri: str | None = None) -> ScoreStart:
    """Resolve the model and, without ``source`` (nothing to ingest first), find out whether
    there is anything to score (:func:`already_scored`).
    """
    from training.local_registry import remove_artifact_dir

    fstore = FeatureStore(store, create=source is not None)
    uri = tracking_uri_for(fstore, tracking_uri)
    model, config, directory = resolve_model(model_uri, uri)
    keep = False  # the folder, for the run that follows (none when done, or on an error)
    try:
        done = already_scored(fstore, model, config) if source is None else None
        keep = done is None
        return ScoreStart(fstore, uri, model, config, done, directory if keep else None)
    finally:
        if not keep:
            remove_artifact_dir(directory)


def summary_json(summary: ScoreSummary) -> str:
    """The summary as indented JSON."""
    return json.dumps(summary.to_dict(), indent=1, default=str)
