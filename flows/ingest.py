"""The ingest flow: list, probe, plan shards, extract over Dask, commit, summarise.

``ingest_flow`` is a Prefect flow whose tasks run on a ``DaskTaskRunner``; one task run handles
a batch of files (probe) or a shard of tracks sized by audio minutes (extract), never a single
track. The task bodies are in :mod:`flows.ingest_worker`; :func:`run_ingest` runs the flow on
a cluster through :mod:`flows.runtime`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from featurestore.sources import SourceFile, discover
from featurestore.store import FeatureStore, ShardCounts
from flows.cluster import Echo
from flows.ingest_worker import probe_files, probe_one, run_batch, warm_worker
from flows.plan import Triage, batch_shards, batches, dedupe, plan_shards, triage
from flows.records import ProbeRecord, ShardBatch, ShardPlan, ShardResult, from_fields
from flows.report import publish, run_id
from flows.runtime import CommitBuffer, commit_as_completed, run_on_cluster
from tasks.config import FeatureConfig
from tasks.errors import StoreError

log = logging.getLogger("mtag")

PROBE_BATCH_MAX = 2000
PROBE_LOCAL_MAX = 256
"""Up to this many files are probed by threads of the flow process: a round of Prefect tasks
costs about a second, more than hashing and reading the headers of a few hundred files (a
nightly run that finds a handful of new files starts extracting at once)."""


@dataclass
class IngestSummary:
    """What an ingest run did (printed at the end, returned to callers)."""

    feature_set: str
    files: int = 0
    unchanged: int = 0
    duplicates: int = 0
    ok: int = 0
    failed: int = 0
    unsupported: int = 0
    segments: int = 0
    shards: int = 0
    shards_failed: int = 0
    committed_elsewhere: int = 0
    audio_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 1
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """Files that needed no work: unchanged since the last run, or duplicate content."""
        return self.unchanged + self.duplicates

    @property
    def realtime_x(self) -> float:
        """Audio seconds processed per wall second."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including derived figures."""
        return asdict(self) | {"skipped": self.skipped, "realtime_x": self.realtime_x}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IngestSummary:
        """Inverse of :meth:`to_dict` (derived figures are recomputed)."""
        return from_fields(cls, data, errors=lambda es: [tuple(e) for e in es])

    def add(self, result: ShardResult, *, counts: ShardCounts | None = None,
            unsupported: int = 0) -> None:
        """Count a committed shard (``counts`` as committed, default the shard's own;
        ``unsupported`` of its failed tracks are unsupported file types).
        """
        counts = counts or result.counts
        self.ok += counts.n_ok
        self.unsupported += unsupported
        self.failed += counts.n_failed - unsupported
        self.segments += counts.n_segments
        self.audio_s += counts.audio_s
        self.compute_s += result.compute_s
        self.shards += 1
        self.errors.extend(result.errors)
        self.peak_rss_mb[result.worker] = max(self.peak_rss_mb.get(result.worker, 0.0),
                                              result.peak_rss_mb)

    def render(self) -> str:
        """Human-readable end-of-run summary."""
        if self.ok + self.failed + self.unsupported == 0 and self.shards_failed == 0:
            return (f"Nothing to do: all {self.files} files are already in feature set "
                    f"{self.feature_set} ({self.unchanged} unchanged, {self.duplicates} "
                    f"duplicate or renamed).")
        hours = self.audio_s / 3600
        per_core = self.realtime_x / max(1, self.workers)
        lines = [
            f"Ingested into feature set {self.feature_set}: "
            f"{self.ok} ok, {self.failed} failed, {self.unsupported} unsupported, "
            f"{self.skipped} skipped (already in store or duplicate)",
            f"  {hours:.2f} h of audio, {self.segments} segments in {self.shards} shards; "
            f"wall {self.wall_s:.1f} s = {self.realtime_x:.0f}x realtime "
            f"({per_core:.0f}x per worker, {self.workers} workers)",
        ]
        if self.shards_failed:
            lines.append(f"  {self.shards_failed} shards failed after retries; "
                         "run again to finish them")
        if self.committed_elsewhere:
            lines.append(f"  {self.committed_elsewhere} tracks were committed by another "
                         "writer at the same time (kept once)")
        for path, stage, error in self.errors[:10]:
            lines.append(f"  ! {stage:8s} {path}: {error}")
        if len(self.errors) > 10:
            lines.append(f"  ... {len(self.errors) - 10} more (query the tracks table)")
        return "\n".join(lines)


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
                progress: bool = True) -> IngestSummary:
    """Ingest ``source`` into the feature store at ``store``; return what the run did."""
    logger = get_run_logger()
    started = time.perf_counter()
    logger.info("flow run %s: ingest %s into %s", run_id(), source, store)
    cfg = FeatureConfig.from_dict(config or {})
    fstore = FeatureStore(store, create=True)
    rolled = fstore.recover()
    if rolled:
        logger.info("recovered: %d half-committed shards rolled back", rolled)
    look = look_up(fstore, source, cfg)
    summary = IngestSummary(feature_set=look.feature_set, workers=workers, files=look.files,
                            unchanged=look.triage.unchanged)
    logger.info("%d files listed, %d unchanged, %d to probe", look.files,
                look.triage.unchanged, len(look.triage.to_probe))
    records = _probe(look.triage.to_probe, workers, progress)
    fstore.record_sources([
        {"uri": r.uri, "size_bytes": r.size_bytes, "mtime": r.mtime,
         "content_hash": r.content_hash, "track_id": r.track_id} for r in records
    ])
    pending, summary.duplicates = dedupe(records, look.committed)
    shards = plan_shards(pending, look.feature_set, shard_minutes=shard_minutes,
                         workers=workers)
    if shards:
        _extract(fstore, cfg, shards, summary, progress)
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
             summary: IngestSummary, progress: bool) -> None:
    task_batches = batch_shards(shards)
    futures = shard_task.map(fstore.url, cfg.to_json(), task_batches)
    buffer = CommitBuffer(lambda results: _commit(fstore, results, summary))

    def commit(results: list[ShardResult]) -> float:
        buffer.add(results)
        return sum(r.counts.audio_s for r in results) / 60.0

    summary.shards_failed += commit_as_completed(
        futures, commit, what="extract", total=sum(s.audio_s for s in shards) / 60.0,
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


@dataclass(frozen=True)
class LookUp:
    """What the store already holds of a source: the preflight of every ingest run."""

    feature_set: str
    files: int
    triage: Triage
    committed: set[str]


def look_up(fstore: FeatureStore, source: str, cfg: FeatureConfig) -> LookUp:
    """List ``source`` and split it against the store's snapshots (no audio is opened)."""
    fs_id = fstore.register_feature_set(cfg)
    files = discover(source)
    committed = fstore.committed_track_ids(fs_id)
    return LookUp(fs_id, len(files), triage(files, fstore.known_sources(), committed),
                  committed)


def run_ingest(source: str, store: str, *, config: FeatureConfig | None = None,
               dask_address: str | None = None, n_workers: int | None = None,
               shard_minutes: float = 60.0, progress: bool = True,
               echo: Echo = None) -> IngestSummary:
    """Run the ingest flow on a Dask cluster (an existing one, or a local one started here).

    Parameters
    ----------
    source : str
        Folder, fsspec URL prefix, or CSV/Parquet manifest of URIs.
    store : str
        Feature store root (created if missing).
    config : FeatureConfig, optional
        Feature parameters (defaults if omitted).
    dask_address : str, optional
        ``tcp://HOST:PORT`` of a running scheduler.
    n_workers : int, optional
        Worker processes of the local cluster.
    shard_minutes : float
        Target audio minutes per shard task.
    progress : bool
        Show progress bars on stderr.
    echo : callable, optional
        Receives the line saying where the Dask cluster and its dashboard are.
    """
    started = time.perf_counter()
    cfg = config or FeatureConfig()
    look = look_up(FeatureStore(store, create=True), source, cfg)
    if not look.triage.to_probe:  # nothing new: no cluster, no Prefect API, no flow run
        summary = IngestSummary(look.feature_set, files=look.files,
                                unchanged=look.triage.unchanged,
                                wall_s=time.perf_counter() - started)
        log.info(summary.render())
        return summary
    result: IngestSummary = run_on_cluster(
        ingest_flow, {"source": source, "store": store, "config": cfg.to_dict(),
                      "shard_minutes": shard_minutes, "progress": progress},
        dask_address=dask_address, n_workers=n_workers, warm=[(warm_worker, (cfg.to_json(),))],
        echo=echo)
    return result


def summary_json(summary: IngestSummary) -> str:
    """The summary as indented JSON."""
    return json.dumps(summary.to_dict(), indent=1, default=str)
