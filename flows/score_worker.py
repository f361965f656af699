"""Worker-side body of the scoring task: load the model once per process, score whole feature
shards into one staged part.

Plain functions (the Prefect wrapper is in :mod:`flows.score`). They connect the model loader
(:mod:`training.artifact` via :mod:`training.tracking`), the scoring math in
:mod:`tasks.predictions` and the writers in :mod:`featurestore.scores`.
"""

from __future__ import annotations

import collections
import functools
import os
import resource
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurestore.reader import shard_matrices
from featurestore.scores import ScoredModel, ScorePartWriter, ScoreStore
from featurestore.store import FeatureStore
from flows.records import ScorePartResult, ScorePlan
from tasks.errors import SchemaError
from tasks.predictions import align_classes, score_rows


@functools.lru_cache(maxsize=2)
def load_predictor(tracking_uri: str, model_uri: str, device: str | None = None,
                   model_dir: str | None = None) -> Any:
    """The model behind ``model_uri``, loaded once per process.

    From ``model_dir`` where this machine has that folder (the download of the command that
    started the run: a local worker), else downloaded from MLflow into a temporary folder that
    is removed once the model is in memory. Loading through MLflow cost a worker 0.9 CPU-s
    (its client and SQLite store), 12 % of a worker's samples in a whole `mtag score` of
    philharmonia-dev, and left a copy of the model in the temporary folder for every worker
    of every run.
    """
    from training.artifact import load
    from training.meta import META

    if model_dir and os.path.isfile(os.path.join(model_dir, META)):
        return load(model_dir, device=device)
    from training import tracking

    tracking.use(tracking_uri)
    directory = tracking.load_artifact_dir(model_uri)
    try:
        return load(directory, device=device)
    finally:
        tracking.remove_artifact_dir(directory)


def warm_scorer(tracking_uri: str, model_uri: str, device: str | None = None,
                model_dir: str | None = None) -> str:
    """Load the model in this worker before the first task needs it."""
    import prefect.task_engine  # noqa: F401  (the task engine's own imports)

    load_predictor(tracking_uri, model_uri, device, model_dir)
    return f"{socket.gethostname()}:{os.getpid()}"


def score_part(store_url: str, tracking_uri: str, model_json: dict[str, Any], plan: ScorePlan,
               *, top: int = 5, device: str | None = None, model_dir: str | None = None
               ) -> ScorePartResult:
    """Score every segment of the feature shards in ``plan`` into an uncommitted part.

    Returns
    -------
    ScorePartResult
        The part's files (to commit), label counts and what it cost.
    """
    started = time.perf_counter()
    model = ScoredModel.from_dict(model_json)
    predictor = load_predictor(tracking_uri, model.uri, device, model_dir)
    store = FeatureStore(store_url)
    labels: collections.Counter[str] = collections.Counter()
    unsure = 0
    tracks, seg = _part_rows(store, model, predictor, plan)
    tracks_of, seg_of = _by_shard(tracks, plan.shards), _by_shard(seg, plan.shards)
    with ScorePartWriter(ScoreStore(store), model, plan.part_id) as writer:
        for shard, tensor_file in zip(plan.shards, plan.tensor_files, strict=True):
            track_rows, segment_rows = _score_shard(
                store, model, predictor, tracks_of[shard], seg_of[shard], tensor_file, top)
            writer.add(track_rows, segment_rows, shard=shard)
            labels.update(track_rows["label"])
            unsure += int(np.sum(~track_rows["confident"]))
    return ScorePartResult(
        written=writer.written, compute_s=time.perf_counter() - started,
        label_counts=dict(labels), n_unconfident=unsure, device=str(predictor.device),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )


def _part_rows(store: FeatureStore, model: ScoredModel, predictor: Any, plan: ScorePlan
               ) -> tuple[pa.Table, pa.Table]:
    """The ``tracks`` and ``segments`` rows of every shard of ``plan``, one read of each table.

    A filtered read opens the footer of every file of the snapshot, so reading shard by shard
    cost a part (shards x files) footers: 82 ms per read on the 65 files of philharmonia-dev,
    44 % of a part's time; the read of the part's shards opens only their own files (and any
    compacted ones).
    """
    summary_cols = _summary_columns(predictor)
    detector = predictor.novelty
    novelty_cols = [c for c in detector.columns if c not in summary_cols] if detector else []
    fs = model.feature_set
    tracks = store.read(fs, "tracks", ["shard", "track_id", "path"], shards=plan.shards)
    seg = store.read(fs, "segments", ["shard", "track_id", "segment", "start_s", "tensor_row",
                                      *summary_cols, *novelty_cols], shards=plan.shards)
    return tracks, seg


def _summary_columns(predictor: Any) -> list[str]:
    """The ``segments`` summary columns the model reads (none for a tensor-only model)."""
    return list(predictor.meta["columns"]) if predictor.input in ("summary", "mixed") else []


def _by_shard(rows: pa.Table, shards: Sequence[str]) -> dict[str, pa.Table]:
    """The rows of each of ``shards`` (in the order the snapshot holds them; none for a shard
    without rows), without the ``shard`` column: one stable sort of the part's rows, where a
    filter per shard had scanned them all once a shard (parts of 10-55 shards on
    philharmonia-dev).
    """
    codes = pc.dictionary_encode(rows["shard"].combine_chunks())
    index = codes.indices.to_numpy(zero_copy_only=False)
    counts = np.bincount(index, minlength=len(codes.dictionary))
    grouped = rows.drop_columns(["shard"]).take(pa.array(np.argsort(index, kind="stable")))
    starts = (np.cumsum(counts) - counts).tolist()
    held = {shard: grouped.slice(at, n) for shard, at, n in
            zip(codes.dictionary.to_pylist(), starts, counts.tolist(), strict=True)}
    return {shard: held.get(shard, grouped.slice(0, 0)) for shard in shards}


