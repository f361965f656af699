"""The score flow: resolve the model, ingest what is new, plan parts, score over Dask, commit.

``score_flow`` is a Prefect flow whose tasks run on a ``DaskTaskRunner``; one task run scores a
part (several whole feature shards), each worker loads the model once. The model is resolved
to an exact registry version first (an alias can move while a run is in progress), and a model
trained on another feature set than the store holds is refused. The task bodies are in
:mod:`flows.score_worker`; :func:`run_score` runs the flow on a cluster through
:mod:`flows.runtime`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from featurestore.scores import ScoredModel, ScoreStore, part_id_of
from featurestore.store import FeatureStore, ShardManifest
from flows.cluster import Echo
from flows.plan import MAX_TASK_RUNS
from flows.records import ScorePartResult, ScorePlan
from flows.report import publish, run_id
from flows.runtime import CommitBuffer, Warmup, commit_as_completed, run_on_cluster
from flows.score_preflight import (  # noqa: F401  (re-exported)
    SCORE_PRELOAD,
    ScoreStart,
    ScoreSummary,
    already_scored,
    check_feature_set,
    score_preload,
    scored_model,
    start_score,
    summary_json,
    tracking_uri_for,
)
from flows.score_worker import score_part, warm_scorer
from tasks.config import FeatureConfig

MAX_SEGMENTS_PER_PART = 50_000
"""Upper size of one scoring task (about 40 hours of audio at 3 s segments)."""


@task(name="score-part", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="score-{plan.part_id}")
def score_task(store_url: str, tracking_uri: str, model_json: dict[str, Any], plan: ScorePlan,
               top: int, device: str | None, model_dir: str | None = None) -> ScorePartResult:
    """Score the feature shards of one part into staging."""
    return score_part(store_url, tracking_uri, model_json, plan, top=top, device=device,
                      model_dir=model_dir)


def plan_parts(manifests: list[ShardManifest], done: set[str], model: ScoredModel, *,
               workers: int, max_segments: int = MAX_SEGMENTS_PER_PART) -> list[ScorePlan]:
    """Group the feature shards not yet scored into parts of balanced segment counts.

    At least two parts per worker slot (when there are enough shards), at most
    ``max_segments`` segments per part unless one shard alone is larger; shards stay whole.
    """
    todo = sorted((m for m in manifests if m.shard_id not in done), key=lambda m: m.shard_id)
    if not todo:
        return []
    total = sum(m.counts.n_segments for m in todo)
    max_segments = max(max_segments, math.ceil(total / MAX_TASK_RUNS))  # the task-run cap
    n = min(len(todo), max(2 * workers, math.ceil(total / max_segments)))
    target = max(1.0, total / n)
    groups: list[list[ShardManifest]] = [[]]
    size = 0
    for m in todo:  # contiguous: a shard joins the part it leaves nearer the target (a part
        # closed only once it reached the target overshot by up to a whole shard: parts of
        # 1,689 and 393 segments for a target of 1,172), never past the cap
        n_seg = m.counts.n_segments
        if groups[-1] and (size + n_seg / 2 > target or size + n_seg > max_segments):
            groups.append([])
            size = 0
        groups[-1].append(m)
        size += n_seg
    if len(groups) > n and size < target / 2 and \
            sum(m.counts.n_segments for m in groups[-2]) + size <= max_segments:
        groups[-2].extend(groups.pop())  # a remainder is not worth a task run of its own
    plans = [ScorePlan(part_id_of(model, [m.shard_id for m in g]),
                       tuple(m.shard_id for m in g), tuple(m.tensor_file for m in g),
                       sum(m.counts.n_ok for m in g),
                       sum(m.counts.n_segments for m in g)) for g in groups if g]
    return sorted(plans, key=lambda p: -p.n_segments)


@flow(name="score", validate_parameters=False)
def score_flow(store: str, model_uri: str, source: str | None = None, top_k: int = 5,
               workers: int = 1, progress: bool = True, device: str | None = None,
               tracking_uri: str | None = None, shard_minutes: float = 60.0,
               resolved: dict[str, Any] | None = None) -> ScoreSummary:
    """Score the store (after ingesting ``source``, if given) with ``model_uri``.

    ``resolved`` is what :meth:`flows.score_preflight.ScoreStart.resolved_for_flow` gives
    for ``model_uri`` (an exact version): the model is then neither resolved nor downloaded
    again, and the workers load it from its ``model_dir`` where that folder exists.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    fstore = FeatureStore(store, create=source is not None)
    uri = tracking_uri_for(fstore, tracking_uri)
    if resolved is not None:
        model = ScoredModel.from_dict(resolved["model"])
        feature_config, model_dir = resolved["feature_config"], resolved.get("model_dir")
    else:
        (model, feature_config), model_dir = scored_model(model_uri, uri), None
    logger.info("flow run %s: model %s resolves to %s v%s (run %s, feature set %s)", run_id(),
                model_uri, model.name, model.version, model.run_id, model.feature_set)
    ingest = None
    if source is not None:
        # imported here, not with this module: a worker unpickling its first score task
        # imports this module, and the ingest stack (numba, scipy.fft, the feature kernels)
        # was 0.5 CPU-s of it, and of the command's imports, for runs that ingest nothing
        from flows.ingest import ingest_flow

        runner = FlowRunContext.get().task_runner.duplicate()  # type: ignore[union-attr]
        ingest = ingest_flow.with_options(task_runner=runner)(
            source=source, store=store, config=feature_config, shard_minutes=shard_minutes,
            workers=workers, progress=progress)
    check_feature_set(fstore, model, feature_config)
    summary = ScoreSummary(model.name, model.version, model.feature_set, workers=workers,
                           ingest=ingest)
    scores = ScoreStore(fstore)
    rolled = fstore.recover()
    if rolled:
        logger.info("recovered: %d half-committed shards rolled back", rolled)
    scores.register_model(model)
    manifests = fstore.manifests(model.feature_set)
    done = scores.scored_shards(model.name, model.version)
    summary.tracks_in_store = sum(m.counts.n_ok for m in manifests)
    summary.already_scored = sum(m.counts.n_ok for m in manifests if m.shard_id in done)
    plans = plan_parts(manifests, done, model, workers=workers)
    if plans:
        _score(fstore, scores, uri, model, plans, summary, top_k, device, progress,
               model_dir)
    summary.wall_s = time.perf_counter() - started
    logger.info(summary.render())
    publish("score-summary", f"score with {model.name} v{model.version}", {
        "model": f"{model.name} v{model.version} (MLflow run {model.run_id})",
        "feature set": model.feature_set, "tracks scored": summary.tracks,
        "already scored": summary.already_scored, "not confident": summary.unconfident,
        "segments": summary.segments, "tracks/s": summary.tracks_per_s,
        "wall s": summary.wall_s, "parts failed": summary.parts_failed},
        [{"label": k, "tracks": v} for k, v in sorted(summary.label_counts.items(),
                                                       key=lambda kv: -kv[1])] or None)
    return summary


