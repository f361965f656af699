"""Worker-side bodies of the ingest tasks: probe a batch of files, process one shard.

Plain functions (the Prefect wrappers are in :mod:`flows.ingest`): they connect the decode
adapter and the pure feature code in :mod:`tasks` to the writers in :mod:`featurestore`.
A track's failure becomes a row with its stage and error; only infrastructure errors (the store
cannot be written) escape, so Prefect retries the shard.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import pickle
import resource
import socket
import stat
import time
import traceback
from typing import Any

from featurestore.hashing import content_hash, file_identity, track_id_of
from featurestore.sources import SourceFile
from featurestore.store import FeatureStore
from featurestore.writer import ShardWriter
from flows.records import ProbeRecord, ShardBatch, ShardPlan, ShardResult
from tasks.columns import TAG_COLUMNS
from tasks.config import FeatureConfig
from tasks.decode import (
    TRUNCATION_TOLERANCE,
    AudioInfo,
    audio_format,
    declared_duration,
    open_audio,
    probe,
    read_blocks,
)
from tasks.errors import DecodeError, SourceUnavailable
from tasks.faults import failpoint
from tasks.features import SpectralExtractor
from tasks.limits import Deadline
from tasks.tags import read_tags
from tasks.track import extract_track, finite_or_none

MAX_ERROR_CHARS = 500
HASH_ATTEMPTS = 3
"""Times a file that changes while it is hashed is hashed again before the run gives up on it
(a transient failure: the next run tries again)."""


@functools.lru_cache(maxsize=4)
def _extractor(config_json: str) -> SpectralExtractor:
    """One extractor (window, filter banks) per worker process and config.

    On the feature device ``MTAG_FEATURE_DEVICE`` names (default ``auto``: a GPU if present;
    :func:`tasks.torch_features.make_extractor`).
    """
    import json

    from tasks.torch_features import make_extractor

    return make_extractor(FeatureConfig.from_dict(json.loads(config_json)))


def warm_worker(config_json: str) -> str:
    """Import the feature stack and build the extractor once in this worker process."""
    import prefect.task_engine  # noqa: F401  (the task engine's own imports)

    extractor = _extractor(config_json)
    config = extractor.config
    if config.descriptors:  # compile (or load) the descriptor kernels before the first shard
        import numpy as np

        extract_track([np.zeros((2, config.sample_rate * 4), np.float32) + 1e-3],
                      config.sample_rate, config, extractor, lambda batch: None)
    return f"{socket.gethostname()}:{os.getpid()}"


def probe_files(files: list[SourceFile]) -> list[ProbeRecord]:
    """Hash each file and read its header; failures become records, never exceptions."""
    return [probe_one(f) for f in files]


def special_file(uri: str) -> str | None:
    """What a local path is if not a regular file (after symlinks): ``FIFO``, ``device``,
    ``socket``, ``directory``; None for a regular file, an object-store URL or a path that
    is gone (reading it reports that).
    """
    if "://" in uri:
        return None
    try:
        mode = os.stat(uri).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "directory" if stat.S_ISDIR(mode) else "special file"


def probe_one(f: SourceFile) -> ProbeRecord:
    """Hash and probe one file; a failure becomes the record's status, never an exception."""
    base: dict[str, Any] = {"uri": f.uri, "size_bytes": f.size_bytes, "mtime": f.mtime}
    kind = special_file(f.uri)
    if kind:  # reading a FIFO blocks forever, a device never ends: never opened
        digest = _digest_of_error(f.uri)
        return ProbeRecord(**base, content_hash=digest, track_id=track_id_of(digest),
                           status="failed", stage="probe",
                           error=f"not a regular file ({kind}): not read")
    try:
        digest, identity = _stable_hash(f)
    except SourceUnavailable as exc:
        digest = _digest_of_error(f.uri)  # stable per URI, never a real content hash
        return ProbeRecord(**base, content_hash=digest, track_id=track_id_of(digest),
                           status="failed", stage="probe", error=_short(str(exc)), retry=True)
    ident: dict[str, Any] = {"content_hash": digest, "track_id": track_id_of(digest),
                             "identity": identity}
    fmt = audio_format(f.uri)
    if fmt is None:
        ext = os.path.splitext(f.uri)[1] or "(none)"
        return ProbeRecord(**base, **ident, status="unsupported", stage="probe",
                           error=f"unsupported file type {ext}")
    try:
        info = probe(f.uri)
    except DecodeError as exc:
        return ProbeRecord(**base, **ident, status="failed", stage="probe", format=fmt,
                           error=_short(str(exc)), retry=isinstance(exc, SourceUnavailable))
    return ProbeRecord(**base, **ident, status="ok", format=fmt, sample_rate=info.sample_rate,
                       channels=info.channels, duration_s=info.duration_s)


