"""Score tables in the store: where scores, segment scores and neighbours live, their schemas,
the part writer and the commits.

Layout under the store root, one folder per scored model version::

    scores/<model>/v<version>/model.json             the model's record (classes, ...)
    scores/<model>/v<version>/scores/                Delta: one row per track
    scores/<model>/v<version>/segment_scores/        Delta: one row per (track, segment)
    neighbours/<model>/v<version>/neighbours/        Delta: the current all-pairs run
    neighbours/<model>/v<version>/current.json       the current run's record
    neighbours/<model>/v<version>/runs/<run>/        a run's embedding matrix and index

A part covers whole feature shards (every row carries its ``shard``), so scoring again skips
shards the version has scored, and a new model version writes beside the old one. Workers
write a part's files into the tables' folders; :meth:`ScoreStore.commit_parts` commits them
(segment scores, then scores) under the store's commit lease, leaving out shards another
writer scored first. ``<model>`` is the registered name made path-safe.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from featurestore import tables
from featurestore.hashing import short_hash
from featurestore.neighbours import NEIGHBOURS_SCHEMA, NeighbourRun
from featurestore.store import FeatureStore
from featurestore.tables import DataFile
from tasks.errors import StoreError
from tasks.version import CODE_VERSION

SCORES_ROW_GROUP = 8192
"""Rows per row group of ``scores`` (a 512-d embedding row is ~2 KiB: ~20 MiB per group)."""

SEGMENT_SCORES_ROW_GROUP = 65536
"""Rows per row group of ``segment_scores``."""

SCORE_TABLES = ("scores", "segment_scores")


@dataclass(frozen=True)
class ScoredModel:
    """What scoring needs to know of a registered model version (``model.json``)."""

    name: str
    version: str
    run_id: str
    feature_set: str
    classes: list[str]
    multi_label: bool
    threshold: float
    embed_dim: int
    input: str
    architecture: str
    code_version: str = CODE_VERSION

    @property
    def uri(self) -> str:
        """The exact registry URI of this version (never an alias, which can move)."""
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoredModel:
        """Inverse of :meth:`to_dict` (extra keys are ignored)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class WrittenPart:
    """What a scoring task wrote for one part, not yet committed."""

    part_id: str
    shards: list[str]
    n_tracks: int
    n_segments: int
    scores_file: DataFile | None
    segment_scores_file: DataFile | None


