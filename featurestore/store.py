"""Store layout, commits and recovery: where every file of a feature store lives.

Layout under the store root (a local folder or an fsspec URL such as ``s3://bucket/store``)::

    store.json                                  format marker
    sources/part-<run>.parquet                  URI -> size, mtime, content hash (append-only)
    features/<fs-id>/featureset.json            config, code version, columns, shapes
    features/<fs-id>/shards/<shard>/tracks.parquet
    features/<fs-id>/shards/<shard>/segments.parquet
    features/<fs-id>/shards/<shard>/tensors.arrow
    features/<fs-id>/_manifests/<shard>.json    the commit record, written last
    _staging/<fs-id>/<shard>-<nonce>/           work in progress, never read

Stage, then commit: workers write a whole shard under ``_staging``; :meth:`FeatureStore.commit`
moves it into ``shards/`` (one atomic rename on a local disk) and then writes its manifest. A
shard counts only once its manifest exists; :meth:`FeatureStore.recover` deletes everything
else, so a crash at any moment leaves no partial shard visible and no duplicate rows.
One writer per store at a time (:meth:`FeatureStore.lock`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from featurestore.schema import SOURCES_SCHEMA
from tasks.config import FeatureConfig
from tasks.errors import StoreError
from tasks.track import summary_columns
from tasks.version import CODE_VERSION

STORE_FORMAT = 1
_FILENAMES = {"tracks": "tracks.parquet", "segments": "segments.parquet",
              "tensors": "tensors.arrow"}
MLFLOW_DIR = "mlflow"
"""Folder of the embedded MLflow tracking database and artifacts under a local store."""


def mlflow_db_path(root: str) -> str:
    """The embedded MLflow SQLite file of the (local) store at ``root``."""
    return os.path.join(os.path.abspath(root), MLFLOW_DIR, "mlflow.db")


@dataclass(frozen=True)
class ShardCounts:
    """What a shard holds: the one declaration the writer, the task result and the commit
    record share.
    """

    n_tracks: int
    n_ok: int
    n_failed: int
    n_segments: int
    audio_s: float
    track_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShardManifest:
    """The commit record of one shard (stored flat: the counts beside the ids)."""

    shard_id: str
    feature_set: str
    counts: ShardCounts
    committed_at: str = ""
    code_version: str = CODE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        data = asdict(self)
        return data | data.pop("counts")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardManifest:
        """Inverse of :meth:`to_dict`."""
        names = set(ShardCounts.__dataclass_fields__)
        counts = ShardCounts(**{k: v for k, v in data.items() if k in names})
        return cls(counts=counts, **{k: v for k, v in data.items() if k not in names})


class FeatureStore:
    """A feature store rooted at a local folder or an fsspec URL.

    Parameters
    ----------
    url : str
        Store root.
    create : bool
        Create the root if missing; otherwise a missing store raises :class:`StoreError`.
    """

    def __init__(self, url: str, *, create: bool = False) -> None:
        self.url = url.rstrip("/")
        # other processes (Dask workers) write here: never answer from a stale listing
        self.fs, self.root = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)
        marker = self.path("store.json")
        if not self.fs.exists(marker):
            if not create:
                raise StoreError(f"no feature store at {url} (run `mtag ingest` first)")
            self.fs.makedirs(self.root, exist_ok=True)
            self.write_record(marker, {"format": STORE_FORMAT, "created_at": _now()})

    # --- paths ----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Path of ``parts`` under the root, in the filesystem's own notation."""
        return "/".join([self.root, *parts])

    def uri(self, path: str) -> str:
        """A path as URI for external readers (plain path when local)."""
        if self.is_local:
            return path
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return f"{protocol}://{path}"

    def shard_file(self, feature_set: str, shard_id: str, table: str) -> str:
        """Path of a committed shard's file for ``table``."""
        return self.path("features", feature_set, "shards", shard_id, _FILENAMES[table])

    def mlflow_dir(self) -> str:
        """Folder of the embedded MLflow database and artifacts (:data:`MLFLOW_DIR`)."""
        return self.path(MLFLOW_DIR)

    def mlflow_db(self) -> str:
        """The embedded MLflow SQLite file (local stores only)."""
        if not self.is_local:
            raise StoreError(f"store {self.url} is on an object store: it has no embedded "
                             "MLflow database; set MLFLOW_TRACKING_URI")
        return mlflow_db_path(self.root)

    # --- feature sets ---------------------------------------------------------------------
    def register_feature_set(self, config: FeatureConfig) -> str:
        """Record ``config`` as a feature set (idempotent) and return its id."""
        fs_id = config.feature_set_id
        target = self.path("features", fs_id, "featureset.json")
        if not self.fs.exists(target):
            self.write_record(target, {
                "feature_set": fs_id,
                "config": config.to_dict(),
                "code_version": CODE_VERSION,
                "summary_columns": summary_columns(config),
                "shapes": {"logmel": [config.n_mels, config.segment_frames],
                           "mfcc": [config.n_mfcc, config.segment_frames]},
                "created_at": _now(),
            })
        return fs_id

    def feature_sets(self) -> list[dict[str, Any]]:
        """Every registered feature set's record, oldest first."""
        records = [self.read_record(p) for p in self.fs.glob(self.path("features", "*",
                                                                        "featureset.json"))]
        return sorted(records, key=lambda r: r["created_at"])

    def config(self, feature_set: str) -> FeatureConfig:
        """The :class:`FeatureConfig` of a registered feature set."""
        target = self.path("features", feature_set, "featureset.json")
        if not self.fs.exists(target):
            raise StoreError(f"feature set {feature_set} is not in store {self.url}")
        return FeatureConfig.from_dict(self.read_record(target)["config"])

    def default_feature_set(self) -> str:
        """The most recently created feature set that has committed shards."""
        for record in reversed(self.feature_sets()):
            if self.manifests(record["feature_set"]):
                return str(record["feature_set"])
        raise StoreError(f"store {self.url} has no committed features yet")

    # --- commits --------------------------------------------------------------------------
    def staging_dir(self, *parts: str) -> str:
        """A fresh staging folder for one attempt at a shard (``parts`` name its area)."""
        path = self.path("_staging", *parts[:-1], f"{parts[-1]}-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(path, exist_ok=True)
        return path

    def manifests(self, feature_set: str) -> list[ShardManifest]:
        """Manifests of every committed shard of ``feature_set``, by shard id."""
        paths = self.fs.glob(self.path("features", feature_set, "_manifests", "*.json"))
        return [ShardManifest.from_dict(self.read_record(p)) for p in sorted(paths)]

    def committed_track_ids(self, feature_set: str) -> set[str]:
        """Ids of every track (ok or failed) in a committed shard of ``feature_set``."""
        return {t for m in self.manifests(feature_set) for t in m.counts.track_ids}

    def commit(self, staged_dir: str, manifest: ShardManifest) -> bool:
        """Publish a staged shard: move it into place, then write its manifest.

        Returns
        -------
        bool
            ``False`` if the shard was already committed (the staged copy is discarded).
        """
        fs_id, shard = manifest.feature_set, manifest.shard_id
        return self.commit_folder(staged_dir, self.path("features", fs_id, "shards", shard),
                            self.path("features", fs_id, "_manifests", f"{shard}.json"),
                            manifest.to_dict())

    def commit_folder(self, staged_dir: str, final: str, record: str, data: dict[str, Any]
                      ) -> bool:
        """Move a staged folder to ``final``, then write the commit record ``record``.

        The record is written last, so readers that go by records never see a partial folder;
        a crash between the two leaves an orphan that :meth:`recover` (or the next commit)
        removes.

        Returns
        -------
        bool
            ``False`` if ``record`` already existed (the staged copy is discarded).
        """
        if self.fs.exists(record):
            self.fs.rm(staged_dir, recursive=True)
            return False
        if self.fs.exists(final):  # left by a crash between move and record
            self.fs.rm(final, recursive=True)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            os.rename(staged_dir, final)
        else:  # object stores have no folders and no rename: copy each object, then delete
            for path in self.fs.find(staged_dir):
                self.fs.copy(path, f"{final}/{path[len(staged_dir):].lstrip('/')}")
            self.fs.rm(staged_dir, recursive=True)
        self.write_record(record, data | {"committed_at": _now()})
        return True

    def recover(self) -> int:
        """Delete staging leftovers and shard folders that have no manifest.

        Returns
        -------
        int
            Number of folders removed.
        """
        removed = 0
        staging = self.path("_staging")
        if self.fs.exists(staging):
            removed += len(self.fs.ls(staging))
            self.fs.rm(staging, recursive=True)
        for record in self.feature_sets():
            fs_id = record["feature_set"]
            committed = {m.shard_id for m in self.manifests(fs_id)}
            for shard_dir in self.fs.glob(self.path("features", fs_id, "shards", "*")):
                if os.path.basename(shard_dir.rstrip("/")) not in committed:
                    self.fs.rm(shard_dir, recursive=True)
                    removed += 1
        return removed

    def files(self, feature_set: str, table: str) -> list[str]:
        """Paths of ``table``'s files in committed shards of ``feature_set``."""
        return [self.shard_file(feature_set, m.shard_id, table)
                for m in self.manifests(feature_set)]

    # --- sources (identity cache) ---------------------------------------------------------
    def source_files(self) -> list[str]:
        """The ``sources`` log's files, oldest first."""
        return sorted(self.fs.glob(self.path("sources", "*.parquet")))

    def known_sources(self) -> dict[str, tuple[int, float, str]]:
        """Latest ``uri -> (size, mtime, content_hash)`` recorded by earlier runs."""
        paths = self.source_files()
        known: dict[str, tuple[int, float, str]] = {}
        for p in paths:
            with self.fs.open(p, "rb") as fh:
                table = pq.read_table(fh, columns=["uri", "size_bytes", "mtime",
                                                   "content_hash"])
            for uri, size, mtime, digest in zip(*(table[c].to_pylist() for c in table.column_names),
                                                strict=True):
                if digest:
                    known[uri] = (size, mtime, digest)
        return known

    def record_sources(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (see :data:`featurestore.schema.SOURCES_SCHEMA`) to ``sources``."""
        if not rows:
            return
        now = dt.datetime.now(dt.UTC)
        table = pa.Table.from_pylist([r | {"seen_at": now} for r in rows], schema=SOURCES_SCHEMA)
        target = self.path("sources", f"part-{_stamp()}-{uuid.uuid4().hex[:6]}.parquet")
        self.fs.makedirs(self.path("sources"), exist_ok=True)
        tmp = target + ".tmp"
        with self.fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh)
        self.fs.mv(tmp, target)

    # --- single writer --------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's writer lock; a live holder on this host makes this raise.

        Raises
        ------
        StoreError
            If another live process on this host holds the lock.
        """
        target = self.path("_lock.json")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        if self.fs.exists(target):
            holder = self.read_record(target)
            mine = holder.get("host") == me["host"] and holder.get("pid") == me["pid"]
            if mine:  # re-entrant: a flow of this process already holds it (e.g. score ->
                yield  # ingest); the outermost holder releases it
                return
            if holder.get("host") == me["host"] and _alive(int(holder.get("pid", -1))):
                raise StoreError(
                    f"store {self.url} is being written by pid {holder['pid']} since "
                    f"{holder.get('since')}; wait for it or stop it"
                )
        self.write_record(target, me)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(target)

    # --- records --------------------------------------------------------------------------
    def write_record(self, path: str, data: dict[str, Any]) -> None:
        """Write a JSON record atomically (temporary file, then a move)."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:6]}.tmp"
        with self.fs.open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        self.fs.mv(tmp, path)

    def read_record(self, path: str) -> dict[str, Any]:
        """Read a JSON record.

        Raises
        ------
        StoreError
            If the file is not a JSON object (damaged), naming the file.
        """
        with self.fs.open(path, "r") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise StoreError(f"damaged store record {self.uri(path)}: {exc}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"damaged store record {self.uri(path)}: not a JSON object")
        return data


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
