"""The flows the deployments run on a schedule: nightly ingestion, weekly retraining with the
promotion gate, and scoring of new and changed tracks.

Each is a Prefect flow whose parameters default to the settings (:mod:`flows.settings`), so a
deployment needs no parameters at all in the common case. Each picks its Dask cluster through
:func:`flows.runtime.dask_runner` (the configured scheduler, or a ``LocalCluster`` for the
run, whose dashboard address it logs) and runs the pipeline flow as a subflow, so the UI shows
one parent run per schedule tick with the pipeline's runs under it. Deployments are defined in
``infra/deployments.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from featurestore.maintenance import compact
from featurestore.store import FeatureStore
from featurestore.verify import repair, verify
from flows.ingest import IngestSummary, ingest_flow
from flows.neighbours import NeighboursSummary, neighbours_flow
from flows.records import from_fields
from flows.runtime import dask_runner
from flows.score import ScoreSummary, score_flow
from flows.settings import load
from tasks.errors import StoreError

SCORE_DEPLOYMENT = "scheduled-score/score-new-tracks"
"""``flow-name/deployment-name`` the nightly ingestion asks to run after it (if deployed)."""


def _runner(address: str | None, workers: int | None) -> Any:
    settings = load()
    return dask_runner(address or settings.dask_address, n_workers=workers or settings.workers,
                       echo=get_run_logger().info)


@dataclass
class ScheduledScoreSummary:
    """What a scheduled scoring run did: the score run, then the neighbours refresh."""

    score: ScoreSummary
    neighbours: NeighboursSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"score": self.score.to_dict(),
                "neighbours": self.neighbours.to_dict() if self.neighbours else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduledScoreSummary:
        """Inverse of :meth:`to_dict`."""
        return from_fields(cls, data, score=ScoreSummary.from_dict,
                           neighbours=NeighboursSummary.from_dict)


@flow(name="scheduled-ingest", validate_parameters=False)
def scheduled_ingest(source: str | None = None, store: str | None = None,
                     dask_address: str | None = None, workers: int | None = None,
                     shard_minutes: float | None = None, score_after: bool = True,
                     compact_after: bool = True, verify_after: bool = True,
                     repair_damage: bool = False) -> IngestSummary:
    """Ingest the catalogue (new and changed files, retiring replaced and deleted ones),
    compact the store's tables (so a year of nightly runs reads like one big run), queue the
    scoring deployment, then verify the store (:func:`featurestore.verify.verify`).

    A damaged store fails the run, naming the damage and the command that fixes it; with
    ``repair_damage`` the damaged files are quarantined instead and the next run ingests
    their tracks again.
    """
    settings = load()
    logger = get_run_logger()
    store = store or settings.require("store")
    with _runner(dask_address, workers) as (cluster, runner):
        summary: IngestSummary = ingest_flow.with_options(task_runner=runner)(
            source=source or settings.require("source"), store=store,
            shard_minutes=shard_minutes or settings.shard_minutes, workers=cluster.threads,
            progress=False)
    if compact_after:
        compact_task(store)
    if score_after and summary.ok + summary.failed + summary.gone + summary.superseded:
        _queue_scoring(logger)
    if verify_after:
        verify_task(store, repair_damage)
    return summary


@task(name="verify-store", cache_policy=NO_CACHE)
def verify_task(store: str, repair_damage: bool = False) -> dict[str, Any]:
    """Verify every committed file and the tables against each other; raise if damaged."""
    fstore = FeatureStore(store)
    report = verify(fstore)
    logger = get_run_logger()
    logger.info("%s", report.render())
    if report.ok:
        return {"problems": 0}
    if repair_damage:
        fixed = repair(fstore)
        logger.warning("%s", fixed.render())
        return {"problems": len(report.problems), "repaired": fixed.files_quarantined}
    raise StoreError(f"store {store} is damaged ({len(report.problems)} problems, listed "
                     f"above); run `mtag verify --store {store} --repair` to quarantine the "
                     "damaged files, then `mtag ingest` processes their tracks again")


@task(name="compact-store", cache_policy=NO_CACHE)
def compact_task(store: str) -> dict[str, Any]:
    """Compact, checkpoint and vacuum the store (:func:`featurestore.maintenance.compact`)."""
    report = compact(FeatureStore(store))
    get_run_logger().info("%s", report.render())
    return report.to_dict()


def _queue_scoring(logger: Any) -> None:
    """Start the scoring deployment, if there is one (scheduled runs go on regardless)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run: Any = run_deployment(SCORE_DEPLOYMENT, timeout=0)  # sync in a sync flow
        logger.info("queued %s: flow run %s", SCORE_DEPLOYMENT, run.id)
    except ObjectNotFound:
        logger.info("no %s deployment: new tracks are scored by its schedule", SCORE_DEPLOYMENT)


@flow(name="scheduled-retrain", validate_parameters=False)
def scheduled_retrain(store: str | None = None, labels: str | None = None,
                      model: str | None = None, registered_name: str | None = None,
                      train_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain, register as @candidate, and move @champion only if the candidate wins."""
    from flows.train import train_flow

    settings = load()
    summary = train_flow(store=store or settings.require("store"),
                         labels=labels or settings.require("labels"),
                         model=model or settings.train_model,
                         registered_name=registered_name or settings.model_name,
                         train_config=train_config)
    return {"registered_name": summary.registered_name, "promotion": summary.promotion,
            "best_model": summary.best["model"],
            "test_macro_f1": summary.best["test"].get("macro_f1")}


@flow(name="scheduled-score", validate_parameters=False)
def scheduled_score(store: str | None = None, model_uri: str | None = None,
                    dask_address: str | None = None, workers: int | None = None,
                    neighbours_k: int | None = None) -> ScheduledScoreSummary:
    """Score what the champion has not scored yet, then refresh the neighbours table."""
    settings = load()
    store = store or settings.require("store")
    uri = model_uri or f"models:/{settings.model_name}@champion"
    k = settings.neighbours_k if neighbours_k is None else neighbours_k
    with _runner(dask_address, workers) as (cluster, runner):
        score: ScoreSummary = score_flow.with_options(task_runner=runner)(
            store=store, model_uri=uri, workers=cluster.threads, progress=False)
        out = ScheduledScoreSummary(score)
        if k > 0:
            out.neighbours = neighbours_flow.with_options(task_runner=runner.duplicate())(
                store=store, k=k, model=f"{score.model_name}/{score.model_version}",
                workers=cluster.threads, progress=False)
    return out