def model_dir_name(name: str) -> str:
    """A registered model name as one path component (unsafe characters replaced, and a
    short hash added when anything was replaced, so two names never share a folder).
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "model"
    return safe if safe == name else f"{safe}-{short_hash(name, digest_size=3)}"


# --- schemas --------------------------------------------------------------------------------
def scores_schema(model: ScoredModel) -> pa.Schema:
    """Schema of ``scores``: one row per track and model version.

    ``probabilities`` follows ``model.classes`` (also in the metadata, and in the
    ``score_classes`` view); ``embedding`` is L2-normalised.
    """
    n, d = len(model.classes), model.embed_dim
    return _meta(pa.schema([
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("probability", pa.float32()),
        pa.field("confident", pa.bool_()),
        pa.field("novelty", pa.float32()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_probabilities", pa.list_(pa.float32())),
        pa.field("probabilities", pa.list_(pa.float32(), n)),
        pa.field("embedding", pa.list_(pa.float32(), d)),
        pa.field("n_segments", pa.int32()),
        pa.field("shard", pa.string()),
        *_lineage_fields(),
    ]), model)


def segment_scores_schema(model: ScoredModel) -> pa.Schema:
    """Schema of ``segment_scores``: one row per (track, segment) and model version."""
    return _meta(pa.schema([
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64()),
        pa.field("label", pa.string()),
        pa.field("probability", pa.float32()),
        pa.field("confident", pa.bool_()),
        pa.field("probabilities", pa.list_(pa.float32(), len(model.classes))),
        pa.field("shard", pa.string()),
        *_lineage_fields(),
    ]), model)


def _lineage_fields() -> list[pa.Field]:
    return [
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("model_run_id", pa.string()),
        pa.field("feature_set", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC")),
    ]


def _meta(schema: pa.Schema, model: ScoredModel) -> pa.Schema:
    return schema.with_metadata({"mtag.model": json.dumps(model.to_dict()),
                                 "mtag.classes": json.dumps(model.classes),
                                 "mtag.code_version": CODE_VERSION})


# --- the score area of a store ----------------------------------------------------------------
class ScoreStore:
    """Score parts and neighbour runs of the models scored in a feature store.

    Parameters
    ----------
    store : FeatureStore
    """

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def model_root(self, name: str, version: str, area: str = "scores") -> str:
        """Folder of one model version in ``area`` (``scores`` or ``neighbours``)."""
        return self.store.path(area, model_dir_name(name), f"v{version}")

    # --- models ---------------------------------------------------------------------------
    def register_model(self, model: ScoredModel) -> None:
        """Write ``model.json`` of a version (idempotent)."""
        target = f"{self.model_root(model.name, model.version)}/model.json"
        if not self.store.fs.exists(target):
            self.store.write_record(target, model.to_dict() | {"registered_at": _now()})
            return
        self.check_model(model)

    def check_model(self, model: ScoredModel) -> None:
        """Refuse ``model`` when the scores this store holds for its name and version came
        from another MLflow run (another registry); nothing to check before its first scores.
        """
        target = f"{self.model_root(model.name, model.version)}/model.json"
        if not self.store.fs.exists(target):
            return
        known = self.store.read_record(target)
        if known.get("run_id") != model.run_id:
            raise StoreError(
                f"this store holds scores of {model.name} v{model.version} from MLflow run "
                f"{known.get('run_id')}, but the registry's v{model.version} is run "
                f"{model.run_id}: is MLFLOW_TRACKING_URI pointing at another registry? "
                "Register under another name, or delete "
                f"{self.model_root(model.name, model.version)} to score again.")

    def models(self) -> list[dict[str, Any]]:
        """Every scored model version's record with its scored track count and last commit,
        oldest commit first (versions with nothing committed are left out).
        """
        out = []
        for path in self.store.fs.glob(self.store.path("scores", "*", "v*", "model.json")):
            record = self.store.read_record(path)
            table = tables.open_table(self.store, self.table_path(record["name"],
                                                                  record["version"], "scores"))
            if table is None or not table.file_uris():
                continue
            last = max(int(h["timestamp"]) for h in table.history(5))
            out.append(record | {
                "n_tracks": int(table.count()),
                "table_version": int(table.version()),
                "last_committed_at": dt.datetime.fromtimestamp(last / 1000, dt.UTC).isoformat(
                    timespec="microseconds")})
        return sorted(out, key=lambda r: r["last_committed_at"])

    def latest(self) -> ScoredModel:
        """The most recently scored model version."""
        found = self.models()
        if not found:
            raise StoreError(f"store {self.store.url} has no scores yet (run `mtag score`)")
        return ScoredModel.from_dict(found[-1])

    def pick(self, model: str | None = None) -> ScoredModel:
        """The scored version that ``model`` names: ``NAME/VERSION``, ``NAME`` (its most
        recently scored version) or None (the most recently scored of all).

        Raises
        ------
        StoreError
            If the store holds no scores of that model.
        """
        known = self.models()
        if not known:
            raise StoreError(f"store {self.store.url} has no scores yet (run `mtag score`)")
        if model is None:
            return ScoredModel.from_dict(known[-1])
        ref = model.removeprefix("models:/")
        name, _, version = ref.rpartition("/")
        if not (name and version.isdigit()):
            name, version = ref, ""
        found = [r for r in known if r["name"] == name and version in ("", r["version"])]
        if not found:
            have = ", ".join(f"{r['name']}/{r['version']}" for r in known)
            raise StoreError(f"no scores of model {model!r} in {self.store.url} "
                             f"(scored: {have})")
        return ScoredModel.from_dict(found[-1])

    # --- tables -------------------------------------------------------------------------
    def table_path(self, name: str, version: str, table: str) -> str:
        """Folder of a version's Delta table (``scores``, ``segment_scores``, ``neighbours``)."""
        area = "neighbours" if table == "neighbours" else "scores"
        return f"{self.model_root(name, version, area)}/{table}"

    def read(self, name: str, version: str, table: str, columns: list[str] | None = None, *,
             filter: Any = None) -> pa.Table:
        """Rows of one of a version's tables (no rows if it has none yet)."""
        path = self.table_path(name, version, table)
        if tables.open_table(self.store, path) is None:
            return pa.table({c: pa.array([], pa.string()) for c in columns or []})
        return tables.read_snapshot(self.store, path, columns, filter)

    def scored_shards(self, name: str, version: str) -> set[str]:
        """Feature shards a version has already scored."""
        rows = self.read(name, version, "scores", ["shard"])
        return set(pc.unique(rows["shard"]).to_pylist()) if rows.num_rows else set()

    def embeddings(self, model: ScoredModel) -> tuple[pd.DataFrame, np.ndarray]:
        """Every scored track of ``model`` (``track_id``, ``path``, ``label``) and its embedding.

        Returns
        -------
        tracks : pandas.DataFrame
            Sorted by ``track_id``.
        embeddings : np.ndarray [shape=(n, d), dtype=float32]

        Raises
        ------
        StoreError
            If the version has no committed scores.
        """
        table = self.read(model.name, model.version, "scores",
                          ["track_id", "path", "label", "embedding"])
        if table.num_rows == 0:
            raise StoreError(f"model {model.name} v{model.version} has no committed scores")
        table = table.sort_by("track_id")
        column = table["embedding"].combine_chunks()
        emb = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column),
                                                                      model.embed_dim)
        return table.drop(["embedding"]).to_pandas(), np.ascontiguousarray(emb, np.float32)

    def source_digest(self, name: str, version: str) -> str:
        """Names the shards a version has scored (a neighbours run records what it read)."""
        return hashlib.blake2b("\n".join(sorted(self.scored_shards(name, version))).encode(),
                               digest_size=8).hexdigest()

    def files(self, name: str, version: str, table: str) -> list[str]:
        """URIs of the current files of one of a version's tables."""
        return tables.file_uris(self.store, self.table_path(name, version, table))

    def commit_parts(self, model: ScoredModel, parts: list[WrittenPart], *,
                     run: str | None = None) -> list[str]:
        """Commit written parts under the commit lease (segment scores, then scores); parts
        with a shard the version has already scored are left out (another writer scored it
        first) and their files deleted. Returns the committed part ids.
        """
        if not parts:
            return []
        with self.store.commit_lease() as lease:
            self.store.resolve_intents()
            done = self.scored_shards(model.name, model.version)
            keep = []
            for p in parts:
                if done & set(p.shards):
                    self._delete_files(model, p)
                else:
                    keep.append(p)
                    done.update(p.shards)
            if keep:
                self.store.commit_pair(
                    lease, [s for p in keep for s in p.shards],
                    first=(self.table_path(model.name, model.version, "segment_scores"),
                           [p.segment_scores_file for p in keep if p.segment_scores_file],
                           segment_scores_schema(model)),
                    last=(self.table_path(model.name, model.version, "scores"),
                          [p.scores_file for p in keep if p.scores_file],
                          scores_schema(model)),
                    metadata={"mtag.operation": "score", "mtag.run": run or "",
                              "mtag.model": f"{model.name}/{model.version}"})
        return [p.part_id for p in keep]

    def _delete_files(self, model: ScoredModel, part: WrittenPart) -> None:
        for table, f in (("scores", part.scores_file),
                         ("segment_scores", part.segment_scores_file)):
            if f is not None:
                self.store.fs.rm(f"{self.table_path(model.name, model.version, table)}/{f.path}")

    # --- neighbours -----------------------------------------------------------------------
    def neighbours_current(self, name: str, version: str) -> dict[str, Any] | None:
        """The committed neighbours run of a version (``current.json``), or None."""
        target = f"{self.model_root(name, version, 'neighbours')}/current.json"
        if not self.store.fs.exists(target):
            return None
        return self.store.read_record(target)

    def neighbours_run_dir(self, name: str, version: str, run_id: str) -> str:
        """Folder of one neighbours run's work files (its matrix, ids and index)."""
        return f"{self.model_root(name, version, 'neighbours')}/runs/{run_id}"

    def neighbours_files(self, name: str, version: str) -> list[str]:
        """URIs of the current neighbours run's part files."""
        return self.files(name, version, "neighbours")

    def neighbour_run(self, name: str, version: str, run_id: str) -> NeighbourRun:
        """The files of one neighbours run (see :class:`featurestore.neighbours.NeighbourRun`)."""
        return NeighbourRun(self.store, self.neighbours_run_dir(name, version, run_id),
                            self.table_path(name, version, "neighbours"))

    def neighbours_of(self, name: str, version: str, track_id: str) -> pd.DataFrame:
        """``rank``, ``neighbour_id``, ``similarity`` of ``track_id`` in the current run."""
        return self.read(name, version, "neighbours", ["rank", "neighbour_id", "similarity"],
                         filter=ds.field("track_id") == track_id).to_pandas()

    def commit_neighbours(self, name: str, version: str, record: dict[str, Any],
                          parts: list[DataFile] | None = None) -> None:
        """Make a finished run current: one transaction replaces the table's files with the
        run's ``parts``, then its record is written and older runs' work files go.
        """
        path = self.table_path(name, version, "neighbours")
        with self.store.commit_lease() as lease:
            old = tables.committed_paths(self.store, path)
            lease.check()
            tables.commit_files(self.store, path, parts or [], NEIGHBOURS_SCHEMA,
                                metadata={"mtag.operation": "neighbours",
                                          "mtag.run": record["run_id"]}, replace=old)
        root = self.model_root(name, version, "neighbours")
        self.store.write_record(f"{root}/current.json", record | {"committed_at": _now()})
        for run in self.store.fs.glob(f"{root}/runs/*"):
            if run.rstrip("/").rsplit("/", 1)[1] != record["run_id"]:
                self.store.fs.rm(run, recursive=True)


