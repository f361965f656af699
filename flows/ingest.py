"""The ingest flow: list, probe, plan shards, extract over Dask, commit, summarise.

``ingest_flow`` is a Prefect flow whose tasks run on a ``DaskTaskRunner``; one task run handles
a batch of files (probe) or a shard of tracks sized by audio minutes (extract), never a single
track. The task bodies are in :mod:`flows.ingest_worker`; the preflight (listing, triage, the
catalogue's changes) is in :mod:`flows.preflight`; :func:`flows.headstart.run_ingest` runs the
flow on a cluster, with the first shards extracted while the cluster and the API boot.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from featurestore.sources import SourceFile
from featurestore.store import FeatureStore
from flows.headstart import Handover, run_ingest, take_over
from flows.ingest_worker import probe_files, probe_one, run_batch
from flows.plan import batch_shards, batches, dedupe, plan_shards
from flows.preflight import (
    MASS_REMOVAL_MIN,
    MASS_REMOVAL_SHARE,
    IngestSummary,
    LookUp,
    keep_earlier_rows,
    look_up,
    summary_json,
    update_catalogue,
)
from flows.records import ProbeRecord, ShardBatch, ShardPlan, ShardResult
from flows.report import publish, run_id
from flows.runtime import CommitBuffer, commit_as_completed
from tasks.config import FeatureConfig
from tasks.errors import StoreError
from tasks.faults import failpoint

__all__ = ["MASS_REMOVAL_MIN", "MASS_REMOVAL_SHARE", "IngestSummary", "LookUp", "ingest_flow",
           "look_up", "run_ingest", "summary_json", "update_catalogue"]

log = logging.getLogger("mtag")

PROBE_BATCH_MAX = 2000
PROBE_LOCAL_MAX = 256
"""Up to this many files are probed by threads of the flow process: a round of Prefect tasks
costs about a second, more than hashing and reading the headers of a few hundred files (a
nightly run that finds a handful of new files starts extracting at once)."""


@task(name="probe-files", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def probe_task(files: list[SourceFile]) -> list[ProbeRecord]:
    """Hash and read the headers of a batch of files."""
    return probe_files(files)


@task(name="extract-shards", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="extract-{batch.batch_id}")
def shard_task(store_url: str, config_json: str, batch: ShardBatch) -> list[ShardResult]:
    """Decode, resample, segment and extract features of a batch of shards (one shard unless
    the run has more than :data:`flows.plan.MAX_TASK_RUNS` shards); nothing is committed.
    """
    return run_batch(store_url, config_json, batch)


@flow(name="ingest", validate_parameters=False)
def ingest_flow(source: str, store: str, config: dict[str, Any] | None = None,
                shard_minutes: float = 60.0, workers: int = 1,
                progress: bool = True, accept_removals: bool = False,
                head_start: str | None = None) -> IngestSummary:
    """Ingest ``source`` into the feature store at ``store``; return what the run did.

    ``head_start`` names a :class:`flows.headstart.HeadStart` of the calling process whose
    probed files and shards this run takes over (ignored where there is none).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    logger.info("flow run %s: ingest %s into %s", run_id(), source, store)
    cfg = FeatureConfig.from_dict(config or {})
    fstore = FeatureStore(store, create=True)
    rolled = fstore.recover()
    if rolled:
        logger.info("recovered: %d half-committed shards rolled back", rolled)
    look = look_up(fstore, source, cfg, accept_removals=accept_removals)
    summary = IngestSummary(feature_set=look.feature_set, workers=workers, files=look.files,
                            unchanged=look.triage.unchanged)
    logger.info("%d files listed, %d unchanged, %d to probe", look.files,
                look.triage.unchanged, len(look.triage.to_probe))
    head = take_over(head_start)
    to_probe = look.triage.to_probe
    taken: set[str] = set()
    if head is not None:
        probed = {r.uri for r in head.records}
        to_probe = [f for f in to_probe if f.uri not in probed]
        taken = head.track_ids
        logger.info("head start: %d files probed, %d shards (%d tracks) begun %s before "
                    "this flow run", len(head.records), len(head.jobs), len(taken),
                    "-" if head.started_s is None else f"{head.started_s:.1f} s after the "
                    "preflight and")
        summary.head_start_shards = len(head.jobs)
    records = [*(head.records if head else []), *_probe(to_probe, workers, progress)]
    records = keep_earlier_rows(records, look, summary)
    update_catalogue(fstore, look, records, summary)
    failpoint("ingest.probed")
    pending, summary.duplicates = dedupe(records, look.committed)
    summary.retried = sum(r.track_id in look.retry for r in pending)
    shards = plan_shards([r for r in pending if r.track_id not in taken], look.feature_set,
                         shard_minutes=shard_minutes, workers=workers)
    if shards or (head and head.jobs):
        _extract(fstore, cfg, shards, summary, progress, head)
    summary.wall_s = time.perf_counter() - started
    logger.info(summary.render())
    publish("ingest-summary", f"ingest into {summary.feature_set}", {
        "tracks ok": summary.ok, "failed": summary.failed, "unsupported": summary.unsupported,
        "skipped (unchanged or duplicate)": summary.skipped, "segments": summary.segments,
        "audio hours": summary.audio_s / 3600, "wall s": summary.wall_s,
        "x realtime": summary.realtime_x, "workers": summary.workers,
        "shards failed": summary.shards_failed},
        [{"path": p, "stage": st, "error": e} for p, st, e in summary.errors[:50]] or None)
    return summary


