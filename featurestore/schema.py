"""Arrow schemas of the store's tables, and the metadata every file carries.

Tables
------
``tracks``     one row per track per feature set: source, status, audio facts, levels (Delta).
``segments``   one row per (track, segment): timing and summary statistics (Delta).
``tensors``    one row per (track, segment): dense log-mel and MFCC matrices (Arrow IPC files,
               named by the ``segments`` rows that reference them).
``sources``    one row per source URI listing: size, mtime, content hash (Delta, append-only).

Writers cast to these schemas before writing; readers check them with :func:`check_schema`.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from tasks.columns import descriptor_fields, summary_columns, tag_fields
from tasks.config import FeatureConfig
from tasks.errors import SchemaError
from tasks.version import CODE_VERSION

SCHEMA_VERSION = 2

TRACKS_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("stage", pa.string()),
    pa.field("error", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("sample_rate", pa.int32()),
    pa.field("channels", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("peak_dbfs", pa.float64()),
    pa.field("rms_dbfs", pa.float64()),
    pa.field("n_segments", pa.int32()),
    pa.field("feature_set", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us", tz="UTC")),
    pa.field("compute_s", pa.float64()),
    pa.field("tensor_file", pa.string()),
    pa.field("retry", pa.bool_()),
    pa.field("declared_duration_s", pa.float64()),
    pa.field("truncated", pa.bool_()),
    pa.field("warning", pa.string()),
    *descriptor_fields(),
    *tag_fields(),
])
"""Columns added after the first release (``retry`` onwards) are added to existing tables on
their next commit (:func:`featurestore.tables.ensure_table`); older rows read them as null."""

SOURCES_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("mtime", pa.float64()),
    pa.field("content_hash", pa.string()),
    pa.field("track_id", pa.string()),
    pa.field("seen_at", pa.timestamp("us", tz="UTC")),
    pa.field("status", pa.string()),  # null or "present": listed; "gone": no longer listed
])


def segments_schema(config: FeatureConfig) -> pa.Schema:
    """Schema of the ``segments`` Parquet table for ``config``.

    Columns: ``track_id``, ``segment``, ``start_s``, ``duration_s`` (valid seconds),
    ``valid_frames``, then one ``float32`` column per summary statistic
    (:func:`tasks.track.summary_columns`), then where the segment's dense tensors are:
    ``shard``, ``tensor_file`` (relative to the feature set's folder) and ``tensor_row``.
    """
    fields = [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("valid_frames", pa.int32()),
    ]
    fields += [pa.field(name, pa.float32()) for name in summary_columns(config)]
    fields += [pa.field("shard", pa.string()), pa.field("tensor_file", pa.string()),
               pa.field("tensor_row", pa.int64())]
    return with_metadata(pa.schema(fields), config)


def tensors_schema(config: FeatureConfig) -> pa.Schema:
    """Schema of the dense ``tensors`` Arrow IPC file for ``config``.

    ``logmel`` and ``mfcc`` are fixed-size lists of ``float32`` holding row-major matrices of
    shape ``(n_mels, F)`` and ``(n_mfcc, F)``, ``F = config.segment_frames``; the shapes are
    also in the schema metadata under ``mtag.shapes``.
    """
    frames = config.segment_frames
    schema = pa.schema([
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("valid_frames", pa.int32()),
        pa.field("logmel", pa.list_(pa.float32(), config.n_mels * frames)),
        pa.field("mfcc", pa.list_(pa.float32(), config.n_mfcc * frames)),
    ])
    shapes = {"logmel": [config.n_mels, frames], "mfcc": [config.n_mfcc, frames]}
    return with_metadata(schema, config, {"mtag.shapes": json.dumps(shapes)})


def with_metadata(
    schema: pa.Schema, config: FeatureConfig, extra: dict[str, str] | None = None
) -> pa.Schema:
    """Attach feature-set id, config, code version and schema version to ``schema``."""
    meta = {
        "mtag.schema_version": str(SCHEMA_VERSION),
        "mtag.feature_set": config.feature_set_id,
        "mtag.config": config.to_json(),
        "mtag.code_version": CODE_VERSION,
        **(extra or {}),
    }
    return schema.with_metadata(meta)


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """Decode the ``mtag.*`` metadata of a file's schema.

    Returns
    -------
    dict
        Keys ``feature_set``, ``config`` (dict), ``code_version``, ``schema_version`` and
        ``shapes`` (dict, tensors files only).
    """
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if "mtag.feature_set" not in meta:
        raise SchemaError("file has no mtag metadata (not written by this project?)")
    return {
        "feature_set": meta["mtag.feature_set"],
        "config": json.loads(meta["mtag.config"]),
        "code_version": meta.get("mtag.code_version"),
        "schema_version": int(meta.get("mtag.schema_version", "0")),
        "shapes": json.loads(meta.get("mtag.shapes", "{}")),
    }


def check_schema(actual: pa.Schema, expected: pa.Schema, what: str) -> None:
    """Raise :class:`~tasks.errors.SchemaError` unless ``actual`` has ``expected``'s fields."""
    missing = [f.name for f in expected if f.name not in actual.names]
    wrong = [
        f"{f.name}: {actual.field(f.name).type} != {f.type}"
        for f in expected
        if f.name in actual.names and not actual.field(f.name).type.equals(f.type)
    ]
    if missing or wrong:
        raise SchemaError(f"{what}: schema mismatch; missing {missing}, wrong types {wrong}")
