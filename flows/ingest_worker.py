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

from featurestore.hashing import content_hash, track_id_of
from featurestore.sources import SourceFile
from featurestore.store import FeatureStore
from featurestore.writer import ShardWriter
from flows.records import ProbeRecord, ShardBatch, ShardPlan, ShardResult
from tasks.config import FeatureConfig
from tasks.decode import audio_format, open_audio, probe, read_blocks
from tasks.errors import DecodeError
from tasks.features import SpectralExtractor
from tasks.track import extract_track, finite_or_none

MAX_ERROR_CHARS = 500


@functools.lru_cache(maxsize=4)
def _extractor(config_json: str) -> SpectralExtractor:
    """One extractor (window, filter banks) per worker process and config."""
    import json

    return SpectralExtractor(FeatureConfig.from_dict(json.loads(config_json)))


def warm_worker(config_json: str) -> str:
    """Import the feature stack and build the extractor once in this worker process."""
    import prefect.task_engine  # noqa: F401  (the task engine's own imports)

    _extractor(config_json)
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
    """Hash and probe one file."""
    base: dict[str, Any] = {"uri": f.uri, "size_bytes": f.size_bytes, "mtime": f.mtime}
    kind = special_file(f.uri)
    if kind:  # reading a FIFO blocks forever, a device never ends: never opened
        digest = _digest_of_error(f.uri)
        return ProbeRecord(**base, content_hash=digest, track_id=track_id_of(digest),
                           status="failed", stage="probe",
                           error=f"not a regular file ({kind}): not read")
    try:
        digest = content_hash(f.uri)
    except OSError as exc:
        digest = _digest_of_error(f.uri)  # stable per URI, never a real content hash
        return ProbeRecord(**base, content_hash=digest, track_id=track_id_of(digest),
                           status="failed", stage="probe", error=_short(f"cannot read: {exc}"))
    ident: dict[str, Any] = {"content_hash": digest, "track_id": track_id_of(digest)}
    fmt = audio_format(f.uri)
    if fmt is None:
        ext = os.path.splitext(f.uri)[1] or "(none)"
        return ProbeRecord(**base, **ident, status="unsupported", stage="probe",
                           error=f"unsupported file type {ext}")
    try:
        info = probe(f.uri)
    except DecodeError as exc:
        return ProbeRecord(**base, **ident, status="failed", stage="probe", format=fmt,
                           error=_short(str(exc)))
    return ProbeRecord(**base, **ident, status="ok", format=fmt, sample_rate=info.sample_rate,
                       channels=info.channels, duration_s=info.duration_s)


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
            for record in plan.tracks:
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
        "size_bytes": record.size_bytes,
    }
    if record.status != "ok":
        writer.fail_track(row)
        # an unsupported file is recorded, not an error
        return None if record.status == "unsupported" else (record.stage or "probe",
                                                              record.error or record.status)
    started = time.perf_counter()
    stage = "decode"
    try:
        with open_audio(record.uri) as snd:
            writer.begin_track(record.track_id)
            stage = "features"
            result = extract_track(read_blocks(snd), snd.samplerate, config, extractor,
                                   writer.add_batch)
        row |= {
            "status": "ok", "stage": None, "error": None, "duration_s": result.duration_s,
            "peak_dbfs": finite_or_none(result.peak_dbfs),
            "rms_dbfs": finite_or_none(result.rms_dbfs),
            "compute_s": time.perf_counter() - started,
            "processed_at": dt.datetime.now(dt.UTC),
        }
        stage = "write"
        writer.end_track(row, result)
        return None
    except DecodeError as exc:
        error, stage = str(exc), "decode"
    except MemoryError:
        error = "out of memory"
    except Exception as exc:  # a bug or an unforeseen file: recorded, the shard goes on
        error = f"{type(exc).__name__}: {exc} [{_where(exc)}]"
    row |= {"status": "failed", "stage": stage, "error": _short(error),
            "compute_s": time.perf_counter() - started}
    writer.fail_track(row)
    return (stage, row["error"])


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
