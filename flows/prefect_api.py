"""One Prefect API for the flow process and its Dask workers.

With no ``PREFECT_API_URL`` configured, Prefect starts a temporary local API in every process
that runs a flow or task, so each Dask worker process would start (and later stop) its own
server on the same SQLite file. :func:`prefect_api` starts one temporary API in the flow
process, the first time it is needed, and exports its URL so workers spawned afterwards report
to it. The server lives until the process exits, so later flows in the same process (the demo
ingests, then trains) reuse it instead of reconnecting to a stopped one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from typing import Any

_server: Any = None


def _start(timeout: int) -> str:
    global _server
    if _server is None:
        from prefect.server.api.server import SubprocessASGIServer

        _server = SubprocessASGIServer()
        _server.start(timeout=timeout)
        atexit.register(_server.stop)
    return str(_server.api_url)


@contextlib.contextmanager
def prefect_api(timeout: int = 120) -> Iterator[str]:
    """Yield the API URL runs report to, starting a temporary local API if none is set."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        os.environ.setdefault("PREFECT_API_URL", str(configured))
        yield str(configured)
        return
    url = _start(timeout)
    os.environ["PREFECT_API_URL"] = url
    with temporary_settings({PREFECT_API_URL: url}):
        yield url
