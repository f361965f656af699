"""The local stack: real Prefect, MLflow and Dask servers on 127.0.0.1, started and stopped.

``mtag stack up`` starts, each in its own process session, with its log in the state folder:

* a Prefect server (``prefect server start``, its own ``PREFECT_HOME`` in the state folder),
* an MLflow tracking server (SQLite backend, or ``--mlflow-backend-uri`` e.g. PostgreSQL;
  artifacts proxied from ``STORE/mlflow/artifacts``; job execution off, one worker),
* a Dask scheduler (dashboard on loopback) and N worker processes of one thread each, with the
  workers' environment (:data:`flows.cluster.WORKER_ENV`) and the servers' URLs, so task runs
  report to this Prefect server,
* optionally the scheduled deployments served from a process (``--schedules``).

It waits until each answers (HTTP health, or the scheduler reporting its workers), then writes
``stack.json`` (PIDs, ports, URLs, the environment to use it) into the state folder:
``STORE/_stack`` for a local store, ``~/.mtag/stacks/<name>`` for an object-store one.
``status`` checks each process and endpoint; ``down`` stops each by its process group
(SIGTERM, then SIGKILL after a grace period), deployments and workers before the servers.
Every port binds to 127.0.0.1 only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore.store import MLFLOW_DIR, mlflow_db_path
from flows.cluster import WORKER_ENV, free_port
from flows.settings import SettingsError, redact

HOST = "127.0.0.1"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "dask": 8786, "dashboard": 8787}
START_ORDER = ("prefect", "mlflow", "dask-scheduler", "dask-workers", "schedules")


@dataclass
class Service:
    """One process of the stack."""

    name: str
    pid: int
    command: list[str]
    log: str
    url: str | None = None
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def state_dir(store: str) -> Path:
    """Where the stack of ``store`` keeps ``stack.json`` and its logs."""
    if "://" in store and not store.startswith("file://"):
        import hashlib

        digest = hashlib.blake2b(store.encode(), digest_size=5).hexdigest()
        return Path.home() / ".mtag" / "stacks" / digest
    return Path(store.removeprefix("file://")).resolve() / "_stack"


def _bin(name: str) -> str:
    """A console script of this environment (prefect, mlflow, dask)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


