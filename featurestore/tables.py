"""Delta Lake tables of a store (delta-rs, the ``deltalake`` package): create, snapshot, commit.

Every table of the store (``sources``, a feature set's ``tracks`` and ``segments``, a scored
model version's ``scores``, ``segment_scores`` and ``neighbours``) is a Delta table in its own
folder. Workers write Parquet data files straight into a table's folder
(:func:`write_data_file`); the flow process then commits them (:func:`commit_files`): one log
entry naming every file of a group of shards, written last, so a reader's snapshot holds a
group whole or not at all, and files no commit names are never read (a vacuum deletes them).
Readers open a snapshot (:func:`open_table`, at a version or a timestamp for lineage), list its
files for DuckDB or scan it with pyarrow. Any Delta reader (Spark, Trino, Polars, DuckDB's
``delta`` extension) reads these folders without mtag.

Object stores: delta-rs reads the ``AWS_*`` environment as s3fs does; safe commits from several
hosts need conditional writes (``conditional_put=etag``, the default here, which AWS S3, MinIO,
R2 and the moto test server support). ``MTAG_DELTA_STORAGE_OPTIONS`` (JSON) adds or overrides
options, e.g. a DynamoDB locking provider for stores without conditional writes.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.errors import StoreError

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from featurestore.store import FeatureStore

STATS_COLUMNS = ("feature_set", "shard", "track_id", "segment", "model_version", "path")
"""Columns whose min/max go into a file's commit statistics (readers skip files by them)."""

ROW_GROUP = 65536

CODEC = "zstd"
"""Compression of every column that is not floating-point (see :func:`encodings`)."""


@dataclass(frozen=True)
class DataFile:
    """A Parquet file written into a table's folder, not yet committed."""

    path: str  # relative to the table folder
    size: int
    rows: int
    stats: str  # Delta's JSON statistics: numRecords, minValues, maxValues, nullCount

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"path": self.path, "size": self.size, "rows": self.rows, "stats": self.stats}


