"""Environment defaults applied before Prefect, Dask or MLflow are imported.

Embedded by default: with no configuration Prefect runs its temporary local API, Dask a
``LocalCluster`` and MLflow a SQLite store. Values already set in the environment win.
"""

from __future__ import annotations

import os

EMBEDDED_DEFAULTS = {
    # the ephemeral API's first database set-up can take ~30 s on a fresh PREFECT_HOME
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # analytics on the ephemeral API logged "database is locked" with several workers
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # (Dask's nanny already gives worker processes OMP/MKL/OPENBLAS_NUM_THREADS=1; the flow
    # process keeps every core for training)
}

QUIET_DEFAULTS = {
    # the command line shows a progress bar and a summary; -v brings the logs back
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
}


def apply_defaults(env: dict[str, str] | None = None, *, quiet: bool = False) -> None:
    """Set each embedded default (and with ``quiet`` the log levels) not already set."""
    target = os.environ if env is None else env
    for key, value in (EMBEDDED_DEFAULTS | (QUIET_DEFAULTS if quiet else {})).items():
        target.setdefault(key, value)
