"""Store layout, snapshots and commits: where every file of a feature store lives.

Layout under the store root (a local folder or an fsspec URL such as ``s3://bucket/store``)::

    store.json                                  format marker (format 2: Delta tables)
    sources/                                    Delta: URI -> size, mtime, content hash (log)
    features/<fs-id>/featureset.json            config, code version, columns, shapes
    features/<fs-id>/tracks/                    Delta: one row per track
    features/<fs-id>/segments/                  Delta: one row per (track, segment)
    features/<fs-id>/tensors/<shard>-<n>.arrow  dense tensors, named by the segments rows
    scores/, neighbours/                        score tables (featurestore/scores.py)
    _locks/                                     the commit lease and commit intents
    _staging/                                   scratch space of running tasks, never read

Write, then commit: workers write a shard's tensors file and its ``tracks`` and ``segments``
Parquet files straight into place; :meth:`FeatureStore.commit_shards` commits a group of
shards as two Delta transactions (segments, then tracks), under the store's commit lease
(:mod:`featurestore.lease`), after dropping tracks another writer committed first, so every
track is in the tables once however many writers run. A shard counts once its ``tracks`` rows
are committed: what is ingested is read from the ``tracks`` snapshot (a checkpoint and a few
log entries), never from one file per shard; a crash between the two transactions leaves an
intent record that :meth:`FeatureStore.recover` resolves by deleting the orphan segments.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from featurestore import records, tables
from featurestore.schema import SOURCES_SCHEMA, TRACKS_SCHEMA, segments_schema
from featurestore.tables import DataFile
from tasks.columns import summary_columns
from tasks.config import FeatureConfig
from tasks.errors import StoreError
from tasks.faults import failpoint
from tasks.version import CODE_VERSION

STORE_FORMAT = 2
"""1: one folder per shard with JSON commit records; 2: Delta tables (``mtag migrate``)."""
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
    """A committed shard, as the ``tracks`` snapshot describes it."""

    shard_id: str
    feature_set: str
    counts: ShardCounts
    tensor_file: str | None = None
    code_version: str = CODE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (the counts beside the ids)."""
        data = asdict(self)
        return data | data.pop("counts")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardManifest:
        """Inverse of :meth:`to_dict`."""
        names = set(ShardCounts.__dataclass_fields__)
        counts = ShardCounts(**{k: v for k, v in data.items() if k in names})
        return cls(counts=counts, **{k: v for k, v in data.items() if k not in names})