def _stable_hash(f: SourceFile) -> tuple[str, str]:
    """The content hash of ``f`` and its identity, hashed again if the file changed meanwhile.

    Raises
    ------
    SourceUnavailable
        If the file is gone or unreadable, keeps changing, or hashing runs past its limit.
    """
    for _ in range(HASH_ATTEMPTS):
        before = file_identity(f.uri)
        if before is None:
            raise SourceUnavailable("file is gone (deleted or moved since it was listed)")
        try:
            digest = content_hash(f.uri, deadline=Deadline.for_hashing(f.size_bytes))
        except OSError as exc:
            raise SourceUnavailable(f"cannot read: {exc}") from exc
        if file_identity(f.uri) == before:
            return digest, before
    raise SourceUnavailable(f"changed while being read ({HASH_ATTEMPTS} attempts)")


def run_batch(store_url: str, config_json: str, batch: ShardBatch) -> list[ShardResult]:
    """Process the shards of ``batch`` one after another; nothing is committed.

    Each finished shard's result is kept in the store's scratch space under the batch id, so a
    retry of the task (a worker died, say) picks up finished shards and redoes only the rest.
    """
    store = FeatureStore(store_url)
    scratch = store.path("_staging", "batches", batch.batch_id)
    results = []
    for plan in batch.shards:
        done = f"{scratch}/{plan.shard_id}.pickle"
        if store.fs.exists(done):
            with store.fs.open(done, "rb") as fh:
                results.append(pickle.load(fh))
            continue
        result = run_shard(store_url, config_json, plan)
        if len(batch.shards) > 1:
            store.fs.makedirs(scratch, exist_ok=True)
            with store.fs.open(done, "wb") as fh:
                pickle.dump(result, fh)
        results.append(result)
    if len(batch.shards) > 1:
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm(scratch, recursive=True)
    return results


def run_shard(store_url: str, config_json: str, plan: ShardPlan) -> ShardResult:
    """Process every track of ``plan`` into uncommitted files of ``store_url``.

    Returns
    -------
    ShardResult
        The files to commit with the shard's counts, compute time and the worker's peak
        memory.
    """
    import json

    started = time.perf_counter()
    config = FeatureConfig.from_dict(json.loads(config_json))
    extractor = _extractor(config_json)
    store = FeatureStore(store_url)
    staged = store.staging_dir(plan.feature_set, plan.shard_id)
    errors: list[tuple[str, str, str]] = []
    try:
        with ShardWriter(store, staged, config, plan.shard_id) as writer:
            for i, record in enumerate(plan.tracks):
                if i:
                    failpoint("worker.track")
                failure = _process_track(record, config, extractor, writer)
                if failure:
                    errors.append((record.uri, *failure))
    finally:  # an object store has no empty folders: nothing may be there to remove
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm(staged, recursive=True)
    return ShardResult(
        shard_id=plan.shard_id, written=writer.written,
        unsupported=sum(t.status == "unsupported" for t in plan.tracks),
        compute_s=time.perf_counter() - started,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        worker=f"{socket.gethostname()}:{os.getpid()}", errors=errors,
    )