def _probe(files: list[SourceFile], workers: int, progress: bool) -> list[ProbeRecord]:
    if not files:
        return []
    if len(files) <= PROBE_LOCAL_MAX:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(2, workers)) as pool:
            return list(pool.map(probe_one, files))
    futures = probe_task.map(batches(files, 2 * workers, PROBE_BATCH_MAX))
    records: list[ProbeRecord] = []

    def collect(got: list[ProbeRecord]) -> float:
        records.extend(got)
        return len(got)

    failed = commit_as_completed(futures, collect, what="probe", total=len(files),
                                 unit="files", progress=progress)
    if failed:  # unprobed files would be silently left out of this run
        raise StoreError(f"{failed} probe batches failed after retries (see the log); "
                         "run again")
    return records


def _extract(fstore: FeatureStore, cfg: FeatureConfig, shards: list[ShardPlan],
             summary: IngestSummary, progress: bool, head: Handover | None = None) -> None:
    """Run ``shards`` as tasks and commit them with the head start's shards (a failed one is
    run again as a task).
    """
    task_batches = batch_shards(shards)
    futures = list(shard_task.map(fstore.url, cfg.to_json(), task_batches))
    buffer = CommitBuffer(lambda results: _commit(fstore, results, summary))
    jobs = {job: plan for plan, job in (head.jobs if head else [])}
    for job in cf.as_completed(jobs):
        try:
            buffer.add([job.result()])
        except Exception as exc:
            plan = jobs[job]
            get_run_logger().warning("head-start shard %s failed (%s); running it as a task",
                                     plan.shard_id, exc)
            task_batches.append(ShardBatch(plan.shard_id, (plan,)))
            futures.append(shard_task.submit(fstore.url, cfg.to_json(), task_batches[-1]))

    def commit(results: list[ShardResult]) -> float:
        buffer.add(results)
        return sum(r.counts.audio_s for r in results) / 60.0

    audio_min = sum(s.audio_s for b in task_batches for s in b.shards) / 60.0
    summary.shards_failed += commit_as_completed(
        futures, commit, what="extract", total=audio_min,
        unit="audio min", progress=progress, fail_weight=lambda i: len(task_batches[i].shards))
    buffer.flush()


def _commit(fstore: FeatureStore, results: list[ShardResult], summary: IngestSummary) -> None:
    """Commit a group of shards (one Delta transaction per table) and count them."""
    done = fstore.commit_shards([r.written for r in results], run=run_id())
    for result in results:
        if result.shard_id in done.counts:  # as committed (less what another writer had)
            summary.add(result, counts=done.counts[result.shard_id],
                        unsupported=result.unsupported)
    summary.committed_elsewhere += done.dropped_tracks
    if done.dropped_tracks:
        get_run_logger().warning("%d tracks were committed by another writer first; their "
                                 "rows from this run were left out", done.dropped_tracks)