def _wait(what: str, check: Any, pid: int, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not _alive(pid):
            raise SettingsError(f"{what} exited while starting; see {log}:\n{_tail(log)}")
        time.sleep(0.5)
    raise SettingsError(f"{what} did not become healthy in {timeout:.0f} s; see {log}:\n"
                        f"{_tail(log)}")


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def _spawn(name: str, command: list[str], env: dict[str, str], logs: Path) -> Service:
    log = str(logs / f"{name}.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Service(name, proc.pid, command, log)


def up(store: str, *, workers: int = 2, ports: dict[str, int] | None = None,
       mlflow_backend_uri: str | None = None, schedules: bool = False,
       timeout: float = 180.0) -> dict[str, Any]:
    """Start the stack for ``store``; return its record (also written to ``stack.json``).

    Raises
    ------
    SettingsError
        If a stack for this store is already running, or a service does not come up (the
        ones already started are stopped again).
    """
    folder = state_dir(store)
    current = read(store)
    if current and any(_alive(s["pid"]) for s in current["services"].values()):
        raise SettingsError(f"a stack for {store} is already running (`mtag stack status`)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    chosen = {k: free_port((ports or {}).get(k, DEFAULT_PORTS[k])) for k in DEFAULT_PORTS}
    record: dict[str, Any] = {"store": store, "state_dir": str(folder), "services": {},
                              "started_at": dt.datetime.now(dt.UTC).isoformat()}
    try:
        _start(record, store, folder, chosen, workers, mlflow_backend_uri, schedules, timeout)
    except BaseException:
        down(store, record=record)
        raise
    return record


def _start(record: dict[str, Any], store: str, folder: Path, ports: dict[str, int],
           workers: int, mlflow_backend_uri: str | None, schedules: bool,
           timeout: float) -> None:
    logs = folder / "logs"
    base = os.environ.copy()
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MTAG_DASK_ADDRESS"):
        base.pop(key, None)  # this stack's own servers, never an outer configuration
    base |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
             "MLFLOW_DISABLE_TELEMETRY": "true"}

    def add(service: Service) -> Service:
        record["services"][service.name] = service.__dict__
        write(store, record)
        return service

    # Prefect server
    prefect_url = f"http://{HOST}:{ports['prefect']}/api"
    env = base | {"PREFECT_HOME": str(folder / "prefect-home")}
    svc = add(_spawn("prefect", [_bin("prefect"), "server", "start", "--host", HOST, "--port",
                                 str(ports["prefect"])], env, logs))
    svc.url, svc.port = prefect_url, ports["prefect"]
    _wait("Prefect server", lambda: _http_ok(f"{prefect_url}/health"), svc.pid, svc.log,
          timeout)
    add(svc)

    # MLflow tracking server
    local = "://" not in store or store.startswith("file://")
    root = Path(store.removeprefix("file://")).resolve() if local else None
    if mlflow_backend_uri is None:
        db = Path(mlflow_db_path(str(root))) if root else (folder / "mlflow.db")
        db.parent.mkdir(parents=True, exist_ok=True)
        mlflow_backend_uri = f"sqlite:///{db}"
    artifacts = str(root / MLFLOW_DIR / "artifacts") if root else \
        f"{store}/{MLFLOW_DIR}/artifacts"
    mlflow_url = f"http://{HOST}:{ports['mlflow']}"
    env = base | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    svc = add(_spawn("mlflow", [_bin("mlflow"), "server", "--backend-store-uri",
                                mlflow_backend_uri, "--artifacts-destination", artifacts,
                                "--host", HOST, "--port", str(ports["mlflow"]), "--workers",
                                "1"], env, logs))
    svc.url, svc.port = mlflow_url, ports["mlflow"]
    svc.extra = {"backend": redact(mlflow_backend_uri), "artifacts": artifacts}
    svc.command = [redact(c) for c in svc.command]
    _wait("MLflow server", lambda: _http_ok(f"{mlflow_url}/health"), svc.pid, svc.log, timeout)
    add(svc)

    # Dask scheduler and workers
    address = f"tcp://{HOST}:{ports['dask']}"
    dashboard = f"http://{HOST}:{ports['dashboard']}/status"
    svc = add(_spawn("dask-scheduler", [_bin("dask"), "scheduler", "--host", HOST, "--port",
                                        str(ports["dask"]), "--dashboard-address",
                                        f"{HOST}:{ports['dashboard']}"], base, logs))
    svc.url, svc.port, svc.extra = address, ports["dask"], {"dashboard": dashboard}
    _wait("Dask scheduler", lambda: _http_ok(f"http://{HOST}:{ports['dashboard']}/health"),
          svc.pid, svc.log, timeout)
    add(svc)
    env = base | WORKER_ENV | {"PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url}
    svc = add(_spawn("dask-workers", [_bin("dask"), "worker", address, "--nworkers",
                                      str(workers), "--nthreads", "1", "--host", HOST,
                                      # without it each spawned worker's HTTP routes listen
                                      # on 0.0.0.0, even with --no-dashboard
                                      "--dashboard-address", f"{HOST}:0",
                                      "--no-dashboard", "--memory-limit", "auto"], env, logs))
    svc.extra = {"workers": workers}
    _wait(f"{workers} Dask workers", lambda: _count_workers(address) >= workers, svc.pid,
          svc.log, timeout)
    add(svc)
    record["env"] = {"PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url,
                     "MTAG_DASK_ADDRESS": address, "MTAG_STORE": store}

    if schedules:
        env = base | record["env"]
        svc = add(_spawn("schedules", [sys.executable, "-m", "infra.deployments", "--serve"],
                         env, logs))
        time.sleep(2.0)
        if not _alive(svc.pid):
            raise SettingsError(f"serving the deployments failed; see {svc.log}:\n"
                                f"{_tail(svc.log)}")
    write(store, record)


def _count_workers(address: str) -> int:
    from distributed import Client

    try:
        with Client(address, timeout="3s") as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])
    except OSError:
        return 0


def write(store: str, record: dict[str, Any]) -> None:
    """Write ``stack.json`` (atomically)."""
    target = state_dir(store) / "stack.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(target)


def read(store: str) -> dict[str, Any] | None:
    """The recorded stack of ``store``, or None."""
    target = state_dir(store) / "stack.json"
    return json.loads(target.read_text()) if target.exists() else None


def status(store: str) -> list[dict[str, Any]]:
    """Each recorded service: whether its process lives and its endpoint answers."""
    record = read(store)
    if not record:
        return []
    rows = []
    for name in START_ORDER:
        svc = record["services"].get(name)
        if not svc:
            continue
        alive = _alive(svc["pid"])
        url = svc.get("url")
        if name == "prefect" and url:
            healthy = alive and _http_ok(f"{url}/health")
        elif name == "mlflow" and url:
            healthy = alive and _http_ok(f"{url}/health")
        elif name == "dask-scheduler":
            healthy = alive and _http_ok(svc["extra"]["dashboard"].replace("/status", "/health"))
        elif name == "dask-workers":
            healthy = alive and _count_workers(record["services"]["dask-scheduler"]["url"]) > 0
        else:
            healthy = alive
        rows.append({"service": name, "pid": svc["pid"], "running": alive,
                     "healthy": healthy, "url": url or "",
                     "ui": _ui(name, svc), "log": svc["log"]})
    return rows


def _ui(name: str, svc: dict[str, Any]) -> str:
    if name == "prefect" and svc.get("url"):
        return str(svc["url"]).removesuffix("/api")
    if name == "mlflow":
        return str(svc.get("url") or "")
    if name == "dask-scheduler":
        return str(svc["extra"].get("dashboard", ""))
    return ""


def down(store: str, *, record: dict[str, Any] | None = None, grace: float = 15.0
         ) -> list[str]:
    """Stop every service of the stack by its process group; return the names stopped."""
    record = record or read(store)
    if not record:
        return []
    stopped = []
    for name in reversed(START_ORDER):
        svc = record["services"].get(name)
        if svc and _stop(int(svc["pid"]), grace):
            stopped.append(name)
    record["stopped_at"] = dt.datetime.now(dt.UTC).isoformat()
    for svc in record["services"].values():
        svc["stopped"] = True
    if state_dir(store).exists():
        write(store, record)
    return stopped


def _stop(pid: int, grace: float) -> bool:
    """SIGTERM the process group, SIGKILL it if still there after ``grace`` seconds."""
    if not _alive(pid):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not _alive(pid):
                return True
            time.sleep(0.2)
    return not _alive(pid)


def _reap(pid: int) -> None:
    """Collect an exited child of this process (a zombie still counts as alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def env_lines(store: str) -> str:
    """``export`` lines that point the ``mtag`` command (and Prefect, MLflow) at the stack."""
    record = read(store)
    if not record or "env" not in record:
        raise SettingsError(f"no stack is recorded for {store} (`mtag stack up` first)")
    return "\n".join(f"export {k}={v}" for k, v in record["env"].items())