def _process_track(record: ProbeRecord, config: FeatureConfig, extractor: SpectralExtractor,
                   writer: ShardWriter) -> tuple[str, str] | None:
    """Write one track (or its failure row); return ``(stage, error)`` if it failed."""
    row: dict[str, Any] = {
        "track_id": record.track_id, "path": record.uri, "status": record.status,
        "stage": record.stage, "error": record.error, "format": record.format,
        "sample_rate": record.sample_rate, "channels": record.channels,
        "duration_s": record.duration_s, "content_hash": record.content_hash,
        "size_bytes": record.size_bytes, "retry": record.retry,
    }
    if record.status != "ok":
        writer.fail_track(row)
        # an unsupported file is recorded, not an error
        return None if record.status == "unsupported" else (record.stage or "probe",
                                                              record.error or record.status)
    started = time.perf_counter()
    stage = "decode"
    retry = False
    try:
        _unchanged(record, "since it was hashed")
        declared_s, cut = declared_duration(record.uri, AudioInfo(
            record.sample_rate or 0, record.channels or 0,
            round((record.duration_s or 0.0) * (record.sample_rate or 0)), "", ""))
        with open_audio(record.uri) as snd:
            writer.begin_track(record.track_id)
            stage = "features"
            counted = _Counted(read_blocks(snd, deadline=Deadline.for_decoding(
                record.duration_s)))
            result = extract_track(counted, snd.samplerate, config, extractor,
                                   writer.add_batch)
        _unchanged(record, "while being read")
        decoded_s = counted.frames / snd.samplerate
        truncated = bool(cut) or (declared_s is not None
                                  and decoded_s < TRUNCATION_TOLERANCE * declared_s)
        row |= {
            "status": "ok", "stage": None, "error": None, "duration_s": result.duration_s,
            "peak_dbfs": finite_or_none(result.peak_dbfs),
            "rms_dbfs": finite_or_none(result.rms_dbfs),
            "compute_s": time.perf_counter() - started,
            "processed_at": dt.datetime.now(dt.UTC), "retry": False,
            "declared_duration_s": declared_s, "truncated": truncated,
            "warning": _truncation_note(decoded_s, declared_s, cut) if truncated else None,
            **result.descriptors,
        }
        if config.tags:
            row |= tag_row(record.uri)
        stage = "write"
        writer.end_track(row, result)
        return None
    except DecodeError as exc:
        error, retry = str(exc), isinstance(exc, SourceUnavailable)
        stage = stage if retry else "decode"
    except MemoryError:  # the worker's memory, not the file's bytes: tried again
        error, retry = "out of memory", True
    except Exception as exc:  # a bug or an unforeseen file: recorded, the shard goes on
        error = f"{type(exc).__name__}: {exc} [{_where(exc)}]"
    row |= {"status": "failed", "stage": stage, "error": _short(error), "retry": retry,
            "compute_s": time.perf_counter() - started}
    writer.fail_track(row)
    return (stage, row["error"])


def tag_row(uri: str) -> dict[str, Any]:
    """The file's embedded tags as tracks columns (:data:`tasks.columns.TAG_COLUMNS`)."""
    tags = read_tags(uri)
    return {col: tags.get(key) for col, key in TAG_COLUMNS}


class _Counted:
    """Blocks passed through, their frames counted (the decoded length at the native rate)."""

    def __init__(self, blocks: Any) -> None:
        self.blocks = blocks
        self.frames = 0

    def __iter__(self) -> Any:
        for block in self.blocks:
            self.frames += block.shape[-1]
            yield block


def _unchanged(record: ProbeRecord, when: str) -> None:
    """Raise :class:`SourceUnavailable` unless the file is the one that was hashed."""
    if record.identity is None:
        return
    now = file_identity(record.uri)
    if now is None:
        raise SourceUnavailable(f"file is gone (deleted or moved {when})")
    if now != record.identity:
        raise SourceUnavailable(f"file changed {when}: its features would not match its "
                                "content hash")


def _truncation_note(decoded_s: float, declared_s: float | None, cut: str | None) -> str:
    said = f" of {declared_s:.2f} s declared" if declared_s else ""
    return f"truncated: decoded {decoded_s:.2f} s{said}" + (f" ({cut})" if cut else "")


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{os.path.basename(last.filename)}:{last.lineno}"


def _digest_of_error(uri: str) -> str:
    from featurestore.hashing import short_hash

    return short_hash("unreadable", uri, digest_size=16)