def _score(fstore: FeatureStore, scores: ScoreStore, tracking_uri: str, model: ScoredModel,
           plans: list[ScorePlan], summary: ScoreSummary, top_k: int, device: str | None,
           progress: bool, model_dir: str | None = None) -> None:
    futures = score_task.map(fstore.url, tracking_uri, unmapped(model.to_dict()), plans, top_k,
                             device, model_dir)

    def commit_group(results: list[ScorePartResult]) -> None:
        kept = set(scores.commit_parts(model, [r.written for r in results], run=run_id()))
        for result in results:
            if result.written.part_id in kept:
                summary.add(result)
            else:
                summary.scored_elsewhere += result.n_tracks

    buffer = CommitBuffer(commit_group)

    def commit(result: ScorePartResult) -> float:
        buffer.add([result])
        return result.n_tracks

    summary.parts_failed += commit_as_completed(
        futures, commit, what="score", total=sum(p.n_tracks for p in plans), unit="tracks",
        progress=progress)
    buffer.flush()


def run_score(store: str, model_uri: str, *, source: str | None = None, top_k: int = 5,
              dask_address: str | None = None, n_workers: int | None = None,
              device: str | None = None, tracking_uri: str | None = None,
              progress: bool = True, shard_minutes: float = 60.0,
              echo: Echo = None, start: ScoreStart | None = None) -> ScoreSummary:
    """Run the score flow on a Dask cluster (an existing one, or a local one started here).

    Parameters
    ----------
    store : str
        Feature store root (created when ``source`` is given).
    model_uri : str
        ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
    source : str, optional
        Audio to ingest first (only what the store does not hold is processed).
    top_k : int
        Labels kept per track in ``top_labels``.
    dask_address, n_workers, echo : as for :func:`flows.ingest.run_ingest`.
    device : str, optional
        Torch device of the workers (default: CUDA when present).
    tracking_uri : str, optional
        MLflow URI (or another store's folder) holding the model; default
        ``MLFLOW_TRACKING_URI`` or the store's embedded SQLite.
    start : ScoreStart, optional
        What :func:`flows.score_preflight.start_score` already resolved for these arguments.
    """
    start = start or start_score(store, model_uri, source=source, tracking_uri=tracking_uri)
    if start.done is not None:  # nothing to score: no cluster, no Prefect API, no flow run
        return start.done
    uri, model, config = start.tracking_uri, start.model, start.feature_config
    try:
        warm: list[Warmup] = [(warm_scorer, (uri, model.uri, device, start.model_dir))]
        if source is not None:
            from flows.ingest_worker import warm_worker

            warm.append((warm_worker, (FeatureConfig.from_dict(config).to_json(),)))
        result: ScoreSummary = run_on_cluster(
            score_flow, {"store": store, "model_uri": model.uri, "source": source,
                         "top_k": top_k, "progress": progress, "device": device,
                         "tracking_uri": uri, "shard_minutes": shard_minutes,
                         "resolved": start.resolved_for_flow()},
            dask_address=dask_address, n_workers=n_workers, warm=warm,
            preload=score_preload(source, model.input),
            echo=echo)
    finally:
        start.release()
    return result
