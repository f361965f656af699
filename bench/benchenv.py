"""Shared by the benchmarks: where one ran (machine, packages, code) and where it writes.

The scripts are run as ``python bench/X.py``, so this folder is first on ``sys.path`` and each
imports this module by its bare name, first: importing it puts the repository root on
``sys.path`` (for ``flows``, ``tasks`` and the rest without an installed package) and loads
nothing heavy, so a script can still set its environment (:func:`apply_cli_defaults`) before
numpy, Prefect or Dask are imported.

:func:`environment` is the ``machine`` record of every results file; its parts
(:func:`cpus`, :func:`git_state`, :func:`versions`...) are usable on their own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

#: the thread-count variables of the BLAS/OpenMP pools, recorded as they were set
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: the code whose uncommitted diff :func:`git_state` hashes unless told otherwise
PIPELINE_CODE = ("flows", "tasks", "featurestore")


# ----------------------------------------------------------------------------------------
# set-up
def apply_cli_defaults(*, prefect_home: bool = True) -> None:
    """The ``mtag`` command line's environment defaults, quiet logs; before heavy imports.

    With ``prefect_home`` (unless ``PREFECT_HOME`` is already set) Prefect's home is
    ``bench/results/prefect-home``, so that concurrent work using ``~/.prefect`` does not
    share its SQLite database.
    """
    from flows.settings import apply_defaults

    apply_defaults(quiet=True)
    if prefect_home:
        os.environ.setdefault("PREFECT_HOME", os.path.join(RESULTS, "prefect-home"))
        os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)


# ----------------------------------------------------------------------------------------
# the environment
def environment(packages: Iterable[str] = ("mtag", "numpy"), *,
                code_paths: Iterable[str] = PIPELINE_CODE,
                threadpools: bool = False) -> dict[str, Any]:
    """Cores, CPU model, memory, load, package versions, git state and thread variables.

    ``packages`` are the distributions whose versions are recorded (plus Python, and
    libsndfile when ``soundfile`` is one of them); ``code_paths`` go to :func:`git_state`;
    ``threadpools`` adds the loaded BLAS/OpenMP pools (:func:`threadpool_info`).
    """
    out: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_affinity(),
        "cpu_model": cpu_model(),
        "mem_total_mb": mem_total_mb(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "versions": versions(packages),
    }
    if threadpools:
        out["threadpools"] = threadpool_info()
    out["git"] = git_state(code_paths)
    out["env_threads"] = {k: os.environ.get(k) for k in THREAD_ENV}
    return out


def cpu_affinity() -> int | None:
    """How many CPUs this process may run on; ``None`` where the OS cannot say."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def cpus() -> int:
    """How many CPUs this process may use: its affinity, else the machine's count."""
    return cpu_affinity() or os.cpu_count() or 1


def cpu_model() -> str | None:
    """The first ``model name`` of ``/proc/cpuinfo``, or ``None``."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def mem_total_mb() -> float | None:
    """``MemTotal`` of ``/proc/meminfo`` in MiB, or ``None``."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024.0
    return None


def versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` if absent), and Python's."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    if "soundfile" in out:
        with contextlib.suppress(Exception):  # informational only
            import soundfile as sf

            out["libsndfile"] = sf.__libsndfile_version__
    return out


def threadpool_info() -> list[dict[str, Any]] | None:
    """The BLAS/OpenMP pools loaded in this process (threadpoolctl), or ``None``."""
    with contextlib.suppress(Exception):
        from threadpoolctl import threadpool_info as info

        return [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
                for i in info()]
    return None


def git(*args: str) -> str:
    """``git ARGS`` in the repository: its stripped output ("" if git fails)."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def git_state(code_paths: Iterable[str] = PIPELINE_CODE) -> dict[str, Any]:
    """Commit, its subject, whether tracked files differ from it (and which), and a short
    hash of the uncommitted diff of ``code_paths`` (``None`` when they have none)."""
    diff = git("diff", "HEAD", "--", *code_paths)
    return {"commit": git("rev-parse", "HEAD"),
            "subject": git("log", "-1", "--format=%s"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "dirty_files": git("diff", "HEAD", "--name-only").split(),
            "code_diff_hash": hashlib.blake2b(diff.encode(), digest_size=6).hexdigest()
            if diff else None}


def untracked(path: str) -> bool:
    """Whether git does not track ``path`` (and does not ignore it)."""
    return git("status", "--porcelain", "--", path).startswith("??")


def git_line(g: dict[str, Any]) -> str:
    """``code: <commit>`` and, if dirty, the changed files and the code diff's hash."""
    return f"code: {g['commit'][:7]}" + (
        f" + uncommitted changes ({', '.join(g['dirty_files'])}; diff {g['code_diff_hash']})"
        if g["dirty"] else "")


def now() -> str:
    """Local time to the second, ISO 8601 (the ``started``/``finished`` stamps)."""
    return dt.datetime.now().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------
# results files
def result_path(name: str, ext: str = ".json") -> str:
    """``bench/results/<name>-<YYYYmmdd-HHMMSS><ext>`` (the folder is created)."""
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}{ext}")


def write_json(data: dict[str, Any], name: str, out: str | None = None) -> str:
    """Write ``data`` to ``out`` or :func:`result_path` ``(name)``; return the path.

    Written to ``<path>.tmp`` and renamed, so a run killed while writing keeps the last
    complete file; numpy scalars and arrays become numbers and lists, anything else a string.
    """
    path = out or result_path(name)
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)
    return path


def _json_default(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
