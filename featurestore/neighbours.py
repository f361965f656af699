"""One all-pairs neighbours run's files: the embedding matrix and ids it searched, the HNSW
index, and its part files of the ``neighbours`` Delta table.

A run lives in ``neighbours/<model>/v<version>/runs/<run>/`` (see :mod:`featurestore.scores`)
and is invisible until :meth:`featurestore.scores.ScoreStore.commit_neighbours` makes it
current. Workers open the same run by its folder and write one part each.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore import tables
from featurestore.store import FeatureStore
from featurestore.tables import DataFile

NEIGHBOURS_ROW_GROUP = 262144
"""Rows per row group of ``neighbours``."""

NEIGHBOURS_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("neighbour_id", pa.string(), nullable=False),
    pa.field("similarity", pa.float32()),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("method", pa.string()),
])
"""Schema of ``neighbours``: ``k`` rows per track, rank 1 = most similar."""


class NeighbourRun:
    """The folder of one neighbours run.

    Parameters
    ----------
    store : FeatureStore
    directory : str
        The run's work files, from :meth:`featurestore.scores.ScoreStore.neighbours_run_dir`.
    table : str
        Folder of the version's ``neighbours`` Delta table, where the run's parts are written
        (uncommitted until the run is made current).
    """

    def __init__(self, store: FeatureStore, directory: str, table: str) -> None:
        self.store, self.directory, self.table = store, directory, table

    def write_inputs(self, track_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Store the ids and the ``(n, d)`` float32 embeddings every block searches."""
        fs = self.store.fs
        fs.makedirs(self.directory, exist_ok=True)
        with fs.open(f"{self.directory}/embeddings.npy", "wb") as fh:
            np.save(fh, np.ascontiguousarray(embeddings, dtype=np.float32))
        with fs.open(f"{self.directory}/ids.parquet", "wb") as fh:
            pq.write_table(pa.table({"track_id": pa.array(track_ids, pa.string())}), fh)

    def embeddings(self) -> np.ndarray:
        """The run's embedding matrix: memory-mapped on a local store, read whole otherwise.

        Returns
        -------
        np.ndarray [shape=(n, d), dtype=float32]
        """
        path = f"{self.directory}/embeddings.npy"
        if self.store.is_local:
            return np.asarray(np.load(path, mmap_mode="r"))
        with self.store.fs.open(path, "rb") as fh:
            return np.asarray(np.load(io.BytesIO(fh.read())))

    def track_ids(self) -> np.ndarray:
        """Track ids of the matrix rows (object array of str)."""
        with self.store.fs.open(f"{self.directory}/ids.parquet", "rb") as fh:
            return np.asarray(pq.read_table(fh)["track_id"].to_numpy(zero_copy_only=False))

    def write_index(self, backend: str, data: bytes) -> None:
        """Store a serialised ANN index built by ``backend``."""
        with self.store.fs.open(f"{self.directory}/index.{backend}", "wb") as fh:
            fh.write(data)

    def read_index(self, backend: str) -> bytes:
        """The serialised ANN index of ``backend``."""
        with self.store.fs.open(f"{self.directory}/index.{backend}", "rb") as fh:
            return bytes(fh.read())

    def write_part(self, start: int, track_ids: np.ndarray, ranks: np.ndarray,
                   neighbour_ids: np.ndarray, similarity: np.ndarray, *, model_name: str,
                   model_version: str, method: str) -> DataFile:
        """Write one block's rows of the ``neighbours`` table (not yet committed).

        Parameters
        ----------
        start : int
            First matrix row of the block (names the part).
        track_ids, ranks, neighbour_ids, similarity : np.ndarray [shape=(m,)]
            One row per (track, neighbour); rank 1 is the most similar.
        """
        n = len(track_ids)
        rows = pa.Table.from_arrays([
            pa.array(track_ids, pa.string()), pa.array(ranks, pa.int32()),
            pa.array(neighbour_ids, pa.string()), pa.array(similarity, pa.float32()),
            pa.array([model_name] * n, pa.string()), pa.array([model_version] * n, pa.string()),
            pa.array([method] * n, pa.string()),
        ], schema=NEIGHBOURS_SCHEMA)
        tables.ensure_table(self.store, self.table, NEIGHBOURS_SCHEMA)
        return tables.write_data_file(self.store, self.table, rows,
                                      prefix=f"{self.directory.rsplit('/', 1)[1]}-{start:09d}",
                                      row_group_size=NEIGHBOURS_ROW_GROUP)
