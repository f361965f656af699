"""Object stores: DuckDB reads ``s3://`` (or any fsspec) files through the store's filesystem.

DuckDB's own ``httpfs`` extension would have to be downloaded at run time; instead the
store's fsspec filesystem (s3fs, configured from the environment: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``... never from arguments) is registered with the connection, so views
over an object store read the same committed files as local ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

    from featurestore.store import FeatureStore


def configure_duckdb(con: duckdb.DuckDBPyConnection, store: FeatureStore) -> None:
    """Let a new connection ``con`` read the store's URLs through the store's filesystem."""
    con.register_filesystem(store.fs)
