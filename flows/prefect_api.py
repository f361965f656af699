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
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from flows import prefect_db
from flows.cluster import free_port

log = logging.getLogger("mtag")

_MIGRATE_SETTINGS = ("PREFECT_API_DATABASE_MIGRATE_ON_START",
                     "PREFECT_SERVER_DATABASE_MIGRATE_ON_START")

_server: Any = None
_early: PrefectApi | None = None  # booting since boot_in_background(), for prefect_api()
_started = False
_lock = threading.Lock()


class PrefectApi:
    """The API runs report to: a configured server, or the process's temporary one."""

    def __init__(self, url: str, server: Any, timeout: int) -> None:
        self.url, self._server, self._timeout = url, server, timeout
        self._thread: threading.Thread | None = None
        self._booted = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> str:
        """Make sure the API answers (starts the temporary server once); return its URL."""
        if self._thread is not None:
            self._booted.wait()  # the thread itself lives on (see start_in_background)
            self._thread = None
            if self._error is not None:
                raise self._error
        self._boot()
        return self.url

    def _boot(self) -> None:
        global _started
        with _lock:
            if self._server is not None and not _started:
                self._server.start(timeout=self._timeout)
                atexit.register(self._server.stop)
                _started = True

    def start_in_background(self) -> None:
        """Begin starting the temporary server in a thread; :meth:`start` waits for it."""
        if self._server is None or _started or self._thread is not None:
            return

        def run() -> None:
            try:
                self._boot()
            except BaseException as exc:  # re-raised by start() in the caller's thread
                self._error = exc
                return
            finally:
                self._booted.set()
            # the parent-death signal is bound to the thread that started the server: this
            # (daemon) thread lives as long as the process
            threading.Event().wait()

        self._thread = threading.Thread(target=run, name="prefect-api-start", daemon=True)
        self._thread.start()


class _LazyServer:
    """A temporary Prefect API server on a port chosen here, whose process dies with this one
    (Linux: the parent-death signal), so a ``kill -9`` of the command leaves no server behind.

    The server is Prefect 3.8's own ASGI app under uvicorn, started with the command and
    environment Prefect's ``SubprocessASGIServer`` uses; it is spawned here rather than through
    that class so that this process never imports ``prefect.server`` (about 6 CPU-seconds that
    only the server process needs), and it is stopped without waiting for its shut-down (the
    command's results are committed by then; the server exits on its own).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.api_url = f"http://127.0.0.1:{port}/api"
        self._process: subprocess.Popen[Any] | None = None
        self.log_path = ""

    def start(self, timeout: int) -> None:
        import importlib.util

        log.info("starting a temporary Prefect API on %s", self.api_url)
        # Prefect's settings are imported only where the caller has imported them already
        # (boot_in_background spawns the server before the command's Prefect import): the
        # server then reads the same environment and files itself
        extra: dict[str, str] = {}
        home = _prefect_home()
        if "prefect.settings" in sys.modules:
            from prefect.settings import get_current_settings

            extra = get_current_settings().to_environment_variables(exclude_unset=True)
            home = str(get_current_settings().home)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", **extra}
        # the migration check is skipped where this release left the default database at its
        # schema (flows/prefect_db.py); a setting of the user's, or another database, decides
        migrate = any(k in env for k in (*prefect_db.URL_SETTINGS, *_MIGRATE_SETTINGS)) \
            or not prefect_db.at_schema(home)
        if not migrate:
            env["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
        spec = importlib.util.find_spec("prefect")  # .../site-packages/prefect/__init__.py
        if spec is None or spec.origin is None:
            raise RuntimeError("Prefect is not installed")
        app_dir = os.path.dirname(os.path.dirname(spec.origin))
        uvicorn = ["--app-dir", app_dir, "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        # its output goes to a log of its own, not to the command's: a pipe reading the
        # command (`mtag ingest | tee`) would otherwise stay open while the server shuts down
        os.makedirs(home, exist_ok=True)
        self.log_path = os.path.join(home, "mtag-temporary-api.log")
        with open(self.log_path, "ab") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SERVER, str(os.getpid()), *uvicorn], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect API on port {self.port} exited "
                                       f"with code {self._process.returncode} while starting; "
                                       f"its log ends:\n{_tail(self.log_path)}")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        if migrate:
                            prefect_db.record(home)
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the temporary Prefect API on port {self.port} did not "
                                       f"answer within {timeout} s")
                time.sleep(0.05)

    def stop(self) -> None:
        """Ask the server to exit (SIGTERM) and reap it if it already has; no waiting."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.2)


def loopback_ca_file() -> str | None:
    """A CA file of one certificate, for Prefect's clients of the temporary API.

    Every Prefect client builds an SSL context from ``PREFECT_API_SSL_CERT_FILE``, by default
    certifi's bundle of about 140 certificates: 30 ms each time, and Prefect builds clients
    for every task run (14 in each worker and 8 in the command for one ingest of
    philharmonia-dev: 1.8 CPU-seconds). The temporary API is plain HTTP on the loopback, so
    the file is never used to verify anything; one certificate (certifi's first, copied to
    the cache folder once) takes 0.6 ms. None if the cache cannot be written.
    """
    import ssl
    import tempfile

    from tasks.filterbanks import cache_dir

    path = cache_dir() / "loopback-ca.pem"
    try:
        if not path.is_file():
            import certifi

            with open(certifi.where()) as fh:
                bundle = fh.read()
            begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
            start = bundle.find(begin)
            stop = bundle.find(end, start)
            if start < 0 or stop < 0:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                             suffix=".tmp") as tmp:
                try:
                    tmp.write(bundle[start:stop + len(end)] + "\n")
                except OSError:  # a full disk, say: no half-written file left behind
                    os.unlink(tmp.name)
                    raise
            os.replace(tmp.name, path)
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError, ValueError) as exc:  # unwritable, torn: rebuilt next time
        log.debug("no one-certificate CA file for the temporary API (%s)", exc)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return str(path)


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


