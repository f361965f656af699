"""Score tables in the store: where scores, segment scores and neighbours live, their schemas,
the part writer and the commits.

Layout under the store root, one folder per scored model version::

    scores/<model>/v<version>/model.json                    the model's record (classes, ...)
    scores/<model>/v<version>/parts/<part>/scores.parquet   one row per track
    scores/<model>/v<version>/parts/<part>/segment_scores.parquet
    scores/<model>/v<version>/_manifests/<part>.json        commit record: feature shards done
    neighbours/<model>/v<version>/runs/<run>/part-*.parquet  all-pairs neighbours
    neighbours/<model>/v<version>/current.json               commit record of the current run

A part covers whole feature shards; its manifest names them, so scoring again skips them and a
new model version writes beside the old one. Parts are staged and committed like feature
shards (:meth:`FeatureStore.commit_folder`). ``<model>`` is the registered name made path-safe.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore.hashing import short_hash
from featurestore.neighbours import NeighbourRun
from featurestore.store import FeatureStore
from tasks.errors import StoreError
from tasks.version import CODE_VERSION

SCORES_ROW_GROUP = 8192
"""Rows per row group of ``scores`` (a 512-d embedding row is ~2 KiB: ~20 MiB per group)."""

SEGMENT_SCORES_ROW_GROUP = 65536
"""Rows per row group of ``segment_scores``."""

SCORE_TABLES = {"scores": "scores.parquet", "segment_scores": "segment_scores.parquet"}


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
class ScoreManifest:
    """Commit record of one scored part."""

    part_id: str
    shards: list[str]
    n_tracks: int
    n_segments: int
    model_name: str
    model_version: str
    feature_set: str
    committed_at: str = ""
    code_version: str = CODE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreManifest:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


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
        pa.field("tags", pa.list_(pa.string())),
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_probabilities", pa.list_(pa.float32())),
        pa.field("probabilities", pa.list_(pa.float32(), n)),
        pa.field("embedding", pa.list_(pa.float32(), d)),
        pa.field("n_segments", pa.int32()),
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
        known = self.store.read_record(target)
        if known.get("run_id") != model.run_id:
            raise StoreError(
                f"this store holds scores of {model.name} v{model.version} from MLflow run "
                f"{known.get('run_id')}, but the registry's v{model.version} is run "
                f"{model.run_id}: is MLFLOW_TRACKING_URI pointing at another registry? "
                "Register under another name, or delete "
                f"{self.model_root(model.name, model.version)} to score again.")

    def models(self) -> list[dict[str, Any]]:
        """Every scored model version's record with its part count and last commit, oldest
        commit first (versions with no committed part are left out).
        """
        out = []
        for path in self.store.fs.glob(self.store.path("scores", "*", "v*", "model.json")):
            record = self.store.read_record(path)
            manifests = self.manifests(record["name"], record["version"])
            if manifests:
                out.append(record | {
                    "parts": len(manifests),
                    "n_tracks": sum(m.n_tracks for m in manifests),
                    "last_committed_at": max(m.committed_at for m in manifests)})
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

    # --- parts ----------------------------------------------------------------------------
    def manifests(self, name: str, version: str) -> list[ScoreManifest]:
        """Commit records of a version's parts, by part id."""
        paths = self.store.fs.glob(f"{self.model_root(name, version)}/_manifests/*.json")
        return [ScoreManifest.from_dict(self.store.read_record(p)) for p in sorted(paths)]

    def scored_shards(self, name: str, version: str) -> set[str]:
        """Feature shards a version has already scored."""
        return {s for m in self.manifests(name, version) for s in m.shards}

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
        tables = []
        for path in self.files(model.name, model.version, "scores"):
            with self.store.fs.open(path, "rb") as fh:
                tables.append(pq.read_table(fh, columns=["track_id", "path", "label",
                                                         "embedding"]))
        if not tables:
            raise StoreError(f"model {model.name} v{model.version} has no committed scores")
        table = pa.concat_tables(tables).sort_by("track_id")
        column = table["embedding"].combine_chunks()
        emb = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column),
                                                                      model.embed_dim)
        return table.drop(["embedding"]).to_pandas(), np.ascontiguousarray(emb, np.float32)

    def source_digest(self, name: str, version: str) -> str:
        """Names the committed parts of a version (a neighbours run records what it read)."""
        parts = sorted(m.part_id for m in self.manifests(name, version))
        return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()

    def files(self, name: str, version: str, table: str) -> list[str]:
        """Committed files of ``table`` (``scores`` or ``segment_scores``) of a version."""
        root = self.model_root(name, version)
        return [f"{root}/parts/{m.part_id}/{SCORE_TABLES[table]}"
                for m in self.manifests(name, version)]

    def staging_dir(self, model: ScoredModel, part_id: str) -> str:
        """A fresh staging folder for one attempt at a part."""
        return self.store.staging_dir("scores", model_dir_name(model.name),
                                      f"v{model.version}", part_id)

    def commit(self, staged_dir: str, manifest: ScoreManifest) -> bool:
        """Publish a staged part; ``False`` if it was already committed."""
        root = self.model_root(manifest.model_name, manifest.model_version)
        return self.store.commit_folder(staged_dir, f"{root}/parts/{manifest.part_id}",
                                  f"{root}/_manifests/{manifest.part_id}.json",
                                  manifest.to_dict())

    def recover(self) -> int:
        """Delete part folders that have no manifest (left by a crash); return how many."""
        removed = 0
        fs = self.store.fs
        for record in fs.glob(self.store.path("scores", "*", "v*", "model.json")):
            root = record.rsplit("/", 1)[0]
            committed = {p.rsplit("/", 1)[1][:-5] for p in fs.glob(f"{root}/_manifests/*.json")}
            for part in fs.glob(f"{root}/parts/*"):
                if part.rstrip("/").rsplit("/", 1)[1] not in committed:
                    fs.rm(part, recursive=True)
                    removed += 1
        return removed

    # --- neighbours -----------------------------------------------------------------------
    def neighbours_current(self, name: str, version: str) -> dict[str, Any] | None:
        """The committed neighbours run of a version (``current.json``), or None."""
        target = f"{self.model_root(name, version, 'neighbours')}/current.json"
        if not self.store.fs.exists(target):
            return None
        return self.store.read_record(target)

    def neighbours_run_dir(self, name: str, version: str, run_id: str) -> str:
        """Folder of one neighbours run (invisible until :meth:`commit_neighbours`)."""
        return f"{self.model_root(name, version, 'neighbours')}/runs/{run_id}"

    def neighbours_files(self, name: str, version: str) -> list[str]:
        """Committed part files of the current neighbours run."""
        current = self.neighbours_current(name, version)
        if current is None:
            return []
        run = self.neighbours_run_dir(name, version, current["run_id"])
        return [f"{run}/{p}" for p in current["parts"]]

    def neighbour_run(self, name: str, version: str, run_id: str) -> NeighbourRun:
        """The files of one neighbours run (see :class:`featurestore.neighbours.NeighbourRun`)."""
        return NeighbourRun(self.store, self.neighbours_run_dir(name, version, run_id))

    def neighbours_of(self, name: str, version: str, track_id: str) -> pd.DataFrame:
        """``rank``, ``neighbour_id``, ``similarity`` of ``track_id`` in the current run."""
        import pyarrow.dataset as ds

        data = ds.dataset(self.neighbours_files(name, version), format="parquet",
                          filesystem=self.store.fs)
        return data.to_table(columns=["rank", "neighbour_id", "similarity"],
                             filter=ds.field("track_id") == track_id).to_pandas()

    def commit_neighbours(self, name: str, version: str, record: dict[str, Any]) -> None:
        """Make a finished run current (its record is written last), then drop older runs."""
        root = self.model_root(name, version, "neighbours")
        self.store.write_record(f"{root}/current.json", record | {"committed_at": _now()})
        for run in self.store.fs.glob(f"{root}/runs/*"):
            if run.rstrip("/").rsplit("/", 1)[1] != record["run_id"]:
                self.store.fs.rm(run, recursive=True)


