"""``mtag migrate``: turn a format-1 store (one folder per shard) into format 2 (Delta tables).

No audio is decoded and no tensor is rewritten: the migration moves files and rewrites the
small tables.

What it does, in this order
---------------------------
1. **Reset.** The store still says ``{"format": 1}``, so whatever format-2 data is there was
   written by an earlier, interrupted migration: the format-2 tables (``features/<fs>/tracks``
   and ``segments``, the ``sources`` Delta log and its ``migrated-*`` files, the score and
   neighbours tables), commit intents and ``_migrate/`` are deleted, and ``current.json``
   records it had rewritten are restored from their backups. Tensors files already in place
   are kept (placing one is idempotent).
2. **Plan.** Every committed format-1 shard (``features/<fs>/_manifests/<shard>.json``), score
   part (``scores/<m>/v<n>/_manifests/<part>.json``) and neighbours run (``current.json``) is
   listed and its record checked; shard folders, score parts and runs without a record and
   ``_staging`` are uncommitted leftovers: counted, not migrated, deleted at the end.
3. **Features.** Per committed shard its ``tensors.arrow`` becomes
   ``features/<fs>/tensors/<shard>-v1.arrow`` (a hard link on a local disk, or a rename
   where links are not supported; a server-side copy on an object store; the old name goes
   with the cleanup), its ``tracks`` rows gain
   ``tensor_file`` and its ``segments`` rows ``shard``, ``tensor_file`` and ``tensor_row`` (the
   row of that ``(track_id, segment)`` in the tensors file, read from the file's ``track_id``
   and ``segment`` columns only). Shards are committed in groups of :data:`GROUP_SHARDS`: one
   data file per table and group, segments then tracks
   (:meth:`~featurestore.store.FeatureStore.commit_pair`), so 60,000 shards make a few hundred
   commits.
4. **Sources.** Every ``sources/part-*.parquet`` row (``seen_at`` kept) in one append to the
   ``sources`` Delta table, written beside the old files under the name ``migrated-*``.
5. **Scores and neighbours.** Every committed part of every model version goes into the
   version's ``scores`` and ``segment_scores`` tables (in groups), each row given the
   ``shard`` of its track in the model's feature set; the current neighbours run's parts go
   into the version's ``neighbours`` table and its ``current.json`` is rewritten (backed up
   first) to name the table's file and, if the run was current in format 1, the format-2
   ``source_digest`` (a hash of the scored shard ids), so it stays current.
6. **Verify, switch, clean up.** The committed tables are counted against what was read;
   ``_migrate/cleanup.json`` lists every format-1 path to delete; ``store.json`` becomes
   ``{"format": 2, ...}`` with a ``migration_cleanup`` key (the switch: written after every
   commit). Only then are the old files deleted, and the key is dropped last.

A crash at any point is safe: before the switch a re-run resets and starts over (the format-1
data is all still there); after it a re-run finishes the cleanup from its record. A store at
format 2 is left as it is. The whole run holds the store's commit lease, so two migrations
never interleave; no other mtag process may use the store while it runs (format 1 ones would
not see the new tables, format 2 ones cannot open the store before the switch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from featurestore import tables
from featurestore.neighbours import NEIGHBOURS_ROW_GROUP, NEIGHBOURS_SCHEMA
from featurestore.schema import SOURCES_SCHEMA, TRACKS_SCHEMA, segments_schema, with_metadata
from featurestore.scores import (
    SCORES_ROW_GROUP,
    SEGMENT_SCORES_ROW_GROUP,
    ScoredModel,
    ScoreStore,
    model_dir_name,
    scores_schema,
    segment_scores_schema,
)
from featurestore.store import STORE_FORMAT, FeatureStore
from featurestore.tables import ROW_GROUP, DataFile
from tasks.config import FeatureConfig
from tasks.errors import StoreError

GROUP_SHARDS = 256
"""Feature shards per commit (one data file per table and group)."""

GROUP_PARTS = 256
"""Score parts per commit."""

IO_WORKERS = 8
"""Threads reading shards and placing tensors files (object stores answer slowly, not
little)."""

MIGRATE_DIR = "_migrate"
"""Work folder of a migration under the store root (deleted at the end)."""

CLEANUP_RECORD = f"{MIGRATE_DIR}/cleanup.json"
"""The format-1 paths a switched store still has to delete."""

PENDING_KEY = "migration_cleanup"
"""Key of ``store.json`` saying that the cleanup of a migration is not finished."""

SOURCES_PREFIX = "migrated"
"""Name prefix of the ``sources`` data files a migration writes (format-1 files are
``part-*.parquet``)."""

BACKUP_NAME = "current-v1.json"
"""Backup of a format-1 ``current.json`` under ``_migrate/neighbours/<m>/v<n>/``."""

KNOWN_FORMATS = (1, 2)

_MANIFEST_INTS = ("n_tracks", "n_ok", "n_failed", "n_segments")


def tensor_file_name(shard_id: str) -> str:
    """The ``tensor_file`` of a migrated shard (relative to its feature set's folder)."""
    return f"tensors/{shard_id}-v1.arrow"


# --- the report -----------------------------------------------------------------------------
@dataclass
class MigrationReport:
    """What :func:`migrate` did (counts of what was migrated, left out and deleted)."""

    url: str
    from_format: int = 1
    already: bool = False  # the store was at format 2: nothing done
    resumed_cleanup: bool = False  # only the cleanup of an earlier, switched migration ran
    feature_sets: int = 0
    shards: int = 0
    tracks: int = 0
    segments: int = 0
    tensor_files: int = 0
    source_rows: int = 0
    score_versions: int = 0
    score_parts: int = 0
    score_rows: int = 0
    segment_score_rows: int = 0
    neighbour_versions: int = 0
    neighbour_rows: int = 0
    stale_neighbours: int = 0  # runs that were not current in format 1 (still not current)
    commits: int = 0
    uncommitted_shards: int = 0
    uncommitted_score_parts: int = 0
    uncommitted_neighbour_runs: int = 0
    staging_entries: int = 0
    duplicate_tracks: int = 0  # a track in two committed shards: kept once
    duplicate_score_parts: int = 0  # a part scoring a shard another part had scored
    unmatched_score_rows: int = 0  # score rows whose track is not in the feature set
    deleted: int = 0  # format-1 paths removed by the cleanup
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    def render(self) -> str:
        """A few lines for the command line."""
        if self.already:
            return f"store {self.url} is already format {STORE_FORMAT}: nothing to migrate"
        if self.resumed_cleanup:
            return (f"store {self.url} was already switched to format {STORE_FORMAT}: "
                    f"finished the cleanup of its migration ({self.deleted} format-1 paths "
                    f"deleted) in {self.seconds:.1f} s")
        lines = [
            f"migrated store {self.url} from format {self.from_format} to format "
            f"{STORE_FORMAT} in {self.seconds:.1f} s (no audio decoded)",
            f"  features:   {self.feature_sets} feature set(s), {self.shards} shards, "
            f"{self.tracks} tracks, {self.segments} segments, {self.tensor_files} tensors "
            "files moved",
            f"  sources:    {self.source_rows} rows",
            f"  scores:     {self.score_versions} model version(s), {self.score_parts} parts, "
            f"{self.score_rows} track rows, {self.segment_score_rows} segment rows",
            f"  neighbours: {self.neighbour_versions} run(s), {self.neighbour_rows} rows"
            + (f" ({self.stale_neighbours} not current: run `mtag neighbours`)"
               if self.stale_neighbours else ""),
            f"  commits:    {self.commits}",
        ]
        left = [(self.uncommitted_shards, "shard folder(s)"),
                (self.uncommitted_score_parts, "score part(s)"),
                (self.uncommitted_neighbour_runs, "neighbours run(s)"),
                (self.staging_entries, "staging folder(s)")]
        if any(n for n, _ in left):
            lines.append("  uncommitted, not migrated (deleted): "
                         + ", ".join(f"{n} {what}" for n, what in left if n))
        dropped = [(self.duplicate_tracks, "track(s) in two shards, kept once"),
                   (self.duplicate_score_parts, "score part(s) of already scored shards"),
                   (self.unmatched_score_rows, "score row(s) of tracks not in the feature "
                                               "set (shard left empty)")]
        if any(n for n, _ in dropped):
            lines.append("  left out: " + "; ".join(f"{n} {what}" for n, what in dropped if n))
        lines.append(f"  deleted:    {self.deleted} format-1 paths")
        return "\n".join(lines)


# --- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardPlan:
    """One committed format-1 shard (its manifest's counts; the track ids are in its files)."""

    shard_id: str
    n_tracks: int
    n_segments: int


@dataclass
class FeatureSetPlan:
    """A feature set's committed shards (by id) and the names of its uncommitted folders."""

    feature_set: str
    config: FeatureConfig
    shards: list[ShardPlan]
    uncommitted: list[str]


@dataclass
class PartPlan:
    """One committed format-1 score part."""

    part_id: str
    shards: list[str]


@dataclass
class ScoreVersionPlan:
    """A scored model version: its folder, record and committed parts."""

    root: str  # scores/<m>/v<n>
    model: ScoredModel
    parts: list[PartPlan]
    uncommitted: list[str]


@dataclass
class NeighboursPlan:
    """A model version's neighbours folder: its current run (if any) and every run folder."""

    root: str  # neighbours/<m>/v<n>
    record: dict[str, Any] | None
    runs: list[str]


@dataclass
class Plan:
    """Everything a migration reads, listed before it writes (see :meth:`Migration.plan`)."""

    feature_sets: list[FeatureSetPlan] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # paths of sources/part-*.parquet
    scores: list[ScoreVersionPlan] = field(default_factory=list)
    neighbours: list[NeighboursPlan] = field(default_factory=list)
    staging: list[str] = field(default_factory=list)  # paths under _staging
    # filled while migrating, checked by Migration.verify
    written: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    table_rows: dict[str, int] = field(default_factory=dict)


# --- entry point ----------------------------------------------------------------------------
def migrate(url: str, *, progress: Callable[[str], None] | None = None) -> MigrationReport:
    """Turn the format-1 store at ``url`` into format 2 (see the module docstring).

    Parameters
    ----------
    url : str
        Store root (a local folder or an fsspec URL).
    progress : callable, optional
        Called with one line of text per step and commit group.

    Returns
    -------
    MigrationReport
        ``already`` is set (and nothing changed) for a store at format 2.

    Raises
    ------
    StoreError
        If there is no store at ``url``, its format is unknown, a record (``store.json``, a
        manifest, ``current.json``, ``model.json``) is damaged (the message names the file),
        a committed shard's files are missing or disagree with its manifest, or the commit
        lease cannot be taken.
    """
    return Migration(url, progress=progress).run()


class Migration:
    """One migration of the store at ``url``; :meth:`run` does every step in order.

    The steps are methods so that a test can stop after any of them (a crash), then run
    :func:`migrate` again.

    Parameters
    ----------
    url : str
    progress : callable, optional
    group_shards, group_parts : int
        Shards (score parts) per commit.
    workers : int
        Threads for per-shard reads and tensors-file placement.
    """

    def __init__(self, url: str, *, progress: Callable[[str], None] | None = None,
                 group_shards: int = GROUP_SHARDS, group_parts: int = GROUP_PARTS,
                 workers: int = IO_WORKERS) -> None:
        try:
            self.store = FeatureStore(url, any_format=True)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"damaged store record {url.rstrip('/')}/store.json: its format "
                             f"is not a number ({exc})") from exc
        self.fs = self.store.fs
        self.progress = progress or (lambda _line: None)
        self.group_shards, self.group_parts = max(1, group_shards), max(1, group_parts)
        self.workers = max(1, workers)
        self.report = MigrationReport(url=self.store.url, from_format=self.store.format)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # --- the whole run ----------------------------------------------------------------------
    def run(self) -> MigrationReport:
        """Run every step (or only the cleanup, or nothing: see :func:`migrate`)."""
        started = time.perf_counter()
        marker = self.read_marker()
        fmt = self.store.format
        if fmt not in KNOWN_FORMATS:
            raise StoreError(f"store {self.store.url} has format {fmt}, which this mtag does "
                             f"not know (it migrates format 1 to {STORE_FORMAT}): is it newer "
                             "than this mtag?")
        if fmt == STORE_FORMAT:
            if PENDING_KEY in marker:
                with self.store.commit_lease():
                    self.cleanup()
                self.report.resumed_cleanup = True
            else:
                self.report.already = True
            self.report.seconds = time.perf_counter() - started
            return self.report
        self.check_format1_lock()
        with self.store.commit_lease() as lease, self._threads():
            self.reset()
            plan = self.plan()
            self.features(plan, lease)
            self.sources(plan, lease)
            self.scores(plan, lease)
            self.neighbours(plan, lease)
            self.verify(plan)
            lease.check()
            self.switch(plan)
            self.cleanup()
        self.report.seconds = time.perf_counter() - started
        self.progress(f"migrated in {self.report.seconds:.1f} s")
        return self.report

    # --- checks -----------------------------------------------------------------------------
    def read_marker(self) -> dict[str, Any]:
        """``store.json`` (its ``format`` is :attr:`FeatureStore.format`)."""
        return self.store.read_record(self.store.path("store.json"))

    def check_format1_lock(self) -> None:
        """Refuse to run while a format-1 writer of this host holds ``_lock.json``.

        Raises
        ------
        StoreError
            If the lock's process is alive.
        """
        target = self.store.path("_lock.json")
        if not self.fs.exists(target):
            return
        holder = self.store.read_record(target)
        try:
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        if holder.get("host") == socket.gethostname() and _alive(pid):
            raise StoreError(f"store {self.store.url} is being written by pid {holder['pid']} "
                             f"(format 1) since {holder.get('since')}; wait for it to finish, "
                             "then run `mtag migrate` again")

    # --- step 1: reset what an interrupted migration wrote ------------------------------------
    def reset(self) -> None:
        """Delete the format-2 data an earlier, interrupted migration of this (still format-1)
        store wrote; restore the ``current.json`` records it had rewritten.
        """
        store, fs = self.store, self.fs
        if store.format != 1:
            raise StoreError(f"reset is for format-1 stores; {store.url} is format "
                             f"{store.format}")
        for backup in fs.glob(store.path(MIGRATE_DIR, "neighbours", "*", "v*", BACKUP_NAME)):
            rel = backup[len(store.path(MIGRATE_DIR)) + 1:].rsplit("/", 1)[0]
            store.write_record(store.path(rel, "current.json"), store.read_record(backup))
        removed = 0
        doomed = [store.path(MIGRATE_DIR), *fs.glob(store.path("_locks", "intent-*.json"))]
        for folder in _subdirs(fs, store.path("features")):
            doomed += [f"{folder}/tracks", f"{folder}/segments",
                       *fs.glob(f"{folder}/tensors/*.tmp")]
        doomed += [store.path("sources", "_delta_log"),
                   *fs.glob(store.path("sources", f"{SOURCES_PREFIX}-*.parquet"))]
        for table in ("scores", "segment_scores"):
            doomed += fs.glob(store.path("scores", "*", "v*", table))
        doomed += fs.glob(store.path("neighbours", "*", "v*", "neighbours"))
        for path in doomed:
            if fs.exists(path):
                fs.rm(path, recursive=True)
                removed += 1
        if removed:
            self.progress(f"removed {removed} paths of an interrupted migration")

    # --- step 2: the plan ------------------------------------------------------------------
    def plan(self) -> Plan:
        """List (and check the records of) everything there is to migrate.

        Raises
        ------
        StoreError
            If a record is damaged (named).
        """
        store, fs = self.store, self.fs
        plan = Plan()
        for folder in sorted(_subdirs(fs, store.path("features"))):
            fs_id = folder.rsplit("/", 1)[1]
            record_path = f"{folder}/featureset.json"
            if not fs.exists(record_path):
                continue
            record = store.read_record(record_path)
            try:
                config = FeatureConfig.from_dict(record["config"])
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreError(f"damaged store record {store.uri(record_path)}: "
                                 f"{exc}") from exc
            manifests = sorted(fs.glob(f"{folder}/_manifests/*.json"))
            shards = [self._shard_plan(p, r, fs_id)
                      for p, r in self._records(manifests).items()]
            shards.sort(key=lambda s: s.shard_id)
            names = {s.shard_id for s in shards}
            folders = [p.rsplit("/", 1)[1] for p in _subdirs(fs, f"{folder}/shards")]
            plan.feature_sets.append(FeatureSetPlan(
                fs_id, config, shards, sorted(n for n in folders if n not in names)))
        plan.sources = sorted(fs.glob(store.path("sources", "part-*.parquet")))
        for record_path in sorted(fs.glob(store.path("scores", "*", "v*", "model.json"))):
            plan.scores.append(self._score_plan(record_path))
        for root in sorted(fs.glob(store.path("neighbours", "*", "v*"))):
            if not fs.isdir(root):
                continue
            current = f"{root}/current.json"
            run = self._neighbours_record(current) if fs.exists(current) else None
            runs = sorted(p.rsplit("/", 1)[1] for p in _subdirs(fs, f"{root}/runs"))
            plan.neighbours.append(NeighboursPlan(root, run, runs))
        if fs.exists(store.path("_staging")):
            plan.staging = sorted(fs.ls(store.path("_staging"), detail=False))
        report = self.report
        report.uncommitted_shards = sum(len(f.uncommitted) for f in plan.feature_sets)
        report.uncommitted_score_parts = sum(len(v.uncommitted) for v in plan.scores)
        report.uncommitted_neighbour_runs = sum(
            len([r for r in n.runs if n.record is None or r != n.record["run_id"]])
            for n in plan.neighbours)
        report.staging_entries = len(plan.staging)
        self.progress(f"planned: {sum(len(f.shards) for f in plan.feature_sets)} shards in "
                      f"{len(plan.feature_sets)} feature set(s), {len(plan.sources)} sources "
                      f"files, {sum(len(v.parts) for v in plan.scores)} score parts, "
                      f"{sum(n.record is not None for n in plan.neighbours)} neighbours runs")
        return plan

    def _records(self, paths: list[str]) -> dict[str, dict[str, Any]]:
        """JSON records of ``paths`` (read many at a time), by path."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(paths), 1000):
            chunk = paths[i:i + 1000]
            raw = self.fs.cat(chunk) if len(chunk) > 1 else {}
            for path in chunk:
                try:
                    data = json.loads(raw[path] if path in raw else self.fs.cat_file(path))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise StoreError(f"damaged manifest {self.store.uri(path)}: {exc}") from exc
                if not isinstance(data, dict):
                    raise StoreError(f"damaged manifest {self.store.uri(path)}: not a JSON "
                                     "object")
                out[path] = data
        return out

    def _shard_plan(self, path: str, data: dict[str, Any], fs_id: str) -> ShardPlan:
        stem = path.rsplit("/", 1)[1][:-len(".json")]
        where = f"damaged manifest {self.store.uri(path)}"
        if data.get("shard_id") != stem:
            raise StoreError(f"{where}: shard_id {data.get('shard_id')!r}, expected {stem!r}")
        if data.get("feature_set", fs_id) != fs_id:
            raise StoreError(f"{where}: feature_set {data.get('feature_set')!r}, expected "
                             f"{fs_id!r}")
        bad = [k for k in _MANIFEST_INTS if not isinstance(data.get(k), int)
               or isinstance(data.get(k), bool) or data[k] < 0]
        if bad:
            raise StoreError(f"{where}: {', '.join(bad)} missing or not a count")
        return ShardPlan(stem, int(data["n_tracks"]), int(data["n_segments"]))

    def _score_plan(self, record_path: str) -> ScoreVersionPlan:
        store, fs = self.store, self.fs
        root = record_path.rsplit("/", 1)[0]
        record = store.read_record(record_path)
        try:
            model = ScoredModel.from_dict(record)
        except TypeError as exc:
            raise StoreError(f"damaged store record {store.uri(record_path)}: {exc}") from exc
        dir_name, version_dir = root.split("/")[-2:]
        if (model_dir_name(model.name), f"v{model.version}") != (dir_name, version_dir):
            raise StoreError(f"damaged store record {store.uri(record_path)}: model "
                             f"{model.name} v{model.version} in folder {dir_name}/{version_dir}")
        parts = []
        for path, data in self._records(sorted(fs.glob(f"{root}/_manifests/*.json"))).items():
            stem = path.rsplit("/", 1)[1][:-len(".json")]
            shards = data.get("shards")
            if data.get("part_id", stem) != stem or not isinstance(shards, list) \
                    or not all(isinstance(s, str) for s in shards):
                raise StoreError(f"damaged manifest {store.uri(path)}: needs part_id {stem!r} "
                                 "and a list of shards")
            parts.append(PartPlan(stem, list(shards)))
        names = {p.part_id for p in parts}
        folders = [p.rsplit("/", 1)[1] for p in _subdirs(fs, f"{root}/parts")]
        return ScoreVersionPlan(root, model, parts, sorted(n for n in folders if n not in names))

    def _neighbours_record(self, path: str) -> dict[str, Any]:
        record = self.store.read_record(path)
        parts = record.get("parts")
        if not isinstance(record.get("run_id"), str) or not isinstance(parts, list) \
                or not all(isinstance(p, str) for p in parts):
            raise StoreError(f"damaged store record {self.store.uri(path)}: needs run_id and a "
                             "list of parts")
        return record

    # --- step 3: features ------------------------------------------------------------------
    def features(self, plan: Plan, lease: Any, *, limit: int | None = None) -> None:
        """Migrate every committed shard, :attr:`group_shards` per commit.

        Parameters
        ----------
        limit : int, optional
            Stop after this many commit groups (tests: an interrupted migration).
        """
        store = self.store
        groups = 0
        for fsp in plan.feature_sets:
            fs_id, config = fsp.feature_set, fsp.config
            seg_schema = _fs_schema(segments_schema(config), config, fs_id)
            tr_schema = _fs_schema(TRACKS_SCHEMA, config, fs_id)
            tracks_path = store.table_path(fs_id, "tracks")
            segments_path = store.table_path(fs_id, "segments")
            tables.ensure_table(store, tracks_path, TRACKS_SCHEMA)
            tables.ensure_table(store, segments_path, seg_schema)
            written = plan.written.setdefault(fs_id, {})
            seen: set[str] = set()
            self.report.feature_sets += 1
            for group in _chunks(fsp.shards, self.group_shards):
                if limit is not None and groups >= limit:
                    return
                ids = []
                with _TableFile(store, segments_path, seg_schema, f"migrate-{group[0].shard_id}",
                                ROW_GROUP) as seg_out, \
                        _TableFile(store, tracks_path, tr_schema, f"migrate-{group[0].shard_id}",
                                   ROW_GROUP) as tr_out:
                    for shard, (tracks, segments, moved) in zip(group, self._map(
                            functools.partial(self._convert_shard, fsp), group), strict=True):
                        ids_here = tracks["track_id"].to_pylist()
                        dup = {t for t in ids_here if t in seen}
                        if dup:
                            tracks, segments, moved = self._drop_tracks(
                                fs_id, shard.shard_id, tracks, segments, moved, dup)
                        if tracks.num_rows == 0:
                            continue
                        seen.update(ids_here)
                        tr_out.add(tracks)
                        seg_out.add(segments)
                        ids.append(shard.shard_id)
                        written[shard.shard_id] = (tracks.num_rows, segments.num_rows)
                        self.report.tensor_files += moved
                        self.report.tracks += tracks.num_rows
                        self.report.segments += segments.num_rows
                if tr_out.data_file is not None:
                    store.commit_pair(
                        lease, ids,
                        first=(segments_path, [f for f in [seg_out.data_file] if f],
                               seg_schema),
                        last=(tracks_path, [tr_out.data_file], TRACKS_SCHEMA),
                        metadata={"mtag.operation": "migrate", "mtag.migrated_from": "1"})
                    self.report.commits += 2
                self.report.shards += len(ids)
                groups += 1
                self.progress(f"features {fs_id}: {len(written)}/{len(fsp.shards)} shards")

    def _convert_shard(self, fsp: FeatureSetPlan, shard: ShardPlan
                       ) -> tuple[pa.Table, pa.Table, int]:
        """One shard's format-2 ``tracks`` and ``segments`` rows, its tensors file placed;
        and 1 if it has one (0: no tensors).
        """
        store, fs_id, sid = self.store, fsp.feature_set, shard.shard_id
        base = store.path("features", fs_id, "shards", sid)
        tracks = self._read_parquet(f"{base}/tracks.parquet")
        seg_path = f"{base}/segments.parquet"
        segments = self._read_parquet(seg_path) if shard.n_segments or self.fs.exists(
            seg_path) else None
        n_seg = 0 if segments is None else segments.num_rows
        if (tracks.num_rows, n_seg) != (shard.n_tracks, shard.n_segments):
            raise StoreError(f"shard {store.uri(base)} holds {tracks.num_rows} tracks and "
                             f"{n_seg} segments, its manifest says {shard.n_tracks} and "
                             f"{shard.n_segments}: the store is damaged")
        config = fsp.config
        seg_schema = _fs_schema(segments_schema(config), config, fs_id)
        if segments is None:
            segments = seg_schema.empty_table()
        tensor_file: str | None = None
        rows = pa.array([], pa.int64())
        if n_seg:
            tensor_file = tensor_file_name(sid)
            target = store.tensor_path(fs_id, tensor_file)
            self._place(f"{base}/tensors.arrow", target)
            rows = self._tensor_rows(target, segments)
        ok = pc.equal(tracks["status"], "ok")
        names = pa.array([tensor_file] * tracks.num_rows, pa.string())
        tracks = _conform(tracks, _fs_schema(TRACKS_SCHEMA, config, fs_id), {
            "shard": pa.array([sid] * tracks.num_rows, pa.string()),
            "feature_set": pa.array([fs_id] * tracks.num_rows, pa.string()),
            "tensor_file": pc.if_else(ok, names, pa.nulls(tracks.num_rows, pa.string()))},
            f"{base}/tracks.parquet")
        segments = _conform(segments, seg_schema, {
            "shard": pa.array([sid] * n_seg, pa.string()),
            "tensor_file": pa.array([tensor_file] * n_seg, pa.string()),
            "tensor_row": rows}, seg_path)
        return tracks, segments, int(tensor_file is not None)

    def _drop_tracks(self, fs_id: str, sid: str, tracks: pa.Table, segments: pa.Table,
                     moved: int, drop: set[str]) -> tuple[pa.Table, pa.Table, int]:
        """A shard's rows without the tracks ``drop`` (an earlier shard holds them, as when
        two format-1 writers raced): its tensors file is written again without their rows (a
        new file: the format-1 one stays as it is until the cleanup), or removed if no row is
        left.
        """
        self.report.duplicate_tracks += len(drop)
        gone = pa.array(sorted(drop), pa.string())
        tracks = tracks.filter(pc.invert(pc.is_in(tracks["track_id"], value_set=gone)))
        segments = segments.filter(pc.invert(pc.is_in(segments["track_id"], value_set=gone)))
        if not moved:
            return tracks, segments, moved
        path = self.store.tensor_path(fs_id, tensor_file_name(sid))
        if segments.num_rows == 0:
            self.fs.rm(path)
            column = tracks.schema.get_field_index("tensor_file")
            return (tracks.set_column(column, tracks.schema.field(column),
                                      pa.nulls(tracks.num_rows, pa.string())), segments, 0)
        with self.fs.open(path, "rb") as fh:
            kept = ipc.open_file(pa.BufferReader(fh.read())).read_all()
        kept = kept.filter(pc.invert(pc.is_in(kept["track_id"], value_set=gone)))
        tmp = f"{path}.{sid}.tmp"
        with self.fs.open(tmp, "wb") as fh, ipc.new_file(fh, kept.schema) as out:
            out.write_table(kept)
        if self.store.is_local:
            os.replace(tmp, path)  # a new inode: the format-1 file (linked) is untouched
        else:
            self.fs.mv(tmp, path)
        column = segments.schema.get_field_index("tensor_row")
        return tracks, segments.set_column(column, segments.schema.field(column),
                                           self._tensor_rows(path, segments)), moved

    def _read_parquet(self, path: str) -> pa.Table:
        try:
            with self.fs.open(path, "rb") as fh:
                return pq.read_table(fh)
        except FileNotFoundError as exc:
            raise StoreError(f"{self.store.uri(path)} is missing: the store is damaged") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"cannot read {self.store.uri(path)}: {exc}") from exc

    def _place(self, old: str, new: str) -> None:
        """Give the tensors file ``old`` its format-2 name ``new`` (idempotent).

        A local store gets a hard link (``old`` goes with the cleanup; a rename where links
        are not supported), an object store a server-side copy (copy, then delete later).
        """
        fs = self.fs
        if self.store.is_local:
            if os.path.exists(new):
                if not os.path.exists(old) or os.path.samefile(old, new):
                    return
                os.unlink(new)  # a link to another file (not ours): place it again
            if not os.path.exists(old):
                raise StoreError(f"{old} is missing: the store is damaged")
            os.makedirs(os.path.dirname(new), exist_ok=True)
            try:
                os.link(old, new)
            except OSError:
                os.replace(old, new)
            return
        have_old = fs.exists(old)
        if fs.exists(new) and (not have_old or fs.size(new) == fs.size(old)):
            return  # copies are atomic: a file at ``new`` is whole
        if not have_old:
            raise StoreError(f"{self.store.uri(old)} is missing: the store is damaged")
        fs.makedirs(new.rsplit("/", 1)[0], exist_ok=True)
        fs.copy(old, new)

    def _tensor_rows(self, path: str, segments: pa.Table) -> pa.Array:
        """Row of each ``(track_id, segment)`` of ``segments`` in the tensors file ``path``,
        reading only those two columns of the file.
        """
        where = self.store.uri(path)
        try:
            if self.store.is_local:
                keys = _ipc_columns(pa.memory_map(path, "r"), ["track_id", "segment"])
            else:
                with self.fs.open(path, "rb") as fh:
                    keys = _ipc_columns(fh, ["track_id", "segment"])
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise StoreError(f"cannot read the tensors file {where}: {exc}") from exc
        index = pa.table({"track_id": keys["track_id"],
                          "segment": keys["segment"].cast(pa.int32()),
                          "tensor_row": pa.array(np.arange(keys.num_rows, dtype=np.int64))})
        wanted = pa.table({"track_id": segments["track_id"],
                           "segment": segments["segment"].cast(pa.int32()),
                           "_order": pa.array(np.arange(segments.num_rows, dtype=np.int64))})
        joined = wanted.join(index, keys=["track_id", "segment"], join_type="left outer")
        if joined.num_rows != segments.num_rows:
            raise StoreError(f"tensors file {where} holds a (track, segment) twice")
        joined = joined.sort_by("_order")
        rows = joined["tensor_row"].combine_chunks()
        if rows.null_count:
            missing = joined.filter(pc.is_null(joined["tensor_row"])).slice(0, 1).to_pylist()
            raise StoreError(f"tensors file {where} has no row for {rows.null_count} segments "
                             f"(e.g. {missing[0]['track_id']} #{missing[0]['segment']}): the "
                             "store is damaged")
        return rows

    # --- step 4: sources -------------------------------------------------------------------
    def sources(self, plan: Plan, lease: Any) -> None:
        """Append every format-1 ``sources`` row to the ``sources`` Delta table (one commit)."""
        if not plan.sources:
            return
        folder = self.store.path("sources")
        with _TableFile(self.store, folder, SOURCES_SCHEMA, SOURCES_PREFIX, ROW_GROUP) as out:
            for path in plan.sources:
                out.add(_conform(self._read_parquet(path), SOURCES_SCHEMA, {}, path))
        if out.data_file is not None:
            lease.check()
            tables.commit_files(self.store, folder, [out.data_file], SOURCES_SCHEMA,
                                metadata={"mtag.operation": "migrate",
                                          "mtag.migrated_from": "1"})
            self.report.commits += 1
            self.report.source_rows = out.data_file.rows
        plan.table_rows[folder] = self.report.source_rows
        self.progress(f"sources: {self.report.source_rows} rows")

    # --- step 5: scores and neighbours -------------------------------------------------------
    def scores(self, plan: Plan, lease: Any) -> None:
        """Migrate every committed part of every scored model version, :attr:`group_parts`
        per commit, each row given its track's ``shard``.
        """
        lookups: dict[str, _ShardOf] = {}
        for version in plan.scores:
            model = version.model
            if model.feature_set not in lookups:
                lookups[model.feature_set] = _ShardOf(self.store.read(
                    model.feature_set, "tracks", ["track_id", "shard"])
                    if self._has_feature_set(model.feature_set) else
                    pa.table({"track_id": pa.array([], pa.string()),
                              "shard": pa.array([], pa.string())}))
            shard_of = lookups[model.feature_set]
            schemas = {"scores": scores_schema(model),
                       "segment_scores": segment_scores_schema(model)}
            paths = {t: f"{version.root}/{t}" for t in schemas}
            for t in schemas:
                tables.ensure_table(self.store, paths[t], schemas[t])
            done: set[str] = set()
            counts = dict.fromkeys(schemas, 0)
            self.report.score_versions += 1
            for group in _chunks(version.parts, self.group_parts):
                shards: list[str] = []
                prefix = f"migrate-{group[0].part_id}"
                with _TableFile(self.store, paths["segment_scores"], schemas["segment_scores"],
                                prefix, SEGMENT_SCORES_ROW_GROUP) as seg_out, \
                        _TableFile(self.store, paths["scores"], schemas["scores"], prefix,
                                   SCORES_ROW_GROUP) as tr_out:
                    for part, (tracks, segments) in zip(group, self._map(
                            functools.partial(self._read_part, version.root), group),
                            strict=True):
                        if done & set(part.shards):
                            self.report.duplicate_score_parts += 1
                            continue
                        done.update(part.shards)
                        shards += part.shards
                        for table, rows, out in (("scores", tracks, tr_out),
                                                 ("segment_scores", segments, seg_out)):
                            column = shard_of(rows["track_id"], part.shards)
                            if table == "scores":
                                self.report.unmatched_score_rows += column.null_count
                            out.add(_conform(rows, schemas[table], {"shard": column},
                                             f"{version.root}/parts/{part.part_id}/{table}"))
                            counts[table] += rows.num_rows
                        self.report.score_parts += 1
                if tr_out.data_file is not None or seg_out.data_file is not None:
                    self.store.commit_pair(
                        lease, shards,
                        first=(paths["segment_scores"],
                               [f for f in [seg_out.data_file] if f], schemas["segment_scores"]),
                        last=(paths["scores"], [f for f in [tr_out.data_file] if f],
                              schemas["scores"]),
                        metadata={"mtag.operation": "migrate", "mtag.migrated_from": "1",
                                  "mtag.model": f"{model.name}/{model.version}"})
                    self.report.commits += 2
                self.progress(f"scores {model.name} v{model.version}: "
                              f"{self.report.score_parts} parts")
            for t in schemas:
                plan.table_rows[paths[t]] = counts[t]
            self.report.score_rows += counts["scores"]
            self.report.segment_score_rows += counts["segment_scores"]

    def _has_feature_set(self, fs_id: str) -> bool:
        return bool(self.fs.exists(self.store.path("features", fs_id, "featureset.json")))

    def _read_part(self, root: str, part: PartPlan) -> tuple[pa.Table, pa.Table]:
        base = f"{root}/parts/{part.part_id}"
        return (self._read_parquet(f"{base}/scores.parquet"),
                self._read_parquet(f"{base}/segment_scores.parquet"))

    def neighbours(self, plan: Plan, lease: Any) -> None:
        """Migrate the current run of every model version's neighbours: its parts into the
        ``neighbours`` table, its ``current.json`` rewritten (the original backed up under
        ``_migrate/`` until the switch).
        """
        store, fs = self.store, self.fs
        by_root = {tuple(v.root.split("/")[-2:]): v for v in plan.scores}
        for nb in plan.neighbours:
            if nb.record is None:
                continue
            record, run_id = nb.record, nb.record["run_id"]
            folder = f"{nb.root}/neighbours"
            run_dir = f"{nb.root}/runs/{run_id}"
            with _TableFile(store, folder, NEIGHBOURS_SCHEMA, run_id,
                            NEIGHBOURS_ROW_GROUP) as out:
                for part in record["parts"]:
                    path = f"{run_dir}/{part}"
                    out.add(_conform(self._read_parquet(path), NEIGHBOURS_SCHEMA, {}, path))
            lease.check()
            tables.commit_files(store, folder, [f for f in [out.data_file] if f],
                                NEIGHBOURS_SCHEMA, metadata={"mtag.operation": "migrate",
                                                             "mtag.run": run_id})
            self.report.commits += out.data_file is not None
            rows = out.data_file.rows if out.data_file else 0
            plan.table_rows[folder] = rows
            self.report.neighbour_rows += rows
            self.report.neighbour_versions += 1
            digest = record.get("source_digest")
            version = by_root.get(tuple(nb.root.split("/")[-2:]))
            if version is not None and digest == _format1_digest(version):
                digest = ScoreStore(store).source_digest(version.model.name,
                                                         version.model.version)
            else:
                self.report.stale_neighbours += 1
            rel = nb.root[len(store.root) + 1:]
            backup = store.path(MIGRATE_DIR, rel, BACKUP_NAME)
            if not fs.exists(backup):
                store.write_record(backup, record)
            store.write_record(f"{nb.root}/current.json", record | {
                "parts": [out.data_file.path] if out.data_file else [],
                "source_digest": digest, "migrated_at": _now()})
            self.progress(f"neighbours {rel}: {rows} rows")

    # --- step 6: verify, switch, clean up -----------------------------------------------------
    def verify(self, plan: Plan) -> None:
        """Count the committed tables against what was read.

        Raises
        ------
        StoreError
            If a shard's counts or a table's row count differ.
        """
        store = self.store
        for fsp in plan.feature_sets:
            fs_id = fsp.feature_set
            expected = plan.written.get(fs_id, {})
            got = {m.shard_id: m.counts.n_tracks for m in store.manifests(fs_id)}
            want = {s: t for s, (t, _) in expected.items()}
            if got != want:
                wrong = sorted(set(got.items()) ^ set(want.items()))[:3]
                raise StoreError(f"migrated feature set {fs_id} does not hold what was read "
                                 f"((shard, tracks) e.g. {wrong}); run `mtag migrate` again")
            n_seg = sum(s for _, s in expected.values())
            table = tables.open_table(store, store.table_path(fs_id, "segments"))
            if table is not None and int(table.count()) != n_seg:
                raise StoreError(f"migrated segments of {fs_id}: {table.count()} rows, read "
                                 f"{n_seg}; run `mtag migrate` again")
        for path, rows in plan.table_rows.items():
            table = tables.open_table(store, path)
            have = 0 if table is None else int(table.count())
            if have != rows:
                raise StoreError(f"migrated table {store.uri(path)}: {have} rows, read {rows}; "
                                 "run `mtag migrate` again")

    def switch(self, plan: Plan) -> None:
        """Record what the cleanup deletes, then write ``store.json`` ``{"format": 2}``."""
        store = self.store
        doomed: list[str] = []
        for fsp in plan.feature_sets:
            doomed += [store.path("features", fsp.feature_set, "shards"),
                       store.path("features", fsp.feature_set, "_manifests")]
        doomed += plan.sources
        for version in plan.scores:
            doomed += [f"{version.root}/parts", f"{version.root}/_manifests"]
        for nb in plan.neighbours:
            for run in nb.runs:
                run_dir = f"{nb.root}/runs/{run}"
                if nb.record is not None and run == nb.record["run_id"]:
                    doomed += [f"{run_dir}/{p}" for p in nb.record["parts"]]
                else:
                    doomed.append(run_dir)
        doomed += plan.staging
        doomed.append(store.path("_lock.json"))
        rel = [p[len(store.root) + 1:] for p in doomed if p.startswith(store.root + "/")]
        store.write_record(store.path(CLEANUP_RECORD), {"delete": rel, "created_at": _now()})
        marker = self.read_marker()
        store.write_record(store.path("store.json"), {
            k: v for k, v in marker.items() if k != "format"} | {
            "format": STORE_FORMAT, "migrated_from": marker.get("format", 1),
            "migrated_at": _now(), PENDING_KEY: CLEANUP_RECORD})
        store.format = STORE_FORMAT
        self.progress(f"store.json says format {STORE_FORMAT}; deleting the format-1 files")

    def cleanup(self) -> None:
        """Delete the format-1 files the switch recorded, then drop the pending key."""
        store, fs = self.store, self.fs
        record = store.path(CLEANUP_RECORD)
        if fs.exists(record):
            for rel in store.read_record(record).get("delete", []):
                path = store.path(rel)
                if fs.exists(path):
                    fs.rm(path, recursive=True)
                    self.report.deleted += 1
        if fs.exists(store.path(MIGRATE_DIR)):
            fs.rm(store.path(MIGRATE_DIR), recursive=True)
        marker = self.read_marker()
        if PENDING_KEY in marker:
            store.write_record(store.path("store.json"),
                               {k: v for k, v in marker.items() if k != PENDING_KEY})

    # --- helpers ------------------------------------------------------------------------------
    def _threads(self) -> _Threads:
        return _Threads(self)

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        if self._pool is None or len(items) < 2:
            return iter([fn(i) for i in items])
        return self._pool.map(fn, items)


class _Threads:
    """The I/O thread pool of a :class:`Migration`, for the length of a ``with`` block."""

    def __init__(self, migration: Migration) -> None:
        self.migration = migration

    def __enter__(self) -> None:
        self.migration._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.migration.workers, thread_name_prefix="mtag-migrate")

    def __exit__(self, *exc: object) -> None:
        pool, self.migration._pool = self.migration._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class _TableFile:
    """One commit group's rows of a table, streamed into one new data file of its folder in
    row groups of ``row_group`` rows; :attr:`data_file` is None when no row came.
    """

    def __init__(self, store: FeatureStore, folder: str, schema: pa.Schema, prefix: str,
                 row_group: int) -> None:
        self.store, self.row_group = store, row_group
        self.writer = tables.DataFileWriter(store, folder, schema, prefix=prefix)
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.data_file: DataFile | None = None

    def __enter__(self) -> _TableFile:
        self.writer.__enter__()
        return self

    def add(self, table: pa.Table) -> None:
        """Append rows (already in the file's schema)."""
        if table.num_rows:
            self.pending.append(table)
            self.rows += table.num_rows
            if self.rows >= self.row_group:
                self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self.pending:
            return
        data = pa.concat_tables(self.pending).combine_chunks()
        cut = len(data) if final else (len(data) // self.row_group) * self.row_group
        if cut:
            self.writer.write(data.slice(0, cut), row_group_size=self.row_group)
        rest = data.slice(cut)
        self.pending = [rest] if len(rest) else []
        self.rows = len(rest)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._flush(final=True)
        self.writer.__exit__(exc_type, exc, tb)
        if exc_type is None:
            if self.writer.rows:
                self.data_file = self.writer.data_file
            else:
                self.store.fs.rm(self.writer.full)


class _ShardOf:
    """``track_id`` -> ``shard`` of a feature set's tracks, looked up among a part's shards
    first (a slice of a sorted table), then among all tracks.
    """

    def __init__(self, rows: pa.Table) -> None:
        rows = rows.sort_by("shard").combine_chunks()
        self.ids = rows["track_id"].combine_chunks()
        self.shards = rows["shard"].combine_chunks()
        shard = self.shards.to_numpy(zero_copy_only=False)
        cuts = [0, *(np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist(), len(shard)]
        self.ranges = {str(shard[a]): (a, b - a) for a, b in itertools.pairwise(cuts)
                       if b > a}

    def __call__(self, track_ids: pa.ChunkedArray | pa.Array, shards: list[str]) -> pa.Array:
        spans = [self.ranges[s] for s in shards if s in self.ranges]
        ids = pa.concat_arrays([self.ids.slice(a, n) for a, n in spans]) if spans else \
            pa.array([], pa.string())
        names = pa.concat_arrays([self.shards.slice(a, n) for a, n in spans]) if spans else \
            pa.array([], pa.string())
        wanted = track_ids.combine_chunks() if isinstance(track_ids, pa.ChunkedArray) \
            else track_ids
        out = pc.take(names, pc.index_in(wanted, value_set=ids))
        if out.null_count and len(self.ids):
            out = pc.coalesce(out, pc.take(self.shards, pc.index_in(wanted,
                                                                    value_set=self.ids)))
        return out


def _conform(table: pa.Table, schema: pa.Schema, extra: dict[str, Any], what: str
             ) -> pa.Table:
    """``table`` in ``schema``: columns from ``extra`` first, then ``table``, nulls for the
    rest (other columns dropped).

    Raises
    ------
    StoreError
        If a required column is missing or a column does not cast (naming ``what``).
    """
    columns = []
    for f in schema:
        if f.name in extra:
            column = extra[f.name]
        elif f.name in table.column_names:
            column = table.column(f.name)
        elif f.nullable:
            column = pa.nulls(table.num_rows, f.type)
        else:
            raise StoreError(f"{what} has no column {f.name}: the store is damaged")
        if not column.type.equals(f.type):
            try:
                column = column.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise StoreError(f"{what}: column {f.name} ({column.type}) does not cast to "
                                 f"{f.type}: {exc}") from exc
        columns.append(column if isinstance(column, pa.ChunkedArray) else
                       pa.chunked_array([column], f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _fs_schema(schema: pa.Schema, config: FeatureConfig, fs_id: str) -> pa.Schema:
    """``schema`` with the feature set's metadata, naming the store's folder ``fs_id``."""
    meta = dict(with_metadata(schema, config).metadata or {})
    meta[b"mtag.feature_set"] = fs_id.encode()
    return schema.with_metadata(meta)


def _ipc_columns(source: Any, names: list[str]) -> pa.Table:
    """Only the columns ``names`` of an Arrow IPC file (other buffers are not read)."""
    schema = ipc.open_file(source).schema
    fields = [schema.get_field_index(n) for n in names]
    if min(fields) < 0:
        raise KeyError(f"no column {names[fields.index(min(fields))]}")
    reader = ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=fields))
    return reader.read_all()


def _format1_digest(version: ScoreVersionPlan) -> str:
    """Format 1's ``source_digest``: a hash of the committed part ids."""
    parts = sorted(p.part_id for p in version.parts)
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()


def _subdirs(fs: Any, path: str) -> list[str]:
    """Folders directly under ``path`` (none if it is missing)."""
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [str(e["name"]).rstrip("/") for e in entries if e.get("type") == "directory"]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


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


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
