"""Shard writer: one shard's tracks, segments and dense tensors, written into place.

A :class:`ShardWriter` is a context manager. Per track it takes the dense tensor batches as they
are produced (kept in memory, spilled to a temporary Arrow stream in a scratch folder once a
track's share passes ``spill_bytes``), and only when the track finishes are its rows added to
the shard, so a track that fails half-way leaves nothing behind. The tensors file is streamed
to its final name; the ``tracks`` and ``segments`` Parquet files are written into their Delta
tables' folders when the shard finishes, and nothing is visible until the flow commits them
(:meth:`featurestore.store.FeatureStore.commit_shards`). Every file is cast to its explicit
schema and carries the feature set's metadata; the writer returns a
:class:`~featurestore.store.WrittenShard` with the counts.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from featurestore import tables
from featurestore.schema import TRACKS_SCHEMA, segments_schema, tensors_schema, with_metadata
from featurestore.store import FeatureStore, ShardCounts, WrittenShard
from tasks.config import FeatureConfig
from tasks.track import SegmentBatch, TrackResult, summary_columns

DEFAULT_SPILL_BYTES = 64 << 20
ROWS_PER_BATCH = 256


class ShardWriter:
    """Write one shard of ``store`` (see the module docstring).

    Parameters
    ----------
    store : FeatureStore
    directory : str
        Scratch folder from :meth:`FeatureStore.staging_dir` (spilled tensors).
    config : FeatureConfig
    shard_id : str
    spill_bytes : int
        Per-track tensor bytes held in memory before spilling to a temporary file.

    Attributes
    ----------
    written : WrittenShard
        After a successful ``with`` block: the files to commit and the shard's counts.
    """

    def __init__(self, store: FeatureStore, directory: str, config: FeatureConfig,
                 shard_id: str, *, spill_bytes: int = DEFAULT_SPILL_BYTES) -> None:
        self.store, self.directory, self.config, self.shard_id = store, directory, config, shard_id
        self.feature_set = config.feature_set_id
        self.tensor_file = store.new_tensor_file(self.feature_set, shard_id)
        self._tensor_path = store.tensor_path(self.feature_set, self.tensor_file)
        self._rows_out = 0  # tensor rows emitted so far
        self._track_rows: list[np.ndarray] = []  # per finished track: tensor row of each segment
        self.spill_bytes = spill_bytes
        self._tensor_schema = tensors_schema(config)
        self._segment_schema = segments_schema(config)
        self._stat_names = summary_columns(config)
        self._tracks: list[dict[str, Any]] = []
        self._segments: list[tuple[str, TrackResult]] = []
        self._out_rows: list[pa.RecordBatch] = []
        self._out_count = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        self._spill: ipc.RecordBatchStreamWriter | None = None
        self._spill_sink: Any = None
        self._spill_path = f"{directory}/spill.arrows"
        self._track_id: str | None = None
        self._emitted: list[np.ndarray] = []  # segment numbers of the track's emitted rows
        self._n_segments = 0
        self._audio_s = 0.0

    def __enter__(self) -> ShardWriter:
        self.store.fs.makedirs(self._tensor_path.rsplit("/", 1)[0], exist_ok=True)
        self._sink = self.store.fs.open(self._tensor_path, "wb")
        self._writer = ipc.new_file(self._sink, self._tensor_schema)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._finish()
        else:
            self._writer.close()
            self._sink.close()
            self._close_spill()
            self.store.fs.rm(self._tensor_path)  # never named by a commit: nothing to keep

    # --- per track ------------------------------------------------------------------------
    def begin_track(self, track_id: str) -> None:
        """Start collecting tensors of ``track_id``."""
        self._track_id = track_id
        self._pending, self._pending_bytes = [], 0

    def add_batch(self, batch: SegmentBatch) -> None:
        """Add dense tensors of the current track (called as segments complete)."""
        assert self._track_id is not None, "begin_track first"
        n = len(batch)
        rb = pa.RecordBatch.from_arrays([
            pa.array([self._track_id] * n, pa.string()),
            pa.array(batch.index, pa.int32()),
            pa.array(batch.valid_frames, pa.int32()),
            _fixed_list(batch.logmel),
            _fixed_list(batch.mfcc),
        ], schema=self._tensor_schema)
        self._pending.append(rb)
        self._pending_bytes += rb.nbytes
        if self._pending_bytes > self.spill_bytes:
            if self._spill is None:
                self._spill_sink = self.store.fs.open(self._spill_path, "wb")
                self._spill = ipc.new_stream(self._spill_sink, self._tensor_schema)
            for pending in self._pending:
                self._spill.write_batch(pending)
            self._pending, self._pending_bytes = [], 0

    def end_track(self, row: dict[str, Any], result: TrackResult) -> None:
        """Finish the current track successfully: its rows join the shard."""
        track_id = self._track_id
        assert track_id is not None
        if self._spill is not None:
            self._close_spill()
            with self.store.fs.open(self._spill_path, "rb") as fh:
                for rb in ipc.open_stream(fh):
                    self._emit(rb)
            self.store.fs.rm(self._spill_path)
        for rb in self._pending:
            self._emit(rb)
        emitted = np.concatenate(self._emitted) if self._emitted else np.zeros(0, np.int32)
        self._track_rows.append(_rows_of(emitted, result.segment_index,
                                         self._rows_out - len(emitted)))
        n = len(result.segment_index)
        self._segments.append((track_id, result))  # columns are built once, in _finish
        self._n_segments += n
        self._audio_s += result.duration_s
        self._tracks.append(row | {"n_segments": n})
        self._reset_track()

    def fail_track(self, row: dict[str, Any]) -> None:
        """Record a track that failed or is unsupported; its tensors are discarded."""
        if self._spill is not None:
            self._close_spill()
            self.store.fs.rm(self._spill_path)
        self._tracks.append(row | {"n_segments": 0})
        self._reset_track()

    # --- internals ------------------------------------------------------------------------
    def _reset_track(self) -> None:
        self._track_id, self._pending, self._pending_bytes = None, [], 0
        self._emitted = []

    def _emit(self, rb: pa.RecordBatch) -> None:
        self._out_rows.append(rb)
        self._out_count += rb.num_rows
        self._rows_out += rb.num_rows
        self._emitted.append(rb.column("segment").to_numpy())  # this track's rows
        if self._out_count >= ROWS_PER_BATCH:
            self._flush_tensors()

    def _flush_tensors(self) -> None:
        if self._out_rows:
            table = pa.Table.from_batches(self._out_rows, schema=self._tensor_schema)
            self._writer.write_table(table.combine_chunks(), max_chunksize=ROWS_PER_BATCH * 4)
            self._out_rows, self._out_count = [], 0

    def _segments_table(self) -> pa.Table:
        columns = _segments_columns(self._segments, self.config.frame_seconds,
                                    len(self._stat_names))
        n = sum(len(r.segment_index) for _, r in self._segments)
        rows = np.concatenate(self._track_rows) if self._track_rows else np.zeros(0, np.int64)
        columns += [pa.array([self.shard_id] * n, pa.string()),
                    pa.array([self.tensor_file] * n, pa.string()), pa.array(rows, pa.int64())]
        return pa.Table.from_arrays(columns, schema=self._segment_schema)

    def _close_spill(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill_sink.close()
            self._spill = None

    def _finish(self) -> None:
        self._flush_tensors()
        self._writer.close()
        self._sink.close()
        now = dt.datetime.now(dt.UTC)
        has_tensors = self._rows_out > 0
        if not has_tensors:
            self.store.fs.rm(self._tensor_path)
        tensor_file = self.tensor_file if has_tensors else None
        tracks = pa.Table.from_pylist(
            [r | {"shard": self.shard_id, "feature_set": self.feature_set,
                  "processed_at": r.get("processed_at", now),
                  "tensor_file": tensor_file if r["status"] == "ok" else None}
             for r in self._tracks],
            schema=with_metadata(TRACKS_SCHEMA, self.config),
        )
        segments = self._segments_table()
        # named after the shard: a reader of some shards leaves the others' files unopened
        # (featurestore.tables.SHARD_FILE)
        tracks_file = tables.write_data_file(
            self.store, self.store.table_path(self.feature_set, "tracks"), tracks,
            prefix=self.shard_id)
        segments_file = tables.write_data_file(
            self.store, self.store.table_path(self.feature_set, "segments"), segments,
            prefix=self.shard_id) if segments.num_rows else None
        self.counts = ShardCounts(
            n_tracks=len(self._tracks),
            n_ok=sum(r["status"] == "ok" for r in self._tracks),
            n_failed=sum(r["status"] != "ok" for r in self._tracks),
            n_segments=self._n_segments,
            audio_s=self._audio_s,
            track_ids=[r["track_id"] for r in self._tracks],
        )
        self.written = WrittenShard(self.shard_id, self.feature_set, self.counts, tracks_file,
                                    segments_file, tensor_file)


def _rows_of(emitted: np.ndarray, segments: np.ndarray, first: int) -> np.ndarray:
    """Tensor row of each of a track's ``segments``, given the segment numbers of the rows
    emitted for it from row ``first`` on.
    """
    order = np.argsort(emitted, kind="stable")
    pos = order[np.searchsorted(emitted[order], segments)]
    return (first + pos).astype(np.int64)


def _segments_columns(parts: list[tuple[str, TrackResult]], frame_seconds: float,
                      n_stats: int) -> list[pa.Array]:
    """The ``segments`` columns of many tracks, one Arrow array per column."""
    if not parts:
        return [pa.array([], t) for t in (pa.string(), pa.int32(), pa.float64(), pa.float64(),
                                          pa.int32())] + [pa.array([], pa.float32())] * n_stats
    ids = np.concatenate([np.full(len(r.segment_index), t, dtype=object) for t, r in parts])
    valid = np.concatenate([r.valid_frames for _, r in parts])
    stats = np.concatenate([r.stats for _, r in parts])
    return [
        pa.array(ids, pa.string()),
        pa.array(np.concatenate([r.segment_index for _, r in parts]), pa.int32()),
        pa.array(np.concatenate([r.start_s for _, r in parts]), pa.float64()),
        pa.array(valid * frame_seconds, pa.float64()),
        pa.array(valid, pa.int32()),
    ] + [pa.array(np.ascontiguousarray(stats[:, i]), pa.float32()) for i in range(n_stats)]


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    """``(S, a, b)`` float32 array as a fixed-size list array of ``a*b`` values per row."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(x.shape[0], -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
