"""The runtime every pipeline runs on: start or join a Dask cluster, start the Prefect API,
warm the workers, run a flow on them; inside the flow, commit task results as they complete
and count the failures.

Pipelines differ in their flow (what to plan and commit) and their worker bodies (what a task
computes), never in how they run: :func:`run_on_cluster` is the only place that wires Prefect
to Dask, and :func:`commit_as_completed` the only loop that waits on task futures. The building
blocks are :mod:`flows.cluster` (which cluster) and :mod:`flows.prefect_api` (which API).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed

from flows.cluster import ClusterInfo, Echo, dask_cluster
from flows.prefect_api import prefect_api
from flows.progress import Progress
from flows.startup import started

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

log = logging.getLogger("mtag")

Warmup = tuple[Callable[..., Any], tuple[Any, ...]]
"""A function and its arguments, run once on every worker before the flow's first task."""


def run_on_cluster(flow: Any, parameters: dict[str, Any], *, dask_address: str | None = None,
                   n_workers: int | None = None, warm: Sequence[Warmup] = (),
                   preload: Sequence[str] = (),
                   on_cluster: Callable[[ClusterInfo], None] | None = None,
                   echo: Echo = None) -> Any:
    """Run ``flow(**parameters, workers=...)`` with its tasks on a Dask cluster.

    The cluster is an existing scheduler (``dask_address``) or a local one started here; the
    Prefect API is the configured server or this process's temporary one, which boots while
    the workers spawn and warm up, so neither start-up waits for the other.

    Parameters
    ----------
    flow : prefect.Flow
        A flow with a ``workers`` parameter (set to the cluster's task slots).
    parameters : dict
        The flow's other parameters.
    dask_address : str, optional
        ``tcp://HOST:PORT`` of a running scheduler.
    n_workers : int, optional
        Worker processes of a local cluster (default: one per core).
    warm : sequence of (function, args)
        Run on every worker while the API boots (imports, filter banks, the model).
    preload : sequence of str
        Modules a local cluster's workers import before they start (once, in the process
        they are forked from: :func:`flows.cluster.fork_workers`).
    on_cluster : callable, optional
        Called with the cluster once it is up and warming, before the wait for the API (a
        head start hands its next shards to the workers there).
    echo : callable, optional
        Receives one line saying where the cluster and its dashboard are.

    Returns
    -------
    Whatever the flow returns (its summary dataclass).
    """
    with prefect_api(start=False) as api, dask_runner(dask_address, n_workers=n_workers,
                                                      preload=preload, echo=echo) as (cluster,
                                                                                      runner):
        for fn, args in warm:
            cluster.warm(fn, *args)
        if on_cluster is not None:
            on_cluster(cluster)
        started()  # the command's stack is imported by now (flows.startup)
        api.start()
        return flow.with_options(task_runner=runner)(**parameters, workers=cluster.threads)


@contextlib.contextmanager
def dask_runner(dask_address: str | None = None, *, n_workers: int | None = None,
                preload: Sequence[str] = (), echo: Echo = None
                ) -> Iterator[tuple[ClusterInfo, DaskTaskRunner]]:
    """A cluster (see :func:`flows.cluster.dask_cluster`) and a task runner that submits to
    it; for flows that run pipeline flows as subflows (the scheduled ones), each subflow taking
    ``runner.duplicate()``.
    """
    from prefect_dask import DaskTaskRunner

    with dask_cluster(dask_address, n_workers=n_workers, preload=preload,
                      echo=echo) as cluster:
        yield cluster, DaskTaskRunner(address=cluster.address)


def commit_as_completed(futures: Iterable[PrefectFuture[Any]], commit: Callable[[Any], float],
                        *, what: str, total: float, unit: str, progress: bool = True,
                        fail_weight: Callable[[int], int] | None = None) -> int:
    """Commit each task's result as soon as it completes; return how many failed.

    Parameters
    ----------
    futures : iterable of PrefectFuture
        Mapped task runs (each already retried by Prefect as its task says).
    commit : callable
        Called in the flow process with each successful result; returns the progress it
        stands for (in ``unit``). It runs as results arrive, so a crash later loses nothing
        already handed over.
    what : str
        Names the work in the progress bar and in failure messages.
    total : float
        Progress total, in ``unit``.
    progress : bool
        Show the progress bar.
    fail_weight : callable, optional
        How many units of work (e.g. shards) the failed task at this position held
        (default 1 each).
    """
    logger = get_run_logger()
    futures = list(futures)
    position = {id(f): i for i, f in enumerate(futures)}
    failed = 0
    with Progress(what, total=total, unit=unit, enabled=progress) as bar:
        for future in as_completed(futures):
            future.wait()
            if not future.state.is_completed():
                failed += fail_weight(position[id(future)]) if fail_weight else 1
                logger.error("%s task failed after retries: %s", what, future.state.message)
                continue
            bar.advance(commit(future.result()))
    return failed


class CommitBuffer:
    """Groups results into fewer, larger commits: ``flush`` hands what it holds to ``commit``
    once it holds ``size`` results or its oldest waited ``seconds`` (and at the end), so a
    catalogue of thousands of shards makes tens of table versions per run, not thousands, and
    a crash loses at most ``seconds`` of finished work.
    """

    def __init__(self, commit: Callable[[list[Any]], None], *, size: int = 16,
                 seconds: float = 30.0) -> None:
        self.commit, self.size, self.seconds = commit, size, seconds
        self._held: list[Any] = []
        self._since = 0.0

    def add(self, results: Iterable[Any]) -> None:
        """Hold ``results``; commit if the buffer is full or old enough."""
        if not self._held:
            self._since = time.monotonic()
        self._held.extend(results)
        if len(self._held) >= self.size or time.monotonic() - self._since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Commit whatever is held."""
        if self._held:
            held, self._held = self._held, []
            self.commit(held)
