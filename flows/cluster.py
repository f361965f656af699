"""Dask cluster selection: an existing scheduler by address, or a LocalCluster on this machine."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mtag")

Echo = Callable[[str], None] | None
"""Where a one-line human message goes (the CLI passes ``print``; None: the log only)."""

WORKER_ENV = {
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap
    # threshold at 128 KiB: every multi-MB STFT temporary is then mmap'ed, zero-faulted and
    # unmapped again, chunk after chunk (measured: 1.7-2x slower feature extraction). Large
    # thresholds let the allocator reuse those blocks; memory stays bounded by one chunk.
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
}
"""Environment for worker processes; give workers of an external cluster the same."""


@dataclass(frozen=True)
class ClusterInfo:
    """Where the cluster is, how much it can run at once, and a client connected to it."""

    address: str
    dashboard: str | None
    workers: int
    threads: int
    client: Any = None

    def warm(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(*args)`` once on every worker, in its task slot, without waiting.

        Used to pay imports and filter-bank set-up while the flow is still starting.
        """
        futures = []
        for address in self.client.scheduler_info(n_workers=-1)["workers"]:
            futures.append(self.client.submit(fn, *args, workers=[address], pure=False,
                                              allow_other_workers=False))
        return futures


def default_workers() -> int:
    """Worker processes for a local cluster: one per core, at least one."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


WORKER_PRELOAD = ("prefect.task_engine",)
"""Modules every local worker process has imported before it takes a task."""


def fork_workers(preload: Sequence[str]) -> None:
    """Start local worker processes by forking one process that imported ``preload`` once.

    Spawned workers each import Python, Dask, Prefect's task engine and the feature or model
    stack again: 4-6 CPU-seconds per worker before its first task, paid W times by every
    command. Dask's ``forkserver`` method forks each worker from one server process that
    imported them (first use in this process; later clusters reuse it, with whatever it
    preloaded first). Fork happens in that single-threaded server, never in this
    multi-threaded process. Its environment is this process's at its start, so the worker
    environment (:data:`WORKER_ENV`) is set here first.
    """
    import dask
    from distributed.utils import get_mp_context

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    import multiprocessing.forkserver

    ctx = get_mp_context()  # sets Dask's own preload list (its dependencies), once
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or [])
    ours = [m for m in (*WORKER_PRELOAD, *preload) if m not in current]
    if ours or current[:1] != [_PRELOAD_BEGIN]:  # takes effect if the server has not started
        middle = [m for m in (*current, *ours) if m not in (_PRELOAD_BEGIN, _PRELOAD_END)]
        ctx.set_forkserver_preload([_PRELOAD_BEGIN, *middle, _PRELOAD_END])


def worker_environ() -> dict[str, str]:
    """What a local worker's environment gets at its start: Dask's pre-spawn environment
    (one BLAS/OpenMP thread) with :data:`WORKER_ENV` over it.
    """
    import dask
    import distributed  # noqa: F401  (its import registers those defaults in dask.config)

    spawn = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {str(k): str(v) for k, v in dict(spawn).items()} | WORKER_ENV


def start_fork_server(preload: Sequence[str]) -> None:
    """Start the fork server of :func:`fork_workers` now: it imports ``preload`` (2-3
    CPU-seconds) while this process goes on, and the next local cluster forks its workers
    from it at once. Call it only once this process's environment is the workers' (the Prefect
    API's URL exported: what the preload imports reads it then).

    A worker forked from it has the environment the server started with. A cluster that
    starts the server itself does so while its nanny has set Dask's pre-spawn environment
    (one BLAS/OpenMP thread per worker, :data:`WORKER_ENV`) in this process; started here, the
    server gets the same for the time of its start (without it, each worker's OpenBLAS ran a
    pool of threads spinning on the busy cores: 40 CPU-s per worker instead of 16).
    """
    import multiprocessing.forkserver

    fork_workers(preload)
    env = worker_environ()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_PRELOAD_BEGIN, _PRELOAD_END = "flows._preload_begin", "flows._preload_end"
"""First and last of the fork server's imports: no garbage collection in between, then what
they made is frozen (:mod:`flows.startup`), in the server and in every worker it forks."""


@contextlib.contextmanager
def dask_cluster(address: str | None = None, *, n_workers: int | None = None,
                 memory_limit: str = "auto", echo: Echo = None,
                 preload: Sequence[str] = ()) -> Iterator[ClusterInfo]:
    """Yield a running Dask cluster.

    Parameters
    ----------
    address : str, optional
        ``tcp://HOST:PORT`` of an existing scheduler; by default a ``LocalCluster`` of worker
        processes (one thread each) bound to 127.0.0.1 is started and stopped around the block.
    n_workers : int, optional
        Local worker processes (default: one per core).
    memory_limit : str
        Per-worker memory limit of a local cluster.
    preload : sequence of str
        Modules local workers import before their first task (see :func:`fork_workers`).
    echo : callable, optional
        Receives the line saying where the scheduler and its dashboard are.
    """
    from distributed import Client, LocalCluster

    if address:
        with Client(address, timeout="30s") as client:
            info = _info(client, address)
            _say(echo, f"Dask: scheduler {address}, {info.workers} workers; "
                       f"dashboard {info.dashboard}")
            yield info
        return
    import dask

    fork_workers(preload)
    environ: dict[str, Any] = {"distributed.nanny.pre-spawn-environ": worker_environ()}
    # Prefect's task engine imported before the worker takes tasks: imported by the first task
    # while a warm-up task imports it too, two threads raced on the module lock ("Failed to
    # initialize plugins: deadlock detected")
    environ["distributed.worker.preload"] = ["prefect.task_engine"]
    with dask.config.set(environ), LocalCluster(
        n_workers=n_workers or default_workers(), threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address="127.0.0.1:0", memory_limit=memory_limit,
        # forked workers inherit the fork server's environment, which is this process's as it
        # was when the first cluster started: each worker takes today's as it starts (what
        # matters at import time, thread counts and allocator settings, is set before that)
        env=dict(os.environ),
    ) as cluster, Client(cluster) as client:
        info = _info(client, cluster.scheduler_address)
        _say(echo, f"Dask: local cluster, {info.workers} worker processes; "
                   f"dashboard {info.dashboard}")
        yield info


def _say(echo: Echo, line: str) -> None:
    if echo:
        echo(line)
    else:
        log.info(line)


def _info(client: object, address: str) -> ClusterInfo:
    workers = client.scheduler_info(n_workers=-1)["workers"]  # type: ignore[attr-defined]
    threads = sum(w.get("nthreads", 1) for w in workers.values())
    return ClusterInfo(address, getattr(client, "dashboard_link", None), len(workers), threads,
                       client)


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` if nothing listens there on ``host``, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {host}")  # pragma: no cover
