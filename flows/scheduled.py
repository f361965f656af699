"""The flows the deployments run on a schedule: nightly ingestion, weekly retraining with the
promotion gate, and scoring of new and changed tracks.

Each is a Prefect flow whose parameters default to the settings (:mod:`flows.settings`), so a
deployment needs no parameters at all in the common case. Each picks its Dask cluster (the
configured scheduler, or a ``LocalCluster`` for the run, whose dashboard address it logs) and
runs the pipeline flow as a subflow, so the UI shows one parent run per schedule tick with the
pipeline's runs under it. Deployments are defined in ``infra/deployments.py``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect_dask import DaskTaskRunner

from flows.cluster import dask_cluster
from flows.settings import load

SCORE_DEPLOYMENT = "scheduled-score/score-new-tracks"
"""``flow-name/deployment-name`` the nightly ingestion asks to run after it (if deployed)."""


def _cluster(address: str | None, workers: int | None):  # type: ignore[no-untyped-def]
    settings = load()
    return dask_cluster(address or settings.dask_address,
                        n_workers=workers or settings.workers, echo=False)


@flow(name="scheduled-ingest", validate_parameters=False)
def scheduled_ingest(source: str | None = None, store: str | None = None,
                     dask_address: str | None = None, workers: int | None = None,
                     shard_minutes: float | None = None, score_after: bool = True
                     ) -> dict[str, Any]:
    """Ingest the catalogue (new and changed files only), then queue the scoring deployment."""
    from flows.ingest import ingest_flow

    settings = load()
    logger = get_run_logger()
    with _cluster(dask_address, workers) as cluster:
        logger.info("Dask scheduler %s (%d workers); dashboard %s", cluster.address,
                    cluster.workers, cluster.dashboard)
        summary = ingest_flow.with_options(task_runner=DaskTaskRunner(address=cluster.address))(
            source=source or settings.require("source"), store=store or settings.require("store"),
            shard_minutes=shard_minutes or settings.shard_minutes, workers=cluster.threads,
            progress=False)
    new = int(summary["ok"]) + int(summary["failed"])
    if score_after and new:
        _queue_scoring(logger)
    return dict(summary)


def _queue_scoring(logger: Any) -> None:
    """Start the scoring deployment, if there is one (scheduled runs go on regardless)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(SCORE_DEPLOYMENT, timeout=0)
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
    result = train_flow(store=store or settings.require("store"),
                         labels=labels or settings.require("labels"),
                         model=model or settings.train_model,
                         registered_name=registered_name or settings.model_name,
                         train_config=train_config)
    return {"registered_name": result["registered_name"], "promotion": result["promotion"],
            "best_model": result["best"]["model"],
            "test_macro_f1": result["best"]["test"].get("macro_f1")}


@flow(name="scheduled-score", validate_parameters=False)
def scheduled_score(store: str | None = None, model_uri: str | None = None,
                    dask_address: str | None = None, workers: int | None = None,
                    neighbours_k: int | None = None) -> dict[str, Any]:
    """Score what the champion has not scored yet, then refresh the neighbours table."""
    from flows.neighbours import neighbours_flow
    from flows.score import score_flow

    settings = load()
    store = store or settings.require("store")
    uri = model_uri or f"models:/{settings.model_name}@champion"
    k = settings.neighbours_k if neighbours_k is None else neighbours_k
    logger = get_run_logger()
    with _cluster(dask_address, workers) as cluster:
        logger.info("Dask scheduler %s (%d workers); dashboard %s", cluster.address,
                    cluster.workers, cluster.dashboard)
        runner = DaskTaskRunner(address=cluster.address)
        summary = score_flow.with_options(task_runner=runner)(
            store=store, model_uri=uri, workers=cluster.threads, progress=False)
        out: dict[str, Any] = {"score": dict(summary)}
        if k > 0:
            name, version = summary["model_name"], summary["model_version"]
            out["neighbours"] = neighbours_flow.with_options(task_runner=runner.duplicate())(
                store=store, k=k, model=f"{name}/{version}", workers=cluster.threads,
                progress=False)
    return out