def _columns_matrix(rows: pa.Table, columns: list[str]) -> np.ndarray:
    """``columns`` of ``rows`` as one float64 matrix (nulls as NaN), without pandas."""
    if not columns:
        return np.zeros((rows.num_rows, 0), np.float64)
    return np.stack([rows[c].to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
                     for c in columns], axis=1)


def _score_shard(store: FeatureStore, model: ScoredModel, predictor: Any, tracks_table: pa.Table,
                 seg: pa.Table, tensor_file: str | None, top: int
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Track rows and segment rows of one feature shard (its ``tracks`` and ``segments``
    rows). The model's batch size is its own rule (:func:`training.models.inference_batch_size`).
    """
    fs = model.feature_set
    tracks = tracks_table.to_pydict()
    path_of = dict(zip(tracks["track_id"], tracks["path"], strict=True))
    summary_cols = _summary_columns(predictor)
    detector = predictor.novelty
    seg_ids = seg["track_id"].to_numpy(zero_copy_only=False)
    seg_no = seg["segment"].to_numpy()
    if predictor.input == "summary":
        # track_id and segment too: a track-pooled classic model pools each track's rows
        frame = seg.select(["track_id", "segment", *summary_cols]).to_pandas()
        probs, emb = predictor.predict(frame, embeddings=True)
        ids, numbers = seg_ids, seg_no
    elif predictor.input == "mixed":
        # an ensemble whose members read different inputs (training.ensemble): the whole
        # shard at once, as a dict of the summary rows and each tensor, row-aligned
        frame = seg.select(["track_id", "segment", *summary_cols]).to_pandas()
        probs, emb = predictor.predict({"summary": frame, **{
            kind: _shard_tensor(store, fs, tensor_file, kind, seg)
            for kind in predictor.meta["inputs"] if kind != "summary"}},
            embeddings=True)
        ids, numbers = seg_ids, seg_no
    else:
        parts = [(t, s, *predictor.predict(m, embeddings=True))
                 for t, s, m in (shard_matrices(store, fs, tensor_file, predictor.input,
                                                rows=seg["tensor_row"].to_numpy())
                                 if tensor_file else ())]
        ids = np.concatenate([p[0] for p in parts]) if parts else np.array([], object)
        numbers = np.concatenate([p[1] for p in parts]) if parts else np.array([], np.int32)
        n_c = len(model.classes)
        probs = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, n_c),
                                                                             np.float32)
        emb = np.concatenate([p[3] for p in parts]) if parts else np.zeros(
            (0, model.embed_dim), np.float32)
    start_s = _align_start(seg_ids, seg_no, seg["start_s"].to_numpy(), ids, numbers)
    # straight from the Arrow rows: a pandas frame of them (string track ids) cost more than
    # the distances
    novelty = detector.novelty(seg_ids, _columns_matrix(seg, detector.columns)) \
        if detector else None
    track_rows, segment_rows = score_rows(
        ids, numbers, align_classes(probs, predictor.classes, model.classes), emb,
        model.classes, threshold=model.threshold, multi_label=model.multi_label, top=top,
        novelty=novelty)
    track_rows["path"] = [path_of.get(t) for t in track_rows["track_id"]]
    segment_rows["start_s"] = start_s
    return track_rows, segment_rows


def _shard_tensor(store: FeatureStore, fs: str, tensor_file: str | None, kind: str,
                  seg: Any) -> np.ndarray:
    """The ``kind`` matrices of the segments ``seg`` (a shard's segments rows), in its row
    order.
    """
    rows = seg["tensor_row"].to_numpy()
    got = list(shard_matrices(store, fs, tensor_file, kind, rows=rows)) if tensor_file else []
    if not got:
        if len(rows):
            raise SchemaError(f"shard segments of feature set {fs} have no {kind} tensors")
        return np.zeros((0, 0, 0), np.float32)
    at = np.searchsorted(np.unique(rows), rows)  # the file's rows come in ascending order
    ids = np.concatenate([g[0] for g in got])[at]
    if not np.array_equal(ids, seg["track_id"].to_numpy(zero_copy_only=False)):
        raise SchemaError(f"{tensor_file}: tensor rows do not match the segments table")
    return np.concatenate([g[2] for g in got])[at]


def _align_start(ids: np.ndarray, numbers: np.ndarray, start_s: np.ndarray,
                 want_ids: np.ndarray, want_numbers: np.ndarray) -> np.ndarray:
    """``start_s`` of the segments ``(want_ids, want_numbers)`` from the segments table."""
    if len(want_ids) == len(ids) and np.array_equal(want_numbers, numbers) and \
            np.array_equal(want_ids, ids):
        return start_s
    lookup = {(t, int(n)): s for t, n, s in zip(ids, numbers, start_s, strict=True)}
    return np.array([lookup.get((t, int(n)), np.nan) for t, n in
                     zip(want_ids, want_numbers, strict=True)], dtype=np.float64)

