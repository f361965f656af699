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

from featurestore.catalogue import mark_gone, orphaned, retire
from featurestore.hashing import track_id_of
from featurestore.sources import SourceFile, discover, in_scope, listing_scope
from featurestore.store import FeatureStore, ShardCounts
from flows.cluster import Echo
from flows.ingest_worker import probe_files, probe_one, run_batch, warm_worker
from flows.plan import Triage, batch_shards, batches, dedupe, plan_shards, triage
from flows.records import ProbeRecord, ShardBatch, ShardPlan, ShardResult, from_fields
from flows.report import publish, run_id
from flows.runtime import CommitBuffer, commit_as_completed, run_on_cluster
from tasks.config import FeatureConfig
from tasks.errors import StoreError
from tasks.faults import failpoint

log = logging.getLogger("mtag")

MASS_REMOVAL_SHARE = 0.5
"""A run that finds more than this share of the known files under its source gone (and more
than :data:`MASS_REMOVAL_MIN`) retires none of them unless told to (``--accept-removals``):
an unmounted disk or an emptied bucket looks like a deleted catalogue."""
MASS_REMOVAL_MIN = 10

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
    retried: int = 0
    superseded: int = 0
    gone: int = 0
    gone_held: int = 0
    audio_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 1
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    def _catalogue_lines(self) -> list[str]:
        lines = []
        if self.superseded:
            lines.append(f"  {self.superseded} replaced files: their old tracks left the "
                         "current views (earlier table versions keep them)")
        if self.gone:
            lines.append(f"  {self.gone} files no longer listed: marked gone, their tracks "
                         "left the current views")
        if self.gone_held:
            lines.append(f"  ! {self.gone_held} known files are missing from the source, more "
                         "than half of it: nothing was retired (an unmounted disk?); if they "
                         "were deleted, run again with --accept-removals")
        return lines

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
        changes = self._catalogue_lines()
        if self.ok + self.failed + self.unsupported == 0 and self.shards_failed == 0:
            return "\n".join([
                f"Nothing to do: all {self.files} files are already in feature set "
                f"{self.feature_set} ({self.unchanged} unchanged, {self.duplicates} "
                f"duplicate or renamed).", *changes])
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
        if self.retried:
            lines.append(f"  {self.retried} tracks whose last attempt failed for a transient "
                         "reason were tried again")
        lines += changes
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
                progress: bool = True, accept_removals: bool = False) -> IngestSummary:
    """Ingest ``source`` into the feature store at ``store``; return what the run did."""
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
    records = _probe(look.triage.to_probe, workers, progress)
    records = _keep_earlier_rows(records, look, summary)
    update_catalogue(fstore, look, records, summary)
    failpoint("ingest.probed")
    pending, summary.duplicates = dedupe(records, look.committed)
    summary.retried = sum(r.track_id in look.retry for r in pending)
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
    committed: set[str]  # for good (see FeatureStore.committed_track_ids)
    retry: set[str]  # transient failures, tried again
    known: dict[str, tuple[int, float, str]]
    gone: list[str]  # known files under the source that the listing lacks
    gone_held: bool  # too many to retire without --accept-removals


def look_up(fstore: FeatureStore, source: str, cfg: FeatureConfig, *,
            accept_removals: bool = False) -> LookUp:
    """List ``source`` and split it against the store's snapshots (no audio is opened)."""
    fs_id = fstore.register_feature_set(cfg)
    files = discover(source)
    committed, retry = fstore.track_ids(fs_id)
    known = fstore.known_sources()
    scope = listing_scope(source)
    gone: list[str] = []
    in_source = 0
    if scope is not None:
        listed = {f.uri for f in files}
        for uri in known:
            if in_scope(uri, scope):
                in_source += 1
                if uri not in listed:
                    gone.append(uri)
    held = (not accept_removals and len(gone) > MASS_REMOVAL_MIN
            and len(gone) > MASS_REMOVAL_SHARE * in_source)
    return LookUp(fs_id, len(files), triage(files, known, committed), committed, retry, known,
                  sorted(gone), held)


def _keep_earlier_rows(records: list[ProbeRecord], look: LookUp, summary: IngestSummary
                       ) -> list[ProbeRecord]:
    """Leave out known files that could not be read this time (gone since the listing, an
    I/O error): their earlier rows stand, nothing is retired for a passing fault.
    """
    keep = []
    for r in records:
        if r.retry and r.uri in look.known:
            summary.errors.append((r.uri, r.stage or "probe",
                                   f"{r.error} (its earlier row is kept)"))
        else:
            keep.append(r)
    return keep


def update_catalogue(fstore: FeatureStore, look: LookUp, records: list[ProbeRecord],
                     summary: IngestSummary) -> None:
    """Record what this run saw of the catalogue: the probed files in ``sources``; the tracks
    of replaced and deleted files retired from the current views
    (:mod:`featurestore.catalogue`); deleted files marked gone.
    """
    probed = {r.uri: r.track_id for r in records}
    changed = [u for u, t in probed.items()
               if u in look.known and track_id_of(look.known[u][2]) != t]
    gone = [] if look.gone_held else look.gone
    summary.gone_held = len(look.gone) if look.gone_held else 0
    superseded = orphaned(look.known, probed, [])
    lost = orphaned(look.known, probed, gone) - superseded
    run = run_id() or ""
    if superseded:
        retire(fstore, superseded, reason="superseded", run=run)
    if lost:
        retire(fstore, lost, reason="gone", run=run)
    summary.superseded, summary.gone = len(changed), len(gone)
    mark_gone(fstore, gone)
    fstore.record_sources([
        {"uri": r.uri, "size_bytes": r.size_bytes, "mtime": r.mtime,
         "content_hash": r.content_hash, "track_id": r.track_id, "status": "present"}
        for r in records
    ])


def run_ingest(source: str, store: str, *, config: FeatureConfig | None = None,
               dask_address: str | None = None, n_workers: int | None = None,
               shard_minutes: float = 60.0, progress: bool = True,
               echo: Echo = None, accept_removals: bool = False) -> IngestSummary:
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
    accept_removals : bool
        Retire the tracks of missing files even when most of the source is missing (see
        :data:`MASS_REMOVAL_SHARE`).
    """
    started = time.perf_counter()
    cfg = config or FeatureConfig()
    fstore = FeatureStore(store, create=True)
    look = look_up(fstore, source, cfg, accept_removals=accept_removals)
    if not look.triage.to_probe:  # nothing new: no cluster, no Prefect API, no flow run
        summary = IngestSummary(look.feature_set, files=look.files,
                                unchanged=look.triage.unchanged)
        if look.gone:
            fstore.recover()
            update_catalogue(fstore, look, [], summary)
        summary.wall_s = time.perf_counter() - started
        log.info(summary.render())
        return summary
    result: IngestSummary = run_on_cluster(
        ingest_flow, {"source": source, "store": store, "config": cfg.to_dict(),
                      "shard_minutes": shard_minutes, "progress": progress,
                      "accept_removals": accept_removals},
        dask_address=dask_address, n_workers=n_workers, warm=[(warm_worker, (cfg.to_json(),))],
        echo=echo)
    return result


def summary_json(summary: IngestSummary) -> str:
    """The summary as indented JSON."""
    return json.dumps(summary.to_dict(), indent=1, default=str)
