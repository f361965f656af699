"""Keeping a store fast as nightly runs add up: compaction, checkpoints and vacuum.

Every ingest or score commit adds small files and a log entry. :func:`compact` rewrites each
table's small files into large ones (delta-rs ``optimize.compact``), writes a checkpoint (a
reader opens the table from it plus a few log entries), drops expired log entries, and
vacuums files no snapshot inside the retention needs, so query time after a year of nightly
runs looks like query time after one big run.

What it never breaks:

- a running reader or writer: files are deleted only when older than ``retention_hours``
  (default 7 days); a reader's snapshot or a writer's not-yet-committed file is younger;
- a recorded training set: training pins the table versions it read
  (:meth:`featurestore.store.FeatureStore.pin`); pinned versions are kept by the vacuum and
  the tensors files they name are kept too.

Tensors files are not Delta files: the ones no current or pinned snapshot names and older than
the retention are deleted here, with scratch left by killed tasks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from featurestore import tables
from featurestore.store import FeatureStore

DEFAULT_RETENTION_HOURS = 168
"""Files younger than this are never deleted (a week: longer than any run or reader)."""

TARGET_FILE_BYTES = 128 << 20
"""Compacted file size (delta-rs' default is 100 MiB; DuckDB and Spark like 128-512 MiB)."""


@dataclass
class TableReport:
    """What compaction did to one table."""

    table: str
    files_before: int
    files_after: int
    version: int
    vacuumed: int


@dataclass
class CompactReport:
    """What :func:`compact` did."""

    tables: list[TableReport] = field(default_factory=list)
    tensors_deleted: int = 0
    scratch_deleted: int = 0
    seconds: float = 0.0

    def render(self) -> str:
        """Human-readable summary."""
        lines = [f"Compacted {len(self.tables)} tables in {self.seconds:.1f} s "
                 f"({self.tensors_deleted} unreferenced tensors files and "
                 f"{self.scratch_deleted} scratch folders deleted)"]
        for t in self.tables:
            lines.append(f"  {t.table}: {t.files_before} -> {t.files_after} files, version "
                         f"{t.version}, {t.vacuumed} old files vacuumed")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"tables": [vars(t) for t in self.tables], "tensors_deleted":
                self.tensors_deleted, "scratch_deleted": self.scratch_deleted,
                "seconds": self.seconds}


def table_paths(store: FeatureStore) -> list[str]:
    """Folders of every Delta table of the store."""
    found = [store.path("sources")]
    for record in store.feature_sets():
        found += [store.table_path(record["feature_set"], t) for t in ("tracks", "segments")]
    for name in ("scores", "segment_scores"):
        found += [p.rsplit("/", 2)[0] + f"/{name}" for p in
                  store.fs.glob(store.path("scores", "*", "v*", "model.json"))]
    found += [p.rsplit("/", 1)[0] for p in
              store.fs.glob(store.path("neighbours", "*", "v*", "neighbours", "_delta_log"))]
    return [p for p in found if tables.open_table(store, p) is not None]


def compact(store: FeatureStore, *, retention_hours: float = DEFAULT_RETENTION_HOURS,
            target_size: int = TARGET_FILE_BYTES) -> CompactReport:
    """Compact, checkpoint and vacuum every table of ``store`` (holding its commit lease).

    Parameters
    ----------
    store : FeatureStore
    retention_hours : float
        Nothing younger is deleted; 0 is allowed only for tests and empty-but-for-you stores.
    target_size : int
        Size in bytes of compacted files.

    Returns
    -------
    CompactReport
    """
    started = time.perf_counter()
    report = CompactReport()
    with store.commit_lease() as lease:
        store.resolve_intents()
        pins = store.pins()
        for path in table_paths(store):
            lease.check()
            report.tables.append(_compact_table(store, path, retention_hours, target_size,
                                                pins.get(path, [])))
            lease.renew()
        report.tensors_deleted = _unreferenced_tensors(store, retention_hours, pins)
    report.scratch_deleted = _old_scratch(store, retention_hours)
    report.seconds = time.perf_counter() - started
    return report


def _compact_table(store: FeatureStore, path: str, retention_hours: float, target_size: int,
                   keep_versions: list[int]) -> TableReport:
    table = tables.open_table(store, path)
    assert table is not None
    before = len(table.file_uris())
    if before > 1:
        table.optimize.compact(target_size=target_size)
    table.update_incremental()
    table.create_checkpoint()
    table.cleanup_metadata()
    vacuumed = table.vacuum(retention_hours=int(retention_hours), dry_run=False,
                            enforce_retention_duration=False, full=True,
                            keep_versions=keep_versions or None)
    table.update_incremental()
    return TableReport(path.removeprefix(store.root).lstrip("/"), before,
                       len(table.file_uris()), int(table.version()), len(vacuumed))


def _unreferenced_tensors(store: FeatureStore, retention_hours: float,
                          pins: dict[str, list[int]]) -> int:
    """Delete old tensors files that neither the current snapshot nor a pin names."""
    deleted = 0
    cutoff = time.time() - retention_hours * 3600
    for record in store.feature_sets():
        fs_id = record["feature_set"]
        named = set(store.files(fs_id, "tensors"))
        for version in pins.get(store.table_path(fs_id, "segments"), []):
            named |= set(store.files(fs_id, "tensors", version=version))
        for path in store.fs.glob(store.path("features", fs_id, "tensors", "*.arrow")):
            if path not in named and _mtime(store, path) < cutoff:
                store.fs.rm(path)
                deleted += 1
    return deleted


def _old_scratch(store: FeatureStore, retention_hours: float) -> int:
    """Delete scratch folders of tasks (killed ones leave theirs) whose newest file is older
    than the retention; return how many.
    """
    cutoff = time.time() - retention_hours * 3600
    deleted = 0
    for folder in store.fs.glob(store.path("_staging", "*", "*")):
        files = store.fs.find(folder, withdirs=False)
        newest = max((_mtime(store, f) for f in files), default=None)
        if newest is None and store.is_local:
            newest = _mtime(store, folder)
        if newest is not None and newest < cutoff:
            store.fs.rm(folder, recursive=True)
            deleted += 1
    return deleted


def _mtime(store: FeatureStore, path: str) -> float:
    info = store.fs.info(path)
    value = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value or 0.0)
