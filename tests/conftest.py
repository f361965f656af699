"""Shared fixtures: environment, a seeded RNG, audio factories, Prefect harness, Dask cluster.

Real components only: a ``distributed.LocalCluster`` with worker processes and Prefect's test
harness (a temporary local API). Test audio is generated here, never read from outside.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

# Environment first: Dask worker processes inherit it. A private PREFECT_HOME keeps tests off
# the user's ~/.prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="mtag-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, os.path.dirname(__file__))

from flows.settings import apply_defaults  # noqa: E402

apply_defaults()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261121)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_address(prefect_harness):
    """A real LocalCluster: 2 worker processes, one thread each, on 127.0.0.1.

    The workers inherit the harness's API URL, so their task runs land in the same database.
    """
    from distributed import Client, LocalCluster
    from prefect.settings import get_current_settings

    os.environ["PREFECT_API_URL"] = str(get_current_settings().api.url)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        yield cluster.scheduler_address