def storage_options(store: FeatureStore) -> dict[str, str] | None:
    """delta-rs storage options for the store (None for a local folder)."""
    if store.is_local:
        return None
    options = {"conditional_put": "etag"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint.startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    extra = os.environ.get("MTAG_DELTA_STORAGE_OPTIONS")
    if extra:
        try:
            options |= {str(k): str(v) for k, v in json.loads(extra).items()}
        except (ValueError, AttributeError) as exc:
            raise StoreError(f"MTAG_DELTA_STORAGE_OPTIONS is not a JSON object: {exc}") from exc
    return options


def table_uri(store: FeatureStore, path: str) -> str:
    """The URI delta-rs opens for the table folder ``path`` (a store path)."""
    return store.uri(path)


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` as Delta stores it: fixed-size lists become lists (Delta has no such type)."""
    fields = []
    for f in schema:
        t = f.type
        if pa.types.is_fixed_size_list(t):
            t = pa.list_(t.value_type)
        fields.append(pa.field(f.name, t, f.nullable))
    return pa.schema(fields, metadata=schema.metadata)


def ensure_table(store: FeatureStore, path: str, schema: pa.Schema) -> DeltaTable:
    """Open the Delta table at ``path``, creating it empty if missing and adding the columns
    of ``schema`` it lacks (a newer release's columns; older files read them as null). Safe to
    race.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    uri = table_uri(store, path)
    options = storage_options(store)
    try:
        table = DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        try:
            DeltaTable.create(uri, delta_schema(schema), mode="ignore", storage_options=options)
        except DeltaError:  # another process created it first
            if not DeltaTable.is_deltatable(uri, storage_options=options):
                raise
        table = DeltaTable(uri, storage_options=options)
    have = set(table.schema().to_arrow().names)
    missing = [f for f in delta_schema(schema) if f.name not in have]
    if missing:
        from deltalake.schema import Field

        try:
            table.alter.add_columns([Field.from_arrow(f.with_nullable(True)) for f in missing])
        except DeltaError:  # another writer added them first
            table = DeltaTable(uri, storage_options=options)
            if any(f.name not in set(table.schema().to_arrow().names) for f in missing):
                raise
    return table


def open_table(store: FeatureStore, path: str, version: int | str | dt.datetime | None = None
               ) -> DeltaTable | None:
    """The table's current snapshot (or the one at ``version``: a number, an ISO timestamp or
    a datetime); None if there is no table.

    Raises
    ------
    StoreError
        If the table exists but its log cannot be read (damaged), or ``version`` is not there.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    uri = table_uri(store, path)
    try:
        table = DeltaTable(uri, storage_options=storage_options(store))
    except TableNotFoundError:
        return None
    except DeltaError as exc:
        raise StoreError(f"cannot read the Delta table {uri}: {exc} (`mtag verify` says "
                         "more)") from exc
    if version is not None:
        try:
            table.load_as_version(version)
        except (DeltaError, ValueError) as exc:
            raise StoreError(f"table {uri} has no version {version!r}: {exc}") from exc
    return table


def read_snapshot(store: FeatureStore, path: str, columns: list[str] | None = None,
                  filter: Any = None, version: int | str | dt.datetime | None = None,
                  schema: pa.Schema | None = None,
                  keep_file: Callable[[str], bool] | None = None) -> pa.Table:
    """Rows of a table's snapshot (``columns``, rows matching the pyarrow ``filter``).

    ``keep_file`` (a file's name -> bool) leaves out files known to hold no matching row
    before any is opened (see :func:`shard_file_filter`); the ``filter`` still decides rows.
    A missing table reads as empty (with ``schema`` when given).
    """
    table = open_table(store, path, version)
    if table is None:
        if schema is None:
            return pa.table({})
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return snapshot_dataset(store, table, keep_file).to_table(columns=columns, filter=filter)


SHARD_FILE = re.compile(r"^(s-[0-9a-f]+)-")
"""A data file a shard's own writer wrote: its name starts with the shard id (the ingest
writer's ``prefix``, and the rewrite of a raced shard); that file holds rows of that shard
only. Every other file (a compaction's, a delete's rewrite, a migration's) may hold any."""


def shard_file_filter(shards: Collection[str]) -> Callable[[str], bool]:
    """``keep_file`` for a read of ``shards``: a shard's own files of other shards are left
    out unopened. A filtered read otherwise opens the footer of every file of the snapshot:
    0.29 s per read on the 65 files of philharmonia-dev, for a part of 20 shards.
    """
    wanted = frozenset(shards)

    def keep(name: str) -> bool:
        own = SHARD_FILE.match(name)
        return own is None or own.group(1) in wanted

    return keep


def snapshot_dataset(store: FeatureStore, table: DeltaTable,
                     keep_file: Callable[[str], bool] | None = None) -> Any:
    """A pyarrow dataset over the snapshot's Parquet files (those ``keep_file`` keeps), read
    through the store's own filesystem. (delta-rs' ``to_pyarrow_dataset`` reads through a
    filesystem of its own whose threads sometimes outlive the interpreter and abort it at
    exit: delta-rs issue 2184.) The tables have no partition columns and no deletion vectors,
    so the files are the snapshot.
    """
    import pyarrow.dataset as ds

    schema = pa.schema(table.schema().to_arrow())
    uris = list(table.file_uris())
    if keep_file is not None:
        uris = [u for u in uris if keep_file(u.rsplit("/", 1)[-1])]
    if store.is_local:
        return ds.dataset(uris, schema=schema, format="parquet")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    paths = [u.split("://", 1)[1] for u in uris]
    return ds.dataset(paths, schema=schema, format="parquet",
                      filesystem=PyFileSystem(FSSpecHandler(store.fs)))


def file_uris(store: FeatureStore, path: str, version: int | str | dt.datetime | None = None
              ) -> list[str]:
    """URIs of the data files of a snapshot, for engines reading Parquet directly."""
    table = open_table(store, path, version)
    return [] if table is None else list(table.file_uris())


def version_of(store: FeatureStore, path: str) -> int | None:
    """The table's current version (None if there is no table)."""
    table = open_table(store, path)
    return None if table is None else int(table.version())


def write_data_file(store: FeatureStore, path: str, table: pa.Table, *, prefix: str,
                    row_group_size: int = ROW_GROUP) -> DataFile:
    """Write ``table`` as a new Parquet file in the table folder ``path``; nothing is
    committed (see :func:`commit_files`). The file name is ``prefix`` plus a random suffix, so
    a retried task never overwrites a file another attempt may have committed.
    """
    with DataFileWriter(store, path, table.schema, prefix=prefix) as writer:
        writer.write(table, row_group_size=row_group_size)
    return writer.data_file


@functools.lru_cache(maxsize=64)
def encodings(schema: pa.Schema) -> tuple[dict[str, str], list[str]]:
    """Per-column compression, and the columns to dictionary-encode, of a data file.

    Floating-point columns (summary statistics, probabilities, embeddings) are written PLAIN
    and uncompressed: their values rarely repeat, so a dictionary only adds a page, and zstd
    saves little on them. A reader then pays per column chunk for the codec's and the
    dictionary's set-up, which decided the cost of the many small files a store is made of:
    a read of 95 columns of 31 shards' ``segments`` files (1,393 rows) took 120-150 ms of CPU
    as zstd with dictionaries, 32 ms so, and the files were 14 % smaller (docs/decisions.md,
    75). Strings and integers (ids, shards, paths, segment numbers) keep zstd and their
    dictionaries. Keys are the Parquet leaf paths (``embedding.list.element``), which is
    what the writer matches; a column it does not name would get no compression at all.
    """
    import io

    sink = io.BytesIO()
    pq.write_table(schema.empty_table(), sink)
    leaves = pq.ParquetFile(io.BytesIO(sink.getvalue())).schema
    compression: dict[str, str] = {}
    dictionary: list[str] = []
    for i in range(len(leaves)):
        leaf = leaves.column(i)
        if leaf.physical_type in ("FLOAT", "DOUBLE") or leaf.logical_type.type == "FLOAT16":
            compression[leaf.path] = "none"
        else:
            compression[leaf.path] = CODEC
            dictionary.append(leaf.path)
    return compression, dictionary


class DataFileWriter:
    """Stream row groups into one new Parquet file of a table folder (see
    :func:`write_data_file`); :attr:`data_file` describes it once the ``with`` block ends.
    A failed block deletes the file.
    """

    def __init__(self, store: FeatureStore, path: str, schema: pa.Schema, *,
                 prefix: str) -> None:
        self.store, self.schema = store, schema
        self.name = f"{prefix}-{uuid.uuid4().hex[:12]}.parquet"
        self.full = f"{path}/{self.name}"
        store.fs.makedirs(path, exist_ok=True)
        self.rows = 0
        self._stats: list[dict[str, Any]] = []

    def __enter__(self) -> DataFileWriter:
        self._sink = self.store.fs.open(self.full, "wb")
        compression, dictionary = encodings(self.schema)
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression=compression,
                                        use_dictionary=dictionary)
        return self

    def write(self, table: pa.Table, *, row_group_size: int = ROW_GROUP) -> None:
        """Append ``table``'s rows (cast to the file's schema)."""
        if table.num_rows:
            self._writer.write_table(table, row_group_size=row_group_size)
            self.rows += table.num_rows
            self._stats.append(_stats(table))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._writer.close()
        self._sink.close()
        if exc_type is not None:
            self.store.fs.rm(self.full)
            return
        size = int(self.store.fs.size(self.full))
        self.data_file = DataFile(self.name, size, self.rows, _merge_stats(self._stats,
                                                                            self.rows))


def commit_files(store: FeatureStore, path: str, files: list[DataFile], schema: pa.Schema, *,
                 metadata: dict[str, Any] | None = None, replace: list[str] | None = None
                 ) -> int:
    """Commit data files written into ``path`` as one transaction; return the new version.

    Parameters
    ----------
    files : list of DataFile
        Files to add (already in the table folder).
    schema : pyarrow.Schema
        The table's schema.
    metadata : dict, optional
        Stored with the commit (``mtag.*`` keys: shards, run, code version).
    replace : list of str, optional
        Relative paths of committed files this transaction removes (e.g. a neighbours run
        replacing the last one); readers see the old files or the new ones, never both.
    """
    from deltalake import CommitProperties
    from deltalake.transaction import AddAction, RemoveAction

    table = ensure_table(store, path, schema)
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    actions: list[AddAction | RemoveAction] = [
        AddAction(f.path, f.size, {}, now, True, f.stats) for f in files]
    actions += [RemoveAction(p, True, now) for p in replace or []]
    if not actions:
        return int(table.version())
    custom = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    table.create_write_transaction(actions, mode="append", schema=delta_schema(schema),
                                   commit_properties=CommitProperties(custom_metadata=custom))
    table.update_incremental()
    return int(table.version())


def committed_paths(store: FeatureStore, path: str) -> list[str]:
    """Relative paths of the current snapshot's data files."""
    table = open_table(store, path)
    if table is None:
        return []
    return [str(p) for p in table.get_add_actions(flatten=True).column("path").to_pylist()]


def _merge_stats(parts: list[dict[str, Any]], rows: int) -> str:
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for part in parts:
        for k, v in part["minValues"].items():
            mins[k] = v if k not in mins else min(mins[k], v)
        for k, v in part["maxValues"].items():
            maxs[k] = v if k not in maxs else max(maxs[k], v)
        for k, v in part["nullCount"].items():
            nulls[k] = nulls.get(k, 0) + v
    return json.dumps({"numRecords": rows, "minValues": mins, "maxValues": maxs,
                       "nullCount": nulls})


def _stats(table: pa.Table) -> dict[str, Any]:
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for name in STATS_COLUMNS:
        if name not in table.column_names or table.num_rows == 0:
            continue
        column = table.column(name)
        nulls[name] = int(column.null_count)
        if pa.types.is_string(column.type) or pa.types.is_integer(column.type):
            mm = pc.min_max(column)
            if mm["min"].is_valid:
                mins[name], maxs[name] = mm["min"].as_py(), mm["max"].as_py()
    return {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs,
            "nullCount": nulls}
