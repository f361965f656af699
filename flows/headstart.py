"""Start-up off the critical path: the first shards are extracted while the cluster and the
Prefect API boot, and :func:`run_ingest`, the command's way to run the ingest flow.

A command that has work cannot wait for its workers (each imports Python, Dask, Prefect's
task engine and the feature stack) and the temporary Prefect API (a server process that boots
in seconds) before its first decode. :class:`HeadStart` begins at once, in a thread of the
command's own process: it probes the source's new files in order and extracts small shards of
them (:func:`flows.ingest_worker.run_shard`, the workers' own function, writing uncommitted
files as a shard task does). As soon as the local cluster's workers are up it hands its next
shards to them instead (plain Dask futures: the Prefect API may still be booting). When the
flow starts it takes the head start over (:meth:`HeadStart.hand_over`): the records probed so
far join its own probing, the head-start shards are committed by the flow like its tasks'
(a failed one is re-run as a shard task), and it plans only the rest.

Nothing is committed outside the flow run, so every guarantee of the flow holds: the commit
lease, exactly-once commits, retirement before the new rows, recovery after a crash (an
interrupted head start leaves only uncommitted files, cleared as any shard task's are). The
head-start shards are not Prefect task runs; the flow logs them. With an external cluster
(``--dask-address``) the files may be readable only from the workers, so nothing runs in the
command's process: the head start waits for the cluster; with a running scheduler and a
configured Prefect server (``PREFECT_API_URL``) nothing boots, and there is no head start.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featurestore.hashing import short_hash
from featurestore.store import FeatureStore
from flows.cluster import Echo
from flows.plan import TRACK_OVERHEAD_S
from flows.preflight import (
    IngestSummary,
    LookUp,
    earlier_row_stands,
    look_up,
    update_catalogue,
)
from flows.records import ProbeRecord, ShardPlan
from flows.startup import boot_early
from tasks.config import FeatureConfig

if TYPE_CHECKING:
    from flows.cluster import ClusterInfo

log = logging.getLogger("mtag")

HEAD_SHARD_AUDIO_S = 30.0
"""Audio seconds of one head-start shard (small: the flow waits for the last one it took)."""
HEAD_SHARD_TRACKS = 64
"""Most tracks in one head-start shard (short files: their per-track cost counts)."""

INGEST_PRELOAD = ("flows.ingest_worker",)
"""What the fork server imports for ingest workers (:func:`flows.cluster.fork_workers`)."""

_running: dict[str, HeadStart] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Handover:
    """What a head start did before the flow took over."""

    records: list[ProbeRecord]  # every file it probed
    jobs: list[tuple[ShardPlan, cf.Future[Any]]]  # shards submitted (done or running)
    started_s: float | None  # seconds from the head start's start to its first shard

    @property
    def track_ids(self) -> set[str]:
        """Tracks in its shards."""
        return {t.track_id for plan, _ in self.jobs for t in plan.tracks}


class HeadStart:
    """Probe and extract a source's first new files before the flow run exists.

    Parameters
    ----------
    store_url : str
        The feature store the shards are written to (uncommitted).
    config : FeatureConfig
    look : LookUp
        The command's preflight; its files to probe, in order, are the head start's.
    local : bool
        Run shards in this process until a cluster is offered (:meth:`use_cluster`).
    """

    def __init__(self, store_url: str, config: FeatureConfig, look: LookUp, *,
                 local: bool = True) -> None:
        self.token = uuid.uuid4().hex
        self.store_url, self.config, self.look, self.local = store_url, config, look, local
        self._files = list(look.triage.to_probe)
        self._next = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._submit: Callable[..., cf.Future[Any]] | None = _local_submit if local else None
        self._slots = 1
        self._records: list[ProbeRecord] = []
        self._jobs: list[tuple[ShardPlan, cf.Future[Any]]] = []
        self._taken: set[str] = set()
        self._t0 = time.perf_counter()
        self._first: float | None = None
        self._thread = threading.Thread(target=self._feed, name="head-start", daemon=True)

    # ------------------------------------------------------------------ the command's side
    def start(self) -> HeadStart:
        """Begin (in a daemon thread); the flow finds it by :attr:`token`."""
        with _lock:
            _running[self.token] = self
        self._thread.start()
        return self

    def use_cluster(self, cluster: ClusterInfo) -> None:
        """Send the next shards to ``cluster``'s workers (as many at once as it has slots)."""
        executor = cluster.client.get_executor(pure=False)
        with self._cond:
            self._submit, self._slots = executor.submit, max(1, cluster.threads)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop taking files; forget the head start (its uncommitted files are cleared as a
        failed shard task's are).
        """
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        with _lock:
            _running.pop(self.token, None)

    # ------------------------------------------------------------------ the flow's side
    def hand_over(self, timeout: float = 60.0) -> Handover:
        """Stop after the file being probed; return what was probed and submitted."""
        self.close()
        self._thread.join(timeout)
        with self._cond:
            first = None if self._first is None else self._first - self._t0
            return Handover(list(self._records), list(self._jobs), first)

    # ------------------------------------------------------------------ the feeder
    def _feed(self) -> None:
        try:
            from flows.ingest_worker import probe_one

            while not self._stop.is_set():
                if not self._wait_for_slot():
                    return
                plan = self._next_shard(probe_one)
                if plan is None:
                    return
                with self._cond:
                    if self._stop.is_set():  # the flow took over while this shard was probed
                        return
                    assert self._submit is not None
                    job = self._submit(_run_shard, self.store_url, self.config.to_json(), plan)
                    self._jobs.append((plan, job))
                    job.add_done_callback(lambda _: self._notify())
                    if self._first is None:
                        self._first = time.perf_counter()
                        log.info("head start: first shard (%d tracks) %.2f s after the "
                                 "preflight", len(plan.tracks), self._first - self._t0)
        except Exception:  # the flow probes and extracts whatever the head start did not
            log.warning("head start stopped", exc_info=True)
            self._stop.set()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _wait_for_slot(self) -> bool:
        with self._cond:
            while not self._stop.is_set():
                running = sum(not job.done() for _, job in self._jobs)
                if self._submit is not None and running < self._slots:
                    return True
                self._cond.wait(0.5)
        return False

    def _next_shard(self, probe_one: Callable[[Any], ProbeRecord]) -> ShardPlan | None:
        """Probe files until a small shard of new tracks is gathered (None: no files left)."""
        chunk: list[ProbeRecord] = []
        cost = 0.0
        while (self._next < len(self._files) and not self._stop.is_set()
               and cost < HEAD_SHARD_AUDIO_S and len(chunk) < HEAD_SHARD_TRACKS):
            record = probe_one(self._files[self._next])
            with self._cond:
                self._next += 1
                self._records.append(record)
                if self._wanted(record):
                    self._taken.add(record.track_id)
                    chunk.append(record)
                    cost += (record.duration_s or 0.0) + TRACK_OVERHEAD_S
        if not chunk:
            return None
        fs = self.look.feature_set
        return ShardPlan("s-" + short_hash(fs, *sorted(r.track_id for r in chunk)), fs,
                         tuple(chunk))

    def _wanted(self, r: ProbeRecord) -> bool:
        """Whether the flow would plan ``r`` (see :func:`flows.preflight.keep_earlier_rows`
        and :func:`flows.plan.dedupe`); the flow re-checks, this only saves work.
        """
        return not earlier_row_stands(r, self.look) and r.track_id not in self.look.committed \
            and r.track_id not in self._taken


def take_over(token: str | None) -> Handover | None:
    """The head start ``token`` names, stopped and handed to the calling flow (None when it
    is not in this process: a deployment's run, a retried flow run).
    """
    with _lock:
        head = _running.get(token) if token else None
    return head.hand_over() if head is not None else None


def _run_shard(store_url: str, config_json: str, plan: ShardPlan) -> Any:
    from flows.ingest_worker import run_shard

    return run_shard(store_url, config_json, plan)


def _local_submit(fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
    """Run ``fn(*args)`` in a daemon thread of this process (an interrupted command does not
    wait for it, as it would for a thread pool's).
    """
    future: cf.Future[Any] = cf.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="head-start-shard", daemon=True).start()
    return future


def run_ingest(source: str, store: str, *, config: FeatureConfig | None = None,
               dask_address: str | None = None, n_workers: int | None = None,
               shard_minutes: float = 60.0, progress: bool = True,
               echo: Echo = None, accept_removals: bool = False,
               head_start: bool = True) -> IngestSummary:
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
        :data:`flows.preflight.MASS_REMOVAL_SHARE`).
    head_start : bool
        Extract the first shards while the cluster and the Prefect API boot (:class:`HeadStart`).
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
    # something must boot for a head start to help: a local cluster or a temporary API (with
    # a running scheduler and a configured Prefect server the flow starts at once, and its
    # shards are then all task runs the server shows)
    booting = dask_address is None or not os.environ.get("PREFECT_API_URL")
    head = HeadStart(fstore.url, cfg, look, local=dask_address is None).start() \
        if head_start and booting else None
    if head is not None:  # work is certain: what the flow needs boots now, on the idle core
        boot_early(INGEST_PRELOAD, local_cluster=dask_address is None)
    # one BLAS thread in this process: the head start's matrix products are small, and on
    # busy cores OpenBLAS's extra threads spin (16 ogg files extracted in one process: 33-35
    # CPU-s in 22-24 s of wall time with its default pool, 23 CPU-s in 23 s with one thread);
    # nothing else here does linear algebra
    blas = contextlib.ExitStack()
    if head is not None and head.local:
        from threadpoolctl import threadpool_limits

        blas.enter_context(threadpool_limits(limits=1, user_api="blas"))
    try:
        from flows.ingest import ingest_flow
        from flows.ingest_worker import warm_worker
        from flows.runtime import run_on_cluster

        result: IngestSummary = run_on_cluster(
            ingest_flow, {"source": source, "store": store, "config": cfg.to_dict(),
                          "shard_minutes": shard_minutes, "progress": progress,
                          "accept_removals": accept_removals,
                          "head_start": head.token if head else None},
            dask_address=dask_address, n_workers=n_workers,
            warm=[(warm_worker, (cfg.to_json(),))], preload=INGEST_PRELOAD,
            on_cluster=head.use_cluster if head else None, echo=echo)
    finally:
        if head is not None:
            head.close()
        blas.close()
    return result