# --- writer ---------------------------------------------------------------------------------
class ScorePartWriter:
    """Write one part's ``scores`` and ``segment_scores`` into a staging folder.

    A context manager: rows are appended per feature shard with :meth:`add`, Parquet row groups
    are flushed as they fill (a reader never loads more than one row group at once), and the
    counts for the manifest are in :attr:`n_tracks` / :attr:`n_segments` afterwards.
    """

    def __init__(self, store: FeatureStore, directory: str, model: ScoredModel) -> None:
        self.store, self.directory, self.model = store, directory, model
        self.schemas = {"scores": scores_schema(model),
                        "segment_scores": segment_scores_schema(model)}
        self.row_groups = {"scores": SCORES_ROW_GROUP,
                           "segment_scores": SEGMENT_SCORES_ROW_GROUP}
        self.n_tracks = 0
        self.n_segments = 0
        self._pending: dict[str, list[pa.Table]] = {t: [] for t in SCORE_TABLES}
        self._rows = dict.fromkeys(SCORE_TABLES, 0)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._sinks: dict[str, Any] = {}

    def __enter__(self) -> ScorePartWriter:
        for table, filename in SCORE_TABLES.items():
            self._sinks[table] = self.store.fs.open(f"{self.directory}/{filename}", "wb")
            self._writers[table] = pq.ParquetWriter(self._sinks[table], self.schemas[table],
                                                    compression="zstd")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            for table in SCORE_TABLES:
                self._flush(table, final=True)
        for table in SCORE_TABLES:
            self._writers[table].close()
            self._sinks[table].close()

    def add(self, tracks: dict[str, Any], segments: dict[str, Any]) -> None:
        """Append track rows and segment rows (column name -> array or list)."""
        stamp = {"model_name": self.model.name, "model_version": self.model.version,
                 "model_run_id": self.model.run_id, "feature_set": self.model.feature_set}
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
            self._writers[table].write_table(data.slice(0, cut), row_group_size=size)
        rest = data.slice(cut)
        self._pending[table] = [rest] if len(rest) else []
        self._rows[table] = len(rest)


def _array(values: Any, type_: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(type_):
        x = np.ascontiguousarray(values, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type_.list_size)
    if isinstance(values, np.ndarray) and values.dtype != object:
        return pa.array(values, type_)
    return pa.array(list(values), type_)


def part_id_of(model: ScoredModel, shards: Iterable[str]) -> str:
    """Deterministic part id from the model version and the feature shards it covers."""
    return "p-" + short_hash(model.name, model.version, *sorted(shards))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
