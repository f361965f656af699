"""Readers: memory-mapped dense tensors and summary tables of a feature set's snapshot.

:class:`TensorReader` maps each tensors file the ``segments`` snapshot names (zero-copy on a
local store) and serves ``(n_mels, F)`` log-mel and ``(n_mfcc, F)`` MFCC matrices by row,
without copying the dataset into RAM. Remote stores are read through fsspec into memory file
by file. A reader opened at a table version (``version``) reads that snapshot: tensors files
are never rewritten, so a past training set stays readable.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

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
    version : int or str, optional
        Version (or ISO timestamp) of the ``segments`` table to read; default: current.
    """

    def __init__(self, store: FeatureStore, feature_set: str | None = None, *,
                 version: int | str | None = None) -> None:
        self.store = store
        self.feature_set = feature_set or store.default_feature_set()
        self.chunks: list[pa.RecordBatch] = []
        self.shapes: dict[str, tuple[int, int]] = {}
        rows = store.read(self.feature_set, "segments",
                          ["track_id", "segment", "valid_frames", "tensor_file", "tensor_row"],
                          version=version)
        rows = rows.sort_by([("tensor_file", "ascending"), ("tensor_row", "ascending")])
        files = rows["tensor_file"].to_numpy(zero_copy_only=False)
        wanted = rows["tensor_row"].to_numpy()
        chunk = np.zeros(len(wanted), np.int32)
        row = np.zeros(len(wanted), np.int64)
        cuts = [0, *(np.flatnonzero(files[1:] != files[:-1]) + 1).tolist(), len(files)]
        # only the rows the snapshot names are served
        for a, b in itertools.pairwise(cuts if len(files) else []):
            chunk[a:b], row[a:b] = self._map_file(str(files[a]), wanted[a:b])
        cols = [rows["track_id"].to_numpy(zero_copy_only=False), rows["segment"].to_numpy(),
                rows["valid_frames"].to_numpy(), chunk, row]
        self.index = TensorIndex(*cols)
        self._values: dict[tuple[int, str], np.ndarray] = {}

    def _map_file(self, tensor_file: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Open one tensors file; return ``(chunk, row in chunk)`` of its table ``rows``."""
        path = self.store.tensor_path(self.feature_set, tensor_file)
        table = _read_ipc(self.store, path)
        meta = read_metadata(table.schema)
        if meta["feature_set"] != self.feature_set:
            raise SchemaError(f"{path}: feature set {meta['feature_set']} in a "
                              f"{self.feature_set} shard")
        self.shapes = {k: (int(v[0]), int(v[1])) for k, v in meta["shapes"].items()}
        batches = [b for b in table.to_batches() if b.num_rows]
        starts = np.cumsum([0, *(b.num_rows for b in batches)])
        if len(rows) and rows.max() >= starts[-1]:
            raise SchemaError(f"{path} has {starts[-1]} rows; the segments table names row "
                              f"{rows.max()} (run `mtag verify`)")
        which = np.searchsorted(starts, rows, side="right") - 1
        base = len(self.chunks)
        self.chunks.extend(batches)
        return (base + which).astype(np.int32), (rows - starts[which]).astype(np.int64)

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
    """A feature set's ``tracks`` or ``segments`` snapshot.

    Raises
    ------
    SchemaError
        If nothing is committed.
    """
    rows = store.read(feature_set, table, columns)
    if rows.num_rows == 0 and not store.has_tracks(feature_set):
        raise SchemaError(f"feature set {feature_set} has no committed {table}")
    return rows


def shard_matrices(store: FeatureStore, feature_set: str, tensor_file: str, name: str, *,
                   rows: np.ndarray | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One tensors file's dense ``name`` matrices (``"logmel"`` or ``"mfcc"``), a record
    batch at a time (zero-copy views of the memory-mapped file on a local store).

    Parameters
    ----------
    tensor_file : str
        As named by the shard's ``tracks``/``segments`` rows.
    rows : np.ndarray, optional
        Only these rows of the file (the ``tensor_row`` of the segments the snapshot holds);
        default every row.

    Yields
    ------
    track_id : np.ndarray [shape=(n,), dtype=object]
    segment : np.ndarray [shape=(n,), dtype=int32]
    matrices : np.ndarray [shape=(n, rows, frames), dtype=float32]
        Read-only.
    """
    path = store.tensor_path(feature_set, tensor_file)
    table = _read_ipc(store, path)
    meta = read_metadata(table.schema)
    if meta["feature_set"] != feature_set:
        raise SchemaError(f"{path}: feature set {meta['feature_set']}, expected {feature_set}")
    n_rows, frames = (int(v) for v in meta["shapes"][name])
    start = 0
    for batch in table.to_batches():
        if batch.num_rows == 0:
            continue
        column = batch.column(name)
        flat = column.flatten().to_numpy(zero_copy_only=True)  # honours a slice's offset
        out = (batch.column("track_id").to_numpy(zero_copy_only=False),
               batch.column("segment").to_numpy(), flat.reshape(len(column), n_rows, frames))
        if rows is not None:
            keep = np.isin(np.arange(start, start + batch.num_rows), rows)
            out = (out[0][keep], out[1][keep], out[2][keep])
        start += batch.num_rows
        if len(out[0]):
            yield out


def _read_ipc(store: FeatureStore, path: str) -> pa.Table:
    if store.is_local:
        return ipc.open_file(pa.memory_map(path, "r")).read_all()
    with store.fs.open(path, "rb") as fh:
        return ipc.open_file(pa.BufferReader(fh.read())).read_all()
