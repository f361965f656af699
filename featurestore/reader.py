"""Readers: memory-mapped dense tensors and summary tables of committed shards.

:class:`TensorReader` maps each committed ``tensors.arrow`` file (zero-copy on a local store)
and serves ``(n_mels, F)`` log-mel and ``(n_mfcc, F)`` MFCC matrices by row, without copying
the dataset into RAM. Remote stores are read through fsspec into memory shard by shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from featurestore.schema import read_metadata
from featurestore.store import FeatureStore
from tasks.errors import SchemaError


@dataclass(frozen=True)
class TensorIndex:
    """Where each segment's row lies: parallel arrays over all committed shards."""

    track_id: np.ndarray  # object array of str
    segment: np.ndarray  # int32
    valid_frames: np.ndarray  # int32
    chunk: np.ndarray  # int32, position in TensorReader.chunks (a record batch of a shard)
    row: np.ndarray  # int64, row within that record batch


class TensorReader:
    """Dense tensors of one feature set, memory-mapped.

    Rows are served as views into the record batches of the memory-mapped files: nothing is
    concatenated or copied, so reading a whole catalogue's tensors costs page cache, not RAM.

    Parameters
    ----------
    store : FeatureStore
    feature_set : str, optional
        Defaults to the store's newest feature set with commits.
    """

    def __init__(self, store: FeatureStore, feature_set: str | None = None) -> None:
        self.store = store
        self.feature_set = feature_set or store.default_feature_set()
        self.chunks: list[pa.RecordBatch] = []
        self.shapes: dict[str, tuple[int, int]] = {}
        parts = []
        for path in store.files(self.feature_set, "tensors"):
            table = _read_ipc(store, path)
            meta = read_metadata(table.schema)
            if meta["feature_set"] != self.feature_set:
                raise SchemaError(f"{path}: feature set {meta['feature_set']} in a "
                                  f"{self.feature_set} shard")
            self.shapes = {k: (int(v[0]), int(v[1])) for k, v in meta["shapes"].items()}
            for batch in table.to_batches():
                if batch.num_rows == 0:
                    continue
                n = batch.num_rows
                parts.append((batch.column("track_id").to_numpy(zero_copy_only=False),
                              batch.column("segment").to_numpy(),
                              batch.column("valid_frames").to_numpy(),
                              np.full(n, len(self.chunks), np.int32),
                              np.arange(n, dtype=np.int64)))
                self.chunks.append(batch)
        if parts:
            cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
        else:
            cols = [np.array([], dtype=object), *(np.array([], dtype=t) for t in
                                                 (np.int32, np.int32, np.int32, np.int64))]
        self.index = TensorIndex(*cols)
        self._values: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.index.segment.shape[0])

    def matrix(self, name: str, i: int) -> np.ndarray:
        """Row ``i``'s ``name`` (``"logmel"`` or ``"mfcc"``) as a read-only ``(rows, F)`` view."""
        chunk, row = int(self.index.chunk[i]), int(self.index.row[i])
        return self._flat(chunk, name)[row]

    def _flat(self, chunk: int, name: str) -> np.ndarray:
        key = (chunk, name)
        if key not in self._values:
            column = self.chunks[chunk].column(name)
            rows, frames = self.shapes[name]
            flat = column.flatten().to_numpy(zero_copy_only=True)
            self._values[key] = flat.reshape(len(column), rows, frames)
        return self._values[key]


def read_table(store: FeatureStore, feature_set: str, table: str,
               columns: list[str] | None = None) -> pa.Table:
    """Concatenate a Parquet table (``tracks`` or ``segments``) over committed shards."""
    parts = []
    for path in store.files(feature_set, table):
        with store.fs.open(path, "rb") as fh:
            parts.append(pq.read_table(fh, columns=columns))
    if not parts:
        raise SchemaError(f"feature set {feature_set} has no committed {table}")
    return pa.concat_tables(parts)


def read_shard_table(store: FeatureStore, feature_set: str, shard_id: str, table: str,
                     columns: list[str] | None = None) -> pa.Table:
    """One committed shard's Parquet table (``tracks`` or ``segments``)."""
    with store.fs.open(store.shard_file(feature_set, shard_id, table), "rb") as fh:
        return pq.read_table(fh, columns=columns)


def shard_matrices(store: FeatureStore, feature_set: str, shard_id: str, name: str
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One committed shard's dense ``name`` matrices (``"logmel"`` or ``"mfcc"``), a record
    batch at a time (zero-copy views of the memory-mapped file on a local store).

    Yields
    ------
    track_id : np.ndarray [shape=(n,), dtype=object]
    segment : np.ndarray [shape=(n,), dtype=int32]
    matrices : np.ndarray [shape=(n, rows, frames), dtype=float32]
        Read-only.
    """
    table = _read_ipc(store, store.shard_file(feature_set, shard_id, "tensors"))
    meta = read_metadata(table.schema)
    if meta["feature_set"] != feature_set:
        raise SchemaError(f"shard {shard_id}: feature set {meta['feature_set']}, "
                          f"expected {feature_set}")
    rows, frames = (int(v) for v in meta["shapes"][name])
    for batch in table.to_batches():
        if batch.num_rows == 0:
            continue
        column = batch.column(name)
        flat = column.flatten().to_numpy(zero_copy_only=True)  # honours a slice's offset
        yield (batch.column("track_id").to_numpy(zero_copy_only=False),
               batch.column("segment").to_numpy(), flat.reshape(len(column), rows, frames))


def _read_ipc(store: FeatureStore, path: str) -> pa.Table:
    if store.is_local:
        return ipc.open_file(pa.memory_map(path, "r")).read_all()
    with store.fs.open(path, "rb") as fh:
        return ipc.open_file(pa.BufferReader(fh.read())).read_all()
