"""One Prefect API for the flow process and its Dask workers.

With no ``PREFECT_API_URL`` configured, Prefect starts a temporary local API in every process
that runs a flow or task, so each Dask worker process would start (and later stop) its own
server on the same SQLite file. :func:`prefect_api` reserves one temporary API for the flow
process and exports its URL, so workers spawned afterwards report to it. The server is started
by :meth:`PrefectApi.start` (so a caller can spawn and warm its workers while it boots) and
lives until the process exits, so later flows in the same process reuse it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from typing import Any

_server: Any = None
_started = False


class PrefectApi:
    """The API runs report to: a configured server, or the process's temporary one."""

    def __init__(self, url: str, server: Any, timeout: int) -> None:
        self.url, self._server, self._timeout = url, server, timeout

    def start(self) -> str:
        """Make sure the API answers (starts the temporary server once); return its URL."""
        global _started
        if self._server is not None and not _started:
            self._server.start(timeout=self._timeout)
            atexit.register(self._server.stop)
            _started = True
        return self.url


@contextlib.contextmanager
def prefect_api(timeout: int = 120, *, start: bool = True) -> Iterator[PrefectApi]:
    """Yield the API for this process's runs, reserving a temporary local one if none is set.

    With ``start=False`` the temporary server's port is reserved and exported but the server
    is started only by :meth:`PrefectApi.start`.
    """
    global _server
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        os.environ.setdefault("PREFECT_API_URL", str(configured))
        yield PrefectApi(str(configured), None, timeout)
        return
    if _server is None:
        from prefect.server.api.server import SubprocessASGIServer

        probe = SubprocessASGIServer()  # the default instance only finds a free port here
        _server = SubprocessASGIServer(port=probe.find_available_port())
    api = PrefectApi(str(_server.api_url), _server, timeout)
    os.environ["PREFECT_API_URL"] = api.url
    with temporary_settings({PREFECT_API_URL: api.url}):
        if start:
            api.start()
        yield api
