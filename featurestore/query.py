"""SQL over the store: DuckDB views named after the tables, and result formatting.

Views: ``tracks``, ``segments`` (summary columns; one feature set, by default the newest with
commits), ``track_tags`` (the files' own tags, from ``tracks``) and ``sources`` (the latest
record of every source URI); ``scores``,
``segment_scores`` and ``neighbours`` of one scored model version (by default the most recently
scored), ``score_classes`` (the class behind each position of ``probabilities``) and
``score_models`` (every scored model version). Views read committed files only (from the
Delta snapshots), so a query never sees work in progress.
"""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from featurestore.neighbours import NEIGHBOURS_SCHEMA
from featurestore.schema import SOURCES_SCHEMA, TRACKS_SCHEMA, segments_schema
from featurestore.scores import (
    ScoredModel,
    ScoreStore,
    scores_schema,
    segment_scores_schema,
)
from featurestore.store import FeatureStore
from tasks.columns import TAG_COLUMNS
from tasks.errors import ParameterError, StoreError

OUTPUT_FORMATS = ("table", "csv", "json")


READ_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})
"""Statement types ``mtag query`` runs unless writes are allowed."""


def connect(store: FeatureStore, feature_set: str | None = None, model: str | None = None,
            *, as_of: dict[str, int] | str | None = None, read_only: bool = True
            ) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with the store's views.

    Parameters
    ----------
    store : FeatureStore
    feature_set : str, optional
        Feature set for ``tracks`` and ``segments``; defaults to the newest with commits.
    model : str, optional
        Scored model version for ``scores``, ``segment_scores`` and ``neighbours``:
        ``NAME/VERSION`` or ``NAME`` (its most recently scored version); defaults to the most
        recently scored version of any model.
    as_of : dict or str, optional
        Read ``tracks`` and ``segments`` as they were: table versions (``{"tracks": 12,
        "segments": 12}``, as training records them) or an ISO timestamp.
    read_only : bool
        Confine the connection to the store: no file outside it can be read or written, no
        extension installed or loaded, no database attached, and the settings are locked
        (a query cannot lift them). :func:`run_query` also refuses statements other than
        ``SELECT``/``EXPLAIN``.

    Returns
    -------
    duckdb.DuckDBPyConnection
    """
    con = duckdb.connect()
    if not store.is_local:  # views over an object store read through the store's filesystem
        from featurestore.remote import configure_duckdb

        configure_duckdb(con, store)
    try:
        fs_id = feature_set or store.default_feature_set()
    except StoreError:
        fs_id = None
    if isinstance(as_of, str) and fs_id:  # a timestamp: the commits' own times decide (see
        as_of = store.versions_as_of(fs_id, as_of)  # FeatureStore.versions_as_of)

    def version(table: str) -> int | str | None:
        return as_of.get(table) if isinstance(as_of, dict) else as_of

    _parquet_view(con, "tracks", store, store.files(fs_id, "tracks", version("tracks"))
                  if fs_id else [], TRACKS_SCHEMA)
    seg_schema = segments_schema(store.config(fs_id)) if fs_id else pa.schema(
        [pa.field("track_id", pa.string()), pa.field("segment", pa.int32())])
    _parquet_view(con, "segments", store, store.files(fs_id, "segments", version("segments"))
                  if fs_id else [], seg_schema)
    tag_columns = ", ".join(col for col, _ in TAG_COLUMNS)
    try:
        con.execute(f"CREATE VIEW track_tags AS SELECT track_id, path, {tag_columns} "
                    "FROM tracks")
    except duckdb.Error:  # a damaged tracks file stopped the footer scan (see _parquet_view)
        _parquet_view(con, "track_tags", store, [], pa.schema(
            [TRACKS_SCHEMA.field(c) for c in ("track_id", "path", *dict(TAG_COLUMNS))]))
    _parquet_view(con, "sources_log", store, store.source_files(), SOURCES_SCHEMA)
    con.execute(
        "CREATE VIEW sources AS SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER "
        "(PARTITION BY uri ORDER BY seen_at DESC) AS rn FROM sources_log) WHERE rn = 1"
    )
    _score_views(con, store, model)
    if read_only:
        _confine(con, store)
    return con


def _confine(con: duckdb.DuckDBPyConnection, store: FeatureStore) -> None:
    root = store.root if store.is_local else store.uri(store.root)
    con.execute("SET allowed_directories = [?]", [root.rstrip("/") + "/"])
    for setting in ("enable_external_access", "autoinstall_known_extensions",
                    "autoload_known_extensions"):
        con.execute(f"SET {setting} = false")
    con.execute("SET lock_configuration = true")


def _score_views(con: duckdb.DuckDBPyConnection, store: FeatureStore, model: str | None) -> None:
    scores = ScoreStore(store)
    known = scores.models()
    try:
        chosen = scores.pick(model) if known or model else None
    except StoreError as exc:
        raise ParameterError(str(exc)) from exc
    if chosen is None:
        placeholder = ScoredModel("", "", "", "", ["?"], False, 0.0, 1, "", "")
        _parquet_view(con, "scores", store, [], scores_schema(placeholder))
        _parquet_view(con, "segment_scores", store, [], segment_scores_schema(placeholder))
        _parquet_view(con, "neighbours", store, [], NEIGHBOURS_SCHEMA)
    else:
        name, version = chosen.name, chosen.version
        _parquet_view(con, "scores", store, scores.files(name, version, "scores"),
                      scores_schema(chosen))
        _parquet_view(con, "segment_scores", store,
                      scores.files(name, version, "segment_scores"),
                      segment_scores_schema(chosen))
        _parquet_view(con, "neighbours", store, scores.neighbours_files(name, version),
                      NEIGHBOURS_SCHEMA)
    classes = pa.table({
        "model_name": [r["name"] for r in known for _ in r["classes"]],
        "model_version": [r["version"] for r in known for _ in r["classes"]],
        "position": pa.array([i + 1 for r in known for i in range(len(r["classes"]))],
                             pa.int32()),
        "class": [c for r in known for c in r["classes"]],
    })
    con.register("_score_classes", classes)
    con.execute("CREATE VIEW score_classes AS SELECT * FROM _score_classes")
    models = pa.table({
        "model_name": [r["name"] for r in known],
        "model_version": [r["version"] for r in known],
        "architecture": [r.get("architecture") for r in known],
        "feature_set": [r["feature_set"] for r in known],
        "tracks": pa.array([r["n_tracks"] for r in known], pa.int64()),
        "last_scored_at": [r["last_committed_at"] for r in known],
        "in_views": [chosen is not None and (r["name"], r["version"]) ==
                     (chosen.name, chosen.version) for r in known],
    })
    con.register("_score_models", models)
    con.execute("CREATE VIEW score_models AS SELECT * FROM _score_models")


def _parquet_view(con: duckdb.DuckDBPyConnection, name: str, store: FeatureStore,
                  paths: list[str], schema: pa.Schema) -> None:
    if not paths:
        con.register(f"_{name}_empty", schema.empty_table())
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_empty")
        return
    files = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
    # files written before a column was added lack it: read them by name, null-filled; that
    # reads every footer now, so if one file is damaged the view is made without it, and
    # the damaged file is named by the queries that read it (not by every query)
    try:
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{files}], "
                    "union_by_name = true)")
    except duckdb.Error:
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{files}])")


def run_query(con: duckdb.DuckDBPyConnection, sql: str, *, allow_writes: bool = False
              ) -> pa.Table:
    """Run ``sql`` and return the result as an Arrow table.

    Raises
    ------
    ParameterError
        If DuckDB rejects the query (the message names the problem), or the query would
        write, attach or install something and ``allow_writes`` is off.
    """
    try:
        if not allow_writes:
            kinds = {s.type.name for s in con.extract_statements(sql)}
            if kinds - READ_STATEMENTS:
                raise ParameterError(
                    f"mtag query is read-only: {', '.join(sorted(kinds - READ_STATEMENTS))} "
                    "statements are refused (use --output FILE to save a result, or "
                    "--allow-writes)")
        return con.sql(sql).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise ParameterError(f"query refused: {exc} (mtag query reads the store's tables "
                             "only; --allow-writes lifts this)") from exc
    except duckdb.IOException as exc:
        raise ParameterError(f"query failed: {exc}. A store file may be damaged: `mtag "
                             "verify --store STORE` names it and `--repair` quarantines it"
                             ) from exc
    except duckdb.Error as exc:
        raise ParameterError(f"query failed: {exc}") from exc


def write_result(table: pa.Table, output: str) -> None:
    """Write a result to ``output``; the format follows its extension (csv, json, parquet)."""
    ext = os.path.splitext(output)[1].lower()
    con = duckdb.connect()
    con.register("result", table)
    if ext == ".csv":
        con.execute(f"COPY result TO '{_q(output)}' (FORMAT csv, HEADER)")
    elif ext == ".json":
        con.execute(f"COPY result TO '{_q(output)}' (FORMAT json, ARRAY true)")
    elif ext in (".parquet", ".pq"):
        con.execute(f"COPY result TO '{_q(output)}' (FORMAT parquet)")
    else:
        raise ParameterError(f"--output must end in .csv, .json or .parquet, got {output!r}")


def format_result(table: pa.Table, fmt: str, *, max_rows: int = 100) -> str:
    """Render a result for stdout as an aligned table, CSV or JSON (an array of objects)."""
    if fmt not in OUTPUT_FORMATS:
        raise ParameterError(f"format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    if fmt in ("csv", "json"):
        table = _plain_decimals(_shortest_float32(table))
    frame = table.to_pandas(types_mapper=pd.ArrowDtype)
    if fmt == "csv":
        return str(frame.to_csv(index=False))
    if fmt == "json":
        return str(frame.to_json(orient="records", date_format="iso", indent=1))
    if len(frame) == 0:
        return " | ".join(table.column_names) + "\n(0 rows)\n"
    shown = frame.head(max_rows)
    text = str(shown.to_string(index=False, max_colwidth=60, float_format=_fmt_float))
    more = f"\n... {len(frame) - max_rows} more rows" if len(frame) > max_rows else ""
    return f"{text}{more}\n({len(frame)} row{'' if len(frame) == 1 else 's'})\n"


def _shortest_float32(table: pa.Table) -> pa.Table:
    """float32 columns as the shortest decimals that round-trip (270.7, not 270.70001…)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_float32(field.type):
            values = table.column(i).to_numpy(zero_copy_only=False)
            short = [None if np.isnan(v) else float(np.format_float_positional(v, unique=True))
                     for v in values.astype(np.float32)]
            nulls = table.column(i).is_null().to_pylist()
            short = [None if n else v for v, n in zip(short, nulls, strict=True)]
            table = table.set_column(i, pa.field(field.name, pa.float64()), pa.array(short))
    return table


def _plain_decimals(table: pa.Table) -> pa.Table:
    """Decimal columns (DuckDB's ``sum`` of integers is a 128-bit integer) as JSON numbers:
    int64 when the scale is 0 and every value fits, float64 otherwise.
    """
    for i, field in enumerate(table.schema):
        if pa.types.is_decimal(field.type):
            column = table.column(i)
            target = pa.int64() if field.type.scale == 0 else pa.float64()
            try:
                cast = column.cast(target)
            except pa.ArrowInvalid:
                cast = column.cast(pa.float64())
            table = table.set_column(i, pa.field(field.name, cast.type), cast)
    return table


def _fmt_float(x: float) -> str:
    return f"{x:.4g}"


def _q(path: str) -> str:
    return path.replace("'", "''")