@dataclass(frozen=True)
class WrittenShard:
    """What a worker wrote for one shard, not yet committed: its counts, its ``tracks`` and
    ``segments`` data files (in those tables' folders) and its tensors file.
    """

    shard_id: str
    feature_set: str
    counts: ShardCounts
    tracks_file: DataFile
    segments_file: DataFile | None
    tensor_file: str | None  # relative to the feature set's folder


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`FeatureStore.commit_shards` did."""

    committed: list[str]  # shard ids
    dropped_tracks: int  # tracks another writer had committed first
    counts: dict[str, ShardCounts]  # of each committed shard, as committed
    tracks_version: int | None


class FeatureStore:
    """A feature store rooted at a local folder or an fsspec URL.

    Parameters
    ----------
    url : str
        Store root.
    create : bool
        Create the root if missing; otherwise a missing store raises :class:`StoreError`.
    any_format : bool
        Open a store of an older format too (only ``mtag migrate`` does).
    """

    def __init__(self, url: str, *, create: bool = False, any_format: bool = False) -> None:
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
            # another process may be creating this store too: the first marker stays
            self.create_record(marker, {"format": STORE_FORMAT, "created_at": _now()})
        self.format = int(self.read_record(marker).get("format", 1))
        self._ids_by_file: dict[str, dict[str, tuple[frozenset[str], frozenset[str]]]] = {}
        self._ids: dict[str, tuple[set[str], set[str]]] = {}
        if self.format != STORE_FORMAT and not any_format:
            raise StoreError(f"store {url} has format {self.format}; this mtag reads format "
                             f"{STORE_FORMAT} (Delta tables): run `mtag migrate --store {url}` "
                             "once (no audio is decoded again)")

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

    def table_path(self, feature_set: str, table: str) -> str:
        """Folder of a feature set's Delta table (``tracks`` or ``segments``)."""
        return self.path("features", feature_set, table)

    def tensor_path(self, feature_set: str, tensor_file: str) -> str:
        """Path of a tensors file named by a ``tensor_file`` column."""
        return self.path("features", feature_set, tensor_file)

    def new_tensor_file(self, feature_set: str, shard_id: str) -> str:
        """A fresh ``tensor_file`` name for one attempt at a shard."""
        return f"tensors/{shard_id}-{uuid.uuid4().hex[:8]}.arrow"

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
        """Record ``config`` as a feature set and create its tables (idempotent); return its
        id.
        """
        fs_id = config.feature_set_id
        target = self.path("features", fs_id, "featureset.json")
        if not self.fs.exists(target):
            self.create_record(target, {  # a racing writer's record differs only in its time
                "feature_set": fs_id,
                "config": config.to_dict(),
                "code_version": CODE_VERSION,
                "summary_columns": summary_columns(config),
                "shapes": {"logmel": [config.n_mels, config.segment_frames],
                           "mfcc": [config.n_mfcc, config.segment_frames]},
                "created_at": _now(),
            })
        tables.ensure_table(self, self.table_path(fs_id, "tracks"), TRACKS_SCHEMA)
        tables.ensure_table(self, self.table_path(fs_id, "segments"), segments_schema(config))
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

    def has_tracks(self, feature_set: str) -> bool:
        """Whether any track of ``feature_set`` is committed."""
        table = tables.open_table(self, self.table_path(feature_set, "tracks"))
        return table is not None and len(table.file_uris()) > 0

    def default_feature_set(self) -> str:
        """The most recently created feature set that has committed tracks."""
        for record in reversed(self.feature_sets()):
            if self.has_tracks(record["feature_set"]):
                return str(record["feature_set"])
        raise StoreError(f"store {self.url} has no committed features yet")

    # --- snapshots ------------------------------------------------------------------------
    def read(self, feature_set: str, table: str, columns: list[str] | None = None, *,
             filter: Any = None, version: int | str | dt.datetime | None = None,
             shards: Collection[str] | None = None) -> pa.Table:
        """Rows of a feature set's ``tracks`` or ``segments`` snapshot (of ``shards`` only,
        when given: other shards' own files are not opened).
        """
        schema = TRACKS_SCHEMA if table == "tracks" else segments_schema(
            self.config(feature_set))
        keep = None
        if shards is not None:
            where = ds.field("shard").isin(sorted(shards))
            filter = where if filter is None else filter & where
            keep = tables.shard_file_filter(shards)
        return tables.read_snapshot(self, self.table_path(feature_set, table), columns,
                                    filter, version, schema=schema, keep_file=keep)

    def files(self, feature_set: str, table: str,
              version: int | str | dt.datetime | None = None) -> list[str]:
        """URIs of the snapshot's files: the Parquet files of ``tracks``/``segments``, or the
        tensors files (``tensors``) its segment rows name, by shard.
        """
        if table == "tensors":
            rows = self.read(feature_set, "segments", ["shard", "tensor_file"],
                             version=version)
            named = sorted(set(zip(rows["shard"].to_pylist(), rows["tensor_file"].to_pylist(),
                                   strict=True)))
            return [self.tensor_path(feature_set, f) for _, f in named if f]
        return tables.file_uris(self, self.table_path(feature_set, table), version)

    def table_versions(self, feature_set: str) -> dict[str, int | None]:
        """Current versions of the feature set's tables (recorded by training for lineage)."""
        return {t: tables.version_of(self, self.table_path(feature_set, t))
                for t in ("tracks", "segments")}

    def versions_as_of(self, feature_set: str, as_of: str | int | dict[str, int] | None = None
                       ) -> dict[str, int]:
        """The versions of ``tracks`` and ``segments`` a training set reads.

        Parameters
        ----------
        as_of : str, int or dict, optional
            None: the current versions. A ``tracks`` version (``12``): that one, with the
            ``segments`` version current when it was committed. An ISO timestamp: both
            tables as they were then. A dict: those versions.

        Raises
        ------
        StoreError
            If the tables have no such version (vacuumed, or not yet written).
        """
        if isinstance(as_of, dict):
            return {k: int(v) for k, v in as_of.items()}
        if as_of is None:
            return {k: int(v or 0) for k, v in self.table_versions(feature_set).items()}
        text = str(as_of).strip()
        when: str | dt.datetime = text
        if text.isdigit():
            tracks = tables.open_table(self, self.table_path(feature_set, "tracks"))
            stamp = next((h["timestamp"] for h in (tracks.history() if tracks else [])
                          if h["version"] == int(text)), None)
            if stamp is None:
                raise StoreError(f"feature set {feature_set}'s tracks table has no version "
                                 f"{text} (or its log entry was cleaned up)")
            when = dt.datetime.fromtimestamp(stamp / 1000 + 0.001, dt.UTC)
        if isinstance(when, str):
            try:
                when = dt.datetime.fromisoformat(when)
            except ValueError as exc:
                raise StoreError(f"--as-of {text!r} is neither a table version nor an ISO "
                                 "timestamp") from exc
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
        limit = when.timestamp() * 1000
        out: dict[str, int] = {}
        for name in ("tracks", "segments"):
            # by the commits' own timestamps, never by log file times (a file written under
            # load can carry a later mtime than its commit)
            table = tables.open_table(self, self.table_path(feature_set, name))
            if table is None:
                raise StoreError(f"feature set {feature_set} has no {name} table")
            if text.isdigit() and name == "tracks":
                out[name] = int(text)
                continue
            found = [h["version"] for h in table.history() if h["timestamp"] <= limit]
            if not found:
                raise StoreError(f"feature set {feature_set}'s {name} table has no version "
                                 f"as of {when.isoformat()}")
            out[name] = int(max(found))
        return out

    def pin(self, feature_set: str, versions: dict[str, int], reason: str) -> None:
        """Keep the ``tracks``/``segments`` versions a training set read (``reason``: the
        registered model) through every vacuum, so it can be rebuilt (``mtag train --as-of``).
        """
        self.write_record(self.path("_pins", f"{uuid.uuid4().hex}.json"), {
            "feature_set": feature_set, "reason": reason, "created_at": _now(),
            "tables": {self.table_path(feature_set, t): int(v) for t, v in versions.items()}})

    def pins(self) -> dict[str, list[int]]:
        """Pinned versions by table folder."""
        out: dict[str, set[int]] = {}
        for path in self.fs.glob(self.path("_pins", "*.json")):
            for table, version in self.read_record(path)["tables"].items():
                out.setdefault(table, set()).add(int(version))
        return {k: sorted(v) for k, v in out.items()}

    def manifests(self, feature_set: str, version: int | str | dt.datetime | None = None
                  ) -> list[ShardManifest]:
        """Every committed shard of ``feature_set`` with its counts, by shard id."""
        rows = self.read(feature_set, "tracks", ["shard", "track_id", "status", "n_segments",
                                                 "duration_s", "tensor_file"], version=version)
        if rows.num_rows == 0:
            return []
        rows = rows.sort_by([("shard", "ascending"), ("track_id", "ascending")])
        out = []
        shard = rows["shard"].to_numpy(zero_copy_only=False)
        cuts = [0, *(np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist(), len(shard)]
        ids = rows["track_id"].to_pylist()
        ok = pc.equal(rows["status"], "ok").to_numpy(zero_copy_only=False)
        n_seg = rows["n_segments"].fill_null(0).to_numpy()
        dur = pc.if_else(pc.equal(rows["status"], "ok"), rows["duration_s"], 0.0).fill_null(
            0.0).to_numpy()
        tensor = rows["tensor_file"].to_pylist()
        for a, b in itertools.pairwise(cuts):
            counts = ShardCounts(n_tracks=b - a, n_ok=int(ok[a:b].sum()),
                                 n_failed=int((~ok[a:b]).sum()),
                                 n_segments=int(n_seg[a:b].sum()),
                                 audio_s=float(dur[a:b].sum()), track_ids=ids[a:b])
            out.append(ShardManifest(str(shard[a]), feature_set, counts,
                                     next((t for t in tensor[a:b] if t), None)))
        return out

    def committed_track_ids(self, feature_set: str) -> set[str]:
        """Ids of every track committed in ``feature_set`` for good: ok, unsupported, or
        failed in a way the next run does not try again (see :meth:`retry_track_ids`).

        Kept per data file for the life of this object, so a writer that commits again reads
        only the files committed since its last look (a commit costs what is new, not what
        the store holds); files a compaction or a repair replaced drop out exactly.
        """
        return set(self._committed_ids(feature_set)[0])

    def retry_track_ids(self, feature_set: str) -> set[str]:
        """Ids of committed tracks whose failure was transient (``retry``: the file was gone,
        unreadable, changed while read, or ran past its time limit): the next run tries them
        again, and their new row replaces the old.
        """
        return set(self._committed_ids(feature_set)[1])

    def track_ids(self, feature_set: str) -> tuple[set[str], set[str]]:
        """:meth:`committed_track_ids` and :meth:`retry_track_ids` from one look at the log."""
        final, retry = self._committed_ids(feature_set)
        return set(final), set(retry)

    def _committed_ids(self, feature_set: str) -> tuple[set[str], set[str]]:
        table = tables.open_table(self, self.table_path(feature_set, "tracks"))
        if table is None:
            return set(), set()
        cache = self._ids_by_file.setdefault(feature_set, {})
        final, retry = self._ids.setdefault(feature_set, (set(), set()))
        current = [str(p) for p in pa.table(table.get_add_actions(flatten=True))["path"]
                   .to_pylist()]
        gone = set(cache) - set(current)
        for path in gone:
            del cache[path]
        if gone:  # a compaction, a repair or a retirement replaced files: count again
            final.clear()
            retry.clear()
            for ids, again in cache.values():
                final.update(ids)
                retry.update(again)
        folder = self.table_path(feature_set, "tracks")
        for path in current:
            if path not in cache:
                with self.fs.open(f"{folder}/{path}", "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    cols = [c for c in ("track_id", "retry") if c in pf.schema_arrow.names]
                    rows = pf.read(columns=cols)
                again_mask = (rows["retry"].fill_null(False) if "retry" in cols
                              else pa.array([False] * rows.num_rows))
                ids = rows["track_id"].cast(pa.string())  # a compaction writes string_view
                again = frozenset(ids.filter(again_mask).to_pylist())
                cache[path] = (frozenset(ids.filter(pc.invert(again_mask)).to_pylist()), again)
                final.update(cache[path][0])
                retry.update(again)
        return final, retry - final

    def delete_tracks(self, table_path: str, track_ids: list[str], *,
                      retry_only: bool = False, metadata: dict[str, Any] | None = None) -> int:
        """Delete the rows of ``track_ids`` from one Delta table (one transaction; the rows
        stay reachable through earlier versions until vacuumed); return how many went.
        ``retry_only``: only rows of transient failures. Call with the commit lease held.
        """
        table = tables.open_table(self, table_path)
        if table is None or not track_ids:
            return 0
        from deltalake import CommitProperties

        gone = 0
        ids = sorted(set(track_ids))
        for i in range(0, len(ids), 5000):
            quoted = ", ".join("'" + t.replace("'", "''") + "'" for t in ids[i:i + 5000])
            predicate = f"track_id IN ({quoted})" + (" AND retry = true" if retry_only else "")
            custom = {k: v if isinstance(v, str) else json.dumps(v)
                      for k, v in (metadata or {}).items()}
            done = table.delete(predicate,
                                commit_properties=CommitProperties(custom_metadata=custom))
            gone += int(done.get("num_deleted_rows") or 0)
        return gone

    # --- commits --------------------------------------------------------------------------
    def commit_lease(self, **kwargs: Any) -> Any:
        """The store's commit lease (:class:`featurestore.lease.CommitLease`), not yet held."""
        from featurestore.lease import CommitLease

        return CommitLease(self, **kwargs)

    def staging_dir(self, *parts: str) -> str:
        """A fresh scratch folder for one attempt at a task (``parts`` name its area)."""
        path = self.path("_staging", *parts[:-1], f"{parts[-1]}-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(path, exist_ok=True)
        return path

    def commit_shards(self, written: list[WrittenShard], *, run: str | None = None
                      ) -> CommitResult:
        """Commit written shards of one feature set: segments first, then tracks, under the
        commit lease; tracks another writer committed meanwhile are left out (their files are
        rewritten without them), so no track is ever in the tables twice.
        """
        if not written:
            return CommitResult([], 0, {}, None)
        fs_id = written[0].feature_set
        with self.commit_lease() as lease:
            self.resolve_intents()
            done, again = self.track_ids(fs_id)
            keep, dropped = [], 0
            for w in written:
                fresh = [t for t in w.counts.track_ids if t not in done]
                dropped += len(w.counts.track_ids) - len(fresh)
                if fresh:
                    keep.append(w if len(fresh) == len(w.counts.track_ids) else
                                self._without(w, set(fresh)))
                done.update(fresh)
            if not keep:
                return CommitResult([], dropped, {}, tables.version_of(
                    self, self.table_path(fs_id, "tracks")))
            shards = [w.shard_id for w in keep]
            redone = sorted(again & {t for w in keep for t in w.counts.track_ids})
            if redone:  # this run's rows of a transient failure replace the old rows
                lease.check()
                self.delete_tracks(self.table_path(fs_id, "tracks"), redone, retry_only=True,
                                   metadata={"mtag.operation": "retry", "mtag.run": run or ""})
            version = self.commit_pair(
                lease, shards,
                first=(self.table_path(fs_id, "segments"),
                       [w.segments_file for w in keep if w.segments_file],
                       segments_schema(self.config(fs_id))),
                last=(self.table_path(fs_id, "tracks"), [w.tracks_file for w in keep],
                      TRACKS_SCHEMA),
                metadata={"mtag.operation": "ingest", "mtag.run": run or ""})
        return CommitResult(shards, dropped, {w.shard_id: w.counts for w in keep}, version)

    def _without(self, w: WrittenShard, keep: set[str]) -> WrittenShard:
        """``w`` rewritten with only the tracks in ``keep`` (rare: two writers raced)."""

        def rewrite(table: str, f: DataFile) -> tuple[DataFile, pa.Table]:
            folder = self.table_path(w.feature_set, table)
            with self.fs.open(f"{folder}/{f.path}", "rb") as fh:
                rows = pq.read_table(fh)
            rows = rows.filter(pc.is_in(rows["track_id"], pa.array(sorted(keep))))
            self.fs.rm(f"{folder}/{f.path}")
            return tables.write_data_file(self, folder, rows, prefix=f"{w.shard_id}-r"), rows

        tracks_file, kept = rewrite("tracks", w.tracks_file)
        segments_file = rewrite("segments", w.segments_file)[0] if w.segments_file else None
        ok = pc.equal(kept["status"], "ok")
        counts = ShardCounts(
            n_tracks=kept.num_rows, n_ok=int(pc.sum(ok).as_py() or 0),
            n_failed=kept.num_rows - int(pc.sum(ok).as_py() or 0),
            n_segments=segments_file.rows if segments_file else 0,
            audio_s=float(pc.sum(kept.filter(ok)["duration_s"]).as_py() or 0.0),
            track_ids=[t for t in w.counts.track_ids if t in keep])
        return WrittenShard(w.shard_id, w.feature_set, counts, tracks_file, segments_file,
                            w.tensor_file)

    def commit_pair(self, lease: Any, shards: list[str], *,
                    first: tuple[str, list[DataFile], pa.Schema],
                    last: tuple[str, list[DataFile], pa.Schema],
                    metadata: dict[str, Any]) -> int:
        """Commit files to two tables that belong together (``first``, then ``last``, each a
        ``(table folder, files, schema)``), held by ``lease``; return ``last``'s new version.

        ``last`` is the table that says a shard is done (``tracks``, ``scores``). An intent
        record written before and removed after names the shards, so a crash between the two
        transactions is rolled back by :meth:`recover` (``first``'s rows of shards ``last``
        lacks are deleted): no reader is left with half a group twice.
        """
        meta = metadata | {"mtag.shards": shards, "mtag.code_version": CODE_VERSION}
        intent = self.path("_locks", f"intent-{uuid.uuid4().hex}.json")
        self.write_record(intent, {"check": last[0], "rollback": first[0], "shards": shards,
                                   "created_at": _now()})
        failpoint("commit.first")
        lease.check()
        tables.commit_files(self, first[0], first[1], first[2], metadata=meta)
        failpoint("commit.between")
        lease.check()
        version = tables.commit_files(self, last[0], last[1], last[2], metadata=meta)
        failpoint("commit.last")
        self.fs.rm(intent)
        return version

    def resolve_intents(self) -> int:
        """Roll back groups whose second transaction never happened (see :meth:`commit_pair`;
        call with the commit lease held); return how many shards were rolled back.
        """
        rolled = 0
        for path in self.fs.glob(self.path("_locks", "intent-*.json")):
            intent = self.read_record(path)
            if intent.get("kind") == "retire":  # finish what a crashed retirement began
                for table in intent["tables"]:
                    self.delete_tracks(table, intent["track_ids"],
                                       metadata={"mtag.operation": "retire:recovered"})
                self.fs.rm(path)
                continue
            shards = list(intent["shards"])
            have = set(tables.read_snapshot(self, intent["check"], ["shard"],
                                            filter=ds.field("shard").isin(shards))
                       .column("shard").to_pylist()) if shards else set()
            orphans = [s for s in shards if s not in have]
            table = tables.open_table(self, intent["rollback"]) if orphans else None
            if table is not None:
                quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in orphans)
                table.delete(f"shard IN ({quoted})")
            rolled += len(orphans)
            self.fs.rm(path)
        return rolled

    def recover(self) -> int:
        """Roll back half-committed shard groups (under the lease); return how many shards.

        Data files no commit names, tensors files no row names and scratch folders of killed
        tasks are left to :func:`featurestore.maintenance.compact`, which deletes them once
        older than its retention: another writer may be about to commit them.
        """
        if not self.fs.glob(self.path("_locks", "intent-*.json")):
            return 0
        with self.commit_lease():
            return self.resolve_intents()

    # --- sources (identity cache) ---------------------------------------------------------
    def known_sources(self) -> dict[str, tuple[int, float, str]]:
        """Latest ``uri -> (size, mtime, content_hash)`` recorded by earlier runs, for every
        URI whose latest record does not say it is gone.
        """
        rows = tables.read_snapshot(self, self.path("sources"),
                                    ["uri", "size_bytes", "mtime", "content_hash", "seen_at",
                                     "status"], schema=SOURCES_SCHEMA)
        rows = rows.sort_by("seen_at")
        out: dict[str, tuple[int, float, str]] = {}
        for u, s, m, h, st in zip(rows["uri"].to_pylist(), rows["size_bytes"].to_pylist(),
                                  rows["mtime"].to_pylist(), rows["content_hash"].to_pylist(),
                                  rows["status"].to_pylist(), strict=True):
            if st == "gone":
                out.pop(u, None)
            elif h is not None:
                out[u] = (s, m, h)
        return out

    def record_sources(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (see :data:`featurestore.schema.SOURCES_SCHEMA`) to ``sources``
        (appends commute: no lease needed).
        """
        if not rows:
            return
        from deltalake import write_deltalake

        now = dt.datetime.now(dt.UTC)
        tables.ensure_table(self, self.path("sources"), SOURCES_SCHEMA)
        table = pa.Table.from_pylist([r | {"seen_at": now} for r in rows], schema=SOURCES_SCHEMA)
        write_deltalake(tables.table_uri(self, self.path("sources")), table, mode="append",
                        storage_options=tables.storage_options(self))

    def source_files(self) -> list[str]:
        """URIs of the ``sources`` snapshot's files."""
        return tables.file_uris(self, self.path("sources"))

    # --- records --------------------------------------------------------------------------
    def write_record(self, path: str, data: dict[str, Any]) -> None:
        """Write a JSON record; readers see the old or the new one whole
        (:func:`featurestore.records.put`).
        """
        records.put(self.fs, path, _json(data))

    def create_record(self, path: str, data: dict[str, Any]) -> bool:
        """Write a JSON record unless one exists; ``True`` if this call wrote it
        (:func:`featurestore.records.put_if_absent`).
        """
        return records.put_if_absent(self.fs, path, _json(data))

    def read_record(self, path: str) -> dict[str, Any]:
        """Read a JSON record in one request (safe while another writer replaces it).

        Raises
        ------
        StoreError
            If the file is not a JSON object (damaged), naming the file.
        """
        raw = records.get(self.fs, path)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"damaged store record {self.uri(path)}: {exc}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"damaged store record {self.uri(path)}: not a JSON object")
        return data


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