# --- writer ---------------------------------------------------------------------------------
class ScorePartWriter:
    """Write one part's ``scores`` and ``segment_scores`` files into those tables' folders.

    A context manager: rows are appended per feature shard with :meth:`add`, Parquet row groups
    are flushed as they fill (a reader never loads more than one row group at once), and
    :attr:`written` describes the files to commit afterwards (nothing is visible before
    :meth:`ScoreStore.commit_parts`).
    """

    def __init__(self, scores: ScoreStore, model: ScoredModel, part_id: str) -> None:
        self.scores, self.model, self.part_id = scores, model, part_id
        self.schemas = {"scores": scores_schema(model),
                        "segment_scores": segment_scores_schema(model)}
        self.row_groups = {"scores": SCORES_ROW_GROUP,
                           "segment_scores": SEGMENT_SCORES_ROW_GROUP}
        self.n_tracks = 0
        self.n_segments = 0
        self.shards: list[str] = []
        self._pending: dict[str, list[pa.Table]] = {t: [] for t in SCORE_TABLES}
        self._rows = dict.fromkeys(SCORE_TABLES, 0)
        self._writers: dict[str, tables.DataFileWriter] = {}

    def __enter__(self) -> ScorePartWriter:
        for table in SCORE_TABLES:
            path = self.scores.table_path(self.model.name, self.model.version, table)
            tables.ensure_table(self.scores.store, path, self.schemas[table])
            self._writers[table] = tables.DataFileWriter(
                self.scores.store, path, self.schemas[table], prefix=self.part_id).__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            for table in SCORE_TABLES:
                self._flush(table, final=True)
        for table in SCORE_TABLES:
            self._writers[table].__exit__(exc_type, exc, tb)
        if exc_type is None:
            files = {t: self._writers[t].data_file if self._writers[t].rows else None
                     for t in SCORE_TABLES}
            for t, f in files.items():
                if f is None:  # an empty file is not committed
                    self.scores.store.fs.rm(self._writers[t].full)
            self.written = WrittenPart(self.part_id, list(self.shards), self.n_tracks,
                                       self.n_segments, files["scores"],
                                       files["segment_scores"])

    def add(self, tracks: dict[str, Any], segments: dict[str, Any], *, shard: str) -> None:
        """Append one feature shard's track rows and segment rows (column name -> array or
        list).
        """
        self.shards.append(shard)
        stamp = {"model_name": self.model.name, "model_version": self.model.version,
                 "model_run_id": self.model.run_id, "feature_set": self.model.feature_set,
                 "shard": shard}
        for table, columns in (("scores", tracks), ("segment_scores", segments)):
            n = len(columns["track_id"])
            if n == 0:
                continue
            now = dt.datetime.now(dt.UTC)
            arrays = []
            for f in self.schemas[table]:
                if f.name in columns:
                    arrays.append(_array(columns[f.name], f.type))
                elif f.name == "scored_at":
                    arrays.append(pa.array([now] * n, f.type))
                else:
                    arrays.append(pa.array([stamp[f.name]] * n, f.type))
            self._pending[table].append(pa.Table.from_arrays(arrays,
                                                             schema=self.schemas[table]))
            self._rows[table] += n
            self._flush(table)
        self.n_tracks += len(tracks["track_id"])
        self.n_segments += len(segments["track_id"])

    def _flush(self, table: str, *, final: bool = False) -> None:
        size = self.row_groups[table]
        if not self._pending[table] or (self._rows[table] < size and not final):
            return
        data = pa.concat_tables(self._pending[table]).combine_chunks()
        cut = len(data) if final else (len(data) // size) * size
        if cut:
            self._writers[table].write(data.slice(0, cut), row_group_size=size)
        rest = data.slice(cut)
        self._pending[table] = [rest] if len(rest) else []
        self._rows[table] = len(rest)


def _array(values: Any, type_: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(type_):
        x = np.ascontiguousarray(values, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type_.list_size)
    if isinstance(values, np.ndarray) and values.dtype != object:
        # NaN of a float column (a model without an open-set detector: novelty) is null
        return pa.array(values, type_, from_pandas=values.dtype.kind == "f")
    return pa.array(list(values), type_)


def part_id_of(model: ScoredModel, shards: Iterable[str]) -> str:
    """Deterministic part id from the model version and the feature shards it covers."""
    return "p-" + short_hash(model.name, model.version, *sorted(shards))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
