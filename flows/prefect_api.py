"""One Prefect API for the flow process and its Dask workers.

With no ``PREFECT_API_URL`` configured, Prefect starts a temporary local API in every process
that runs a flow or task, so each Dask worker process would start (and later stop) its own
server on the same SQLite file. :func:`prefect_api` starts one temporary API in the flow
process and exports its URL, so workers spawned afterwards report to it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def prefect_api(timeout: int = 120) -> Iterator[str]:
    """Yield the API URL runs report to, starting a temporary local API if none is set."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        os.environ.setdefault("PREFECT_API_URL", str(configured))
        yield str(configured)
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=timeout)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
