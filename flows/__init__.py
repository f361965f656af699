"""Orchestration: Prefect flows and tasks, Dask cluster selection, the ``mtag`` command line.

The only package with ``@flow``/``@task``, retries and task runners. It wires the pure work in
:mod:`tasks` to the storage in :mod:`featurestore`; it holds no numerical code.
"""
