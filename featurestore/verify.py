"""Checking a store against its own commits, and repairing what is damaged.

:func:`verify` opens every Delta table of the store and checks each committed data file against
the log entry that names it (the file exists, has the logged size, its Parquet footer and every
page decode, its row count is the logged one, its schema has the table's columns), then every
tensors file the ``segments`` rows name (exists, is an Arrow IPC file of this feature set, has
the rows named), and the tables against each other (every segment's track exists, no duplicate
keys, every ok track has its segments). It reports each problem with the file and what to do.

:func:`repair` (``mtag verify --repair``) quarantines what is damaged: the damaged files are
removed from their tables in one transaction each and moved to ``_quarantine/``, and the tracks
whose rows went with them (or whose segments or tensors are incomplete) are deleted from
``tracks`` and ``segments``, so the next ingest run processes them again. Nothing that is sound
is touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from featurestore import tables
from featurestore.maintenance import table_paths
from featurestore.store import FeatureStore
from tasks.errors import StoreError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the store."""

    kind: str  # missing-file, size, unreadable, rows, schema, tensors, orphans, duplicates, ...
    where: str  # the file or table
    detail: str
    table: str | None = None  # the table folder a damaged data file belongs to
    file: str | None = None  # its path relative to the table folder

    def render(self) -> str:
        """One line."""
        return f"{self.kind:12s} {self.where}: {self.detail}"


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found."""

    tables: int = 0
    files: int = 0
    rows: int = 0
    tensors_files: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def render(self) -> str:
        """Human-readable report."""
        head = (f"checked {self.tables} tables, {self.files} data files ({self.rows} rows) and "
                f"{self.tensors_files} tensors files in {self.seconds:.1f} s: ")
        if self.ok:
            return head + "no problem found"
        lines = [head + f"{len(self.problems)} problems"]
        lines += ["  " + p.render() for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... {len(self.problems) - 50} more")
        lines.append("  run `mtag verify --repair --store STORE` to quarantine the damaged files; "
                     "the next `mtag ingest` processes their tracks again")
        return "\n".join(lines)


def verify(store: FeatureStore) -> VerifyReport:
    """Check every committed file and the tables against each other (see module docstring)."""
    started = time.perf_counter()
    report = VerifyReport()
    try:
        paths = table_paths(store)
    except StoreError as exc:
        report.problems.append(Problem("log", store.url, str(exc)))
        paths = []
    for path in paths:
        report.tables += 1
        _check_files(store, path, report)
    for record in store.feature_sets():
        _check_feature_set(store, record["feature_set"], report)
    report.seconds = time.perf_counter() - started
    return report


def _check_files(store: FeatureStore, path: str, report: VerifyReport) -> None:
    try:
        table = tables.open_table(store, path)
    except StoreError as exc:
        report.problems.append(Problem("log", path, str(exc)))
        return
    if table is None:
        return
    expected = pa.schema(table.schema().to_arrow())
    actions = pa.table(table.get_add_actions(flatten=True))
    for rel, size, rows in zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist(),
                               actions["num_records"].to_pylist(), strict=True):
        report.files += 1
        full = f"{path}/{rel}"

        def bad(kind: str, detail: str, full: str = full, rel: str = rel) -> None:
            report.problems.append(Problem(kind, store.uri(full), detail, path, rel))

        if not store.fs.exists(full):
            bad("missing-file", "named by the table's log but not there")
            continue
        actual = int(store.fs.size(full))
        if size is not None and actual != int(size):
            bad("size", f"{actual} bytes, the log says {size}")
            continue
        try:
            with store.fs.open(full, "rb") as fh:
                data = pq.read_table(fh)  # every page decoded: checksums of the compression
        except Exception as exc:  # any decode error is damage, whatever pyarrow calls it
            bad("unreadable", f"{type(exc).__name__}: {exc}")
            continue
        report.rows += data.num_rows
        if rows is not None and data.num_rows != int(rows):
            bad("rows", f"{data.num_rows} rows, the log says {rows}")
        missing = [n for n in expected.names if n not in data.column_names]
        if missing:
            bad("schema", f"lacks columns {missing}")


def _check_feature_set(store: FeatureStore, fs_id: str, report: VerifyReport) -> None:
    try:
        tracks = store.read(fs_id, "tracks", ["track_id", "status", "n_segments", "shard"])
        segs = store.read(fs_id, "segments", ["track_id", "segment", "shard", "tensor_file",
                                              "tensor_row"])
    except Exception as exc:  # a table that cannot be read is already reported by file
        report.problems.append(Problem("unreadable", store.table_path(fs_id, "tracks"),
                                       f"{type(exc).__name__}: {exc}"))
        return
    where = f"feature set {fs_id}"
    for problem in _key_problems(tracks, segs, where):
        report.problems.append(problem)
    for tensor_file, rows in _tensor_rows(segs).items():
        report.tensors_files += 1
        path = store.tensor_path(fs_id, tensor_file)
        detail = _tensors_problem(store, path, fs_id, rows)
        if detail:
            report.problems.append(Problem("tensors", store.uri(path), detail))


def _key_problems(tracks: pa.Table, segs: pa.Table, where: str) -> list[Problem]:
    out = []
    ids = tracks["track_id"]
    if len(pc.unique(ids)) != len(ids):
        out.append(Problem("duplicates", where, f"{len(ids) - len(pc.unique(ids))} tracks "
                           "rows repeat a track_id"))
    keys = pc.binary_join_element_wise(segs["track_id"], pc.cast(segs["segment"], pa.string()),
                                       "/")
    if len(pc.unique(keys)) != len(keys):
        out.append(Problem("duplicates", where, f"{len(keys) - len(pc.unique(keys))} segments "
                           "rows repeat a (track_id, segment)"))
    orphans = pc.sum(pc.invert(pc.is_in(segs["track_id"], ids))).as_py() or 0
    if orphans:
        out.append(Problem("orphans", where, f"{orphans} segments rows have no track"))
    ok = tracks.filter(pc.and_(pc.equal(tracks["status"], "ok"),
                               pc.greater(tracks["n_segments"], 0)))
    have = segs.group_by("track_id").aggregate([("segment", "count")])
    count = dict(zip(have["track_id"].to_pylist(), have["segment_count"].to_pylist(),
                     strict=True))
    short = sum(count.get(t, 0) != n for t, n in zip(ok["track_id"].to_pylist(),
                                                     ok["n_segments"].to_pylist(), strict=True))
    if short:
        out.append(Problem("incomplete", where, f"{short} ok tracks lack some of their "
                           "segments rows"))
    return out


def _tensor_rows(segs: pa.Table) -> dict[str, int]:
    """Tensors file -> rows it must have (highest ``tensor_row`` + 1)."""
    if segs.num_rows == 0:
        return {}
    grouped = segs.group_by("tensor_file").aggregate([("tensor_row", "max")])
    return {f: int(m) + 1 for f, m in zip(grouped["tensor_file"].to_pylist(),
                                          grouped["tensor_row_max"].to_pylist(), strict=True)
            if f is not None}


def _tensors_problem(store: FeatureStore, path: str, fs_id: str, rows: int) -> str | None:
    from featurestore.schema import read_metadata

    if not store.fs.exists(path):
        return "named by segments rows but not there"
    try:
        with store.fs.open(path, "rb") as fh:
            table = ipc.open_file(pa.BufferReader(fh.read())).read_all()
        meta = read_metadata(table.schema)
    except Exception as exc:  # truncated, overwritten, not Arrow
        return f"unreadable: {type(exc).__name__}: {exc}"
    if meta["feature_set"] != fs_id:
        return f"holds feature set {meta['feature_set']}"
    if table.num_rows < rows:
        return f"{table.num_rows} rows; segments rows name row {rows - 1}"
    return None


# --- repair ----------------------------------------------------------------------------------
@dataclass
class RepairReport:
    """What :func:`repair` did."""

    files_quarantined: int = 0
    tracks_removed: int = 0
    problems_left: int = 0
    details: list[str] = field(default_factory=list)

    def render(self) -> str:
        """Human-readable summary."""
        lines = [f"quarantined {self.files_quarantined} damaged files; removed "
                 f"{self.tracks_removed} tracks (the next `mtag ingest` processes them again)"]
        lines += ["  " + d for d in self.details[:50]]
        if self.problems_left:
            lines.append(f"  {self.problems_left} problems remain (see `mtag verify`)")
        return "\n".join(lines)


def repair(store: FeatureStore) -> RepairReport:
    """Quarantine damaged files and remove the tracks they held (under the commit lease)."""
    out = RepairReport()
    found = verify(store)
    with store.commit_lease() as lease:
        store.resolve_intents()
        damaged: dict[str, list[str]] = {}
        for p in found.problems:
            if p.table and p.file:
                damaged.setdefault(p.table, []).append(p.file)
        for path, files in damaged.items():
            lease.check()
            _quarantine(store, path, files)
            out.files_quarantined += len(files)
            out.details += [f"{store.uri(path)}/{f}" for f in files]
        for record in store.feature_sets():
            lease.check()
            out.tracks_removed += _drop_incomplete(store, record["feature_set"])
    out.problems_left = len(verify(store).problems)
    return out


def _quarantine(store: FeatureStore, path: str, files: list[str]) -> None:
    schema = pa.schema(tables.open_table(store, path).schema().to_arrow())  # type: ignore[union-attr]
    tables.commit_files(store, path, [], schema, replace=files,
                        metadata={"mtag.operation": "repair", "mtag.quarantined": files})
    target = store.path("_quarantine", time.strftime("%Y%m%dT%H%M%S"),
                        path.removeprefix(store.root).strip("/"))
    store.fs.makedirs(target, exist_ok=True)
    for f in files:
        if store.fs.exists(f"{path}/{f}"):
            store.fs.mv(f"{path}/{f}", f"{target}/{f.replace('/', '_')}")


def _drop_incomplete(store: FeatureStore, fs_id: str) -> int:
    """Delete the tracks (and their remaining segments) whose rows or tensors are incomplete."""
    tracks = store.read(fs_id, "tracks", ["track_id", "status", "n_segments"])
    segs = store.read(fs_id, "segments", ["track_id", "tensor_file", "tensor_row"])
    have = segs.group_by("track_id").aggregate([("track_id", "count")])
    count = dict(zip(have["track_id"].to_pylist(), have["track_id_count"].to_pylist(),
                     strict=True))
    bad = {t for t, st, n in zip(tracks["track_id"].to_pylist(), tracks["status"].to_pylist(),
                                 tracks["n_segments"].to_pylist(), strict=True)
           if st == "ok" and (n or 0) > 0 and count.get(t, 0) != n}
    bad |= set(count) - set(tracks["track_id"].to_pylist())  # segments without a track
    for tensor_file, rows in _tensor_rows(segs).items():
        if _tensors_problem(store, store.tensor_path(fs_id, tensor_file), fs_id, rows):
            mask = pc.equal(segs["tensor_file"], tensor_file)
            bad |= set(segs.filter(mask)["track_id"].to_pylist())
    if not bad:
        return 0
    quoted = ", ".join("'" + t.replace("'", "''") + "'" for t in sorted(bad))
    for name in ("segments", "tracks"):
        table = tables.open_table(store, store.table_path(fs_id, name))
        if table is not None:
            table.delete(f"track_id IN ({quoted})")
    return len(bad & set(tracks["track_id"].to_pylist()))