_SERVER = """
import ctypes, os, runpy, signal, sys
if sys.platform.startswith("linux"):  # SIGTERM when the parent dies
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):  # the parent died before that took effect
    sys.exit(0)
from flows.startup import pause_collection, resume_collection
pause_collection()  # no collection while the server's stack imports
import prefect.server.api.server
resume_collection()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""
"""The server's process, as ``python -c`` with the parent's PID and uvicorn's arguments: it dies
with the process that started it (a ``kill -9`` of the command leaves no server listening), and
imports Prefect's server without collecting garbage (1.8 of its 4.5 CPU-seconds of start-up),
then runs uvicorn as ``python -m uvicorn`` would."""


def _reserve(timeout: int) -> PrefectApi:
    """The temporary API: its port reserved and its URL (and CA file) exported on first use,
    so that processes started from here on report to it.
    """
    global _server
    if _early is not None:
        return _early
    if _server is None:  # the server module is imported (~3 s) by the thread that boots it
        _server = _LazyServer(free_port())
    os.environ["PREFECT_API_URL"] = _server.api_url
    ca_file = loopback_ca_file()  # plain HTTP on the loopback: whatever SSL_CERT_FILE says
    if ca_file:
        os.environ["PREFECT_API_SSL_CERT_FILE"] = ca_file
    return PrefectApi(_server.api_url, _server, timeout)


def boot_in_background(timeout: int = 120) -> bool:
    """Begin booting the temporary API now, unless an API is configured or one booted; the
    next :func:`prefect_api` of this process uses it. ``True`` if this call began a boot.

    For a command that knows it will run a flow well before it gets there (the ingest's
    head start): the server's 4-6 CPU-seconds of start-up then overlap the command's own
    imports. Its URL is exported at once, before any worker process is started.
    """
    global _early
    if _early is not None or _started:
        return False
    configured = _configured_without_settings()
    if configured is None:  # Prefect's settings say (1.4 s to import on a busy core)
        from prefect.settings import get_current_settings

        configured = bool(get_current_settings().api.url)
    if configured:
        return False
    api = _reserve(timeout)
    api.start_in_background()
    _early = api
    return True


def _prefect_home() -> str:
    """``PREFECT_HOME`` as the environment gives it, or Prefect's default."""
    return os.path.expanduser(os.environ.get("PREFECT_HOME") or "~/.prefect")


def _configured_without_settings() -> bool | None:
    """Whether a Prefect API is configured, where that is certain without importing Prefect's
    settings; ``None`` when only they can tell.

    Prefect 3 reads ``PREFECT_API_URL`` from the environment, the active profile
    (``profiles.toml`` in ``PREFECT_HOME``, or ``PREFECT_PROFILES_PATH``), and ``.env``,
    ``prefect.toml`` and ``pyproject.toml``'s ``[tool.prefect]`` in the working folder. Set in
    the environment: configured. None of those files saying anything of Prefect's: not
    configured. Otherwise: unsure.
    """
    if os.environ.get("PREFECT_API_URL"):
        return True
    if any(os.environ.get(k) for k in ("PREFECT_PROFILE", "PREFECT_PROFILES_PATH",
                                       "PREFECT_TEST_MODE")):
        return None
    if os.path.exists(os.path.join(_prefect_home(), "profiles.toml")) \
            or os.path.exists("prefect.toml"):
        return None
    for name, mark in ((".env", "PREFECT_"), ("pyproject.toml", "tool.prefect")):
        try:
            with open(name, errors="replace") as fh:
                if mark in fh.read():
                    return None
        except OSError:
            pass
    return False


@contextlib.contextmanager
def prefect_api(timeout: int = 120, *, start: bool = True) -> Iterator[PrefectApi]:
    """Yield the API for this process's runs, reserving a temporary local one if none is set.

    With ``start=False`` the temporary server's port is reserved and exported and the server
    boots in a background thread; :meth:`PrefectApi.start` waits until it answers.
    """
    from prefect.settings import (
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_URL,
        get_current_settings,
        temporary_settings,
    )

    configured = get_current_settings().api.url
    if configured:
        os.environ.setdefault("PREFECT_API_URL", str(configured))
        yield PrefectApi(str(configured), None, timeout)
        return
    api = _reserve(timeout)
    settings: dict[Any, Any] = {PREFECT_API_URL: api.url}
    if os.environ.get("PREFECT_API_SSL_CERT_FILE"):
        settings[PREFECT_API_SSL_CERT_FILE] = os.environ["PREFECT_API_SSL_CERT_FILE"]
    with temporary_settings(settings):
        if start:
            api.start()
        else:  # boots while the caller starts its cluster; api.start() waits for it
            api.start_in_background()
        yield api
