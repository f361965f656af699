"""What an ``mtag`` process pays to start and to stop, cut where it was measured.

**Garbage collection during imports.** The stack (Prefect, Dask, pandas, pyarrow, the feature
code) builds a few hundred thousand long-lived objects while it imports, and CPython's collector
traverses all of them again each time the heap grows by a quarter: 1.8 of the 4.5 CPU-seconds
the temporary Prefect API takes to import and build its app, about a third of every process's
import time. Each process collects rarely (or not at all, where only imports run) until its
stack is imported, then *freezes* what exists (modules, classes, functions: never garbage) out of
every later collection, which then only looks at what the work creates.

**Interpreter tear-down.** After the last line of output, a whole-stack process spends about
1.2 s in the collector and in module tear-down before it exits; the command's caller waits for
that. :func:`exit_now` ends the process once everything registered to run at exit has run.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading

DEFAULT_THRESHOLDS = gc.get_threshold()
"""The interpreter's collection thresholds, restored once the stack is imported."""
STARTUP_THRESHOLDS = (100_000, 50, 100)
"""While a command imports (lazily, command by command): a young collection every 100,000
allocations instead of 700, a full one far more rarely; cycles are still collected."""


_starting = False


def starting() -> None:
    """Collect rarely until :func:`started` (the ``mtag`` command calls this first)."""
    global _starting
    gc.set_threshold(*STARTUP_THRESHOLDS)
    _starting = True


def started() -> None:
    """The stack is imported: freeze what exists out of later collections; collect as usual.

    Only after :func:`starting` (a process that calls :func:`flows.cli.main` itself, a test
    session say, keeps its own collector as it is: freezing would keep its garbage forever).
    """
    global _starting
    if _starting:
        _freeze()
        gc.set_threshold(*DEFAULT_THRESHOLDS)
        _starting = False


def pause_collection() -> None:
    """For a process that only imports until :func:`resume_collection` (a fork server, the
    Prefect API server's start).
    """
    gc.disable()


def resume_collection() -> None:
    """Freeze what the imports made and collect as usual from here (before forking, this also
    keeps the children from touching, and so copying, the parent's pages).
    """
    _freeze()
    gc.enable()


def boot_early(preload: tuple[str, ...] | list[str], *, local_cluster: bool) -> None:
    """Begin booting the temporary Prefect API and the local workers' fork server now, for a
    command that knows it has work before it imports its flow's stack.

    Otherwise they began only after the command had imported Prefect (1.5 s on a busy core)
    while one core ran only the command (its imports and a head start share one
    interpreter). Prefect's settings are not imported for this where the environment and
    files show that no API is configured (:func:`flows.prefect_api.boot_in_background`); the
    API's URL is exported before the fork server starts, as the workers read it from the
    environment the fork server was started with.
    """
    from flows.cluster import start_fork_server
    from flows.prefect_api import boot_in_background

    boot_in_background()
    if local_cluster:
        start_fork_server(tuple(preload))


def _freeze() -> None:
    """``gc.freeze()``, undone at exit: an interpreter that exits normally (a worker, the API
    server) then collects everything at its end as before, and native extensions do not
    report the frozen objects they own as leaked (duckdb's nanobind types did, on stderr).
    """
    gc.freeze()
    atexit.register(gc.unfreeze)


def exit_now(code: int) -> None:
    """End the process with ``code`` after what an orderly exit runs, without tear-down.

    Runs what the interpreter runs at exit, in its order: threading's exit callbacks and the
    join of non-daemon threads, then the exit handlers (Prefect's, multiprocessing's, the
    temporary API's stop, temporary folders' clean-up), then
    flushes the standard streams and exits; the collector's last pass and the modules'
    tear-down free only memory the operating system takes back anyway.
    """
    # the interpreter's own order: threading's exit callbacks (Prefect drains its log and
    # event workers there, while the temporary API still answers) and the join of
    # non-daemon threads, then the atexit handlers (the API's stop among them)
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a pipe whose reader went away: as Python exits then
            code = code or 120
    os._exit(code)
