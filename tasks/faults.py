"""Fail points: named places where a test or the soak script kills the process on purpose.

``MTAG_FAILPOINTS`` lists the names to fire (comma-separated); a named point that is reached
kills its own process with SIGKILL, as a power cut or the OOM killer would, so what is left on
disk is what a real crash leaves. With ``MTAG_FAILPOINT_ONCE`` set to a file path, a point
fires only if it can create that file first (once across every process of a run: a Dask
worker restarted by its nanny does not die again). Unset, :func:`failpoint` costs one dict
lookup. Names in use are listed in :data:`FAILPOINTS`.
"""

from __future__ import annotations

import os
import signal

FAILPOINTS = {
    "commit.first": "after a commit group's intent record, before its first transaction",
    "commit.between": "between the two transactions of a commit group",
    "commit.last": "after a commit group's second transaction, before its intent is removed",
    "retire.between": "between the tables a retirement deletes from",
    "ingest.probed": "after the probe results are recorded, before any shard is extracted",
    "worker.track": "in a Dask worker, after the first track of a shard",
}


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if ``name`` is listed in ``MTAG_FAILPOINTS``."""
    listed = os.environ.get("MTAG_FAILPOINTS")
    if not listed or name not in listed.split(","):
        return
    once = os.environ.get("MTAG_FAILPOINT_ONCE")
    if once:
        try:
            os.close(os.open(f"{once}.{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
