""""More like this": one track's nearest neighbours, and the all-pairs ``neighbours`` flow.

:func:`similar` answers one query: from the committed ``neighbours`` table when it is current
(a lookup), otherwise by an exact search over the scored embeddings (one matrix-vector product,
fast for millions of tracks; loading the embeddings is what costs). ``neighbours_flow`` computes
the ``k`` nearest tracks of every track: the flow writes the embedding matrix once, query blocks
fan out over Dask, each worker searching exactly (tiled matrix products) or, past
:data:`EXACT_MAX_TRACKS`, in an HNSW index built once by one task; the run becomes visible when
its record is written last.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
import os
import time
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from featurestore.scores import NEIGHBOURS_ROW_GROUP, NEIGHBOURS_SCHEMA, ScoredModel, ScoreStore
from featurestore.store import FeatureStore
from flows.cluster import dask_cluster
from flows.prefect_api import prefect_api
from flows.progress import Progress
from flows.report import publish, run_id
from tasks.errors import ParameterError, StoreError
from tasks.similarity import AnnIndex, Neighbours, exact_search, recall_at_k

RECALL_SAMPLE = 256
"""Tracks an approximate run also searches exactly, to measure its own recall@k."""
RECALL_WARN = 0.9
"""Below this sampled recall an approximate run logs a warning."""
EXACT_MAX_TRACKS = 200_000
"""Above this many tracks ``neighbours --method auto`` uses the HNSW index (see
docs/scoring.md: where the ANN build plus queries beat the exact all-pairs product)."""

ANN_BACKEND = "faiss"
ANN_PARAMS = {"connectivity": 32, "expansion_add": 128, "expansion_search": 256}
QUERY_BLOCK_MAX = 50_000


# --- embeddings ------------------------------------------------------------------------------
def pick_model(store: FeatureStore, model: str | None = None) -> ScoredModel:
    """A scored model version: ``NAME/VERSION``, ``NAME`` (latest scored) or the latest."""
    return ScoreStore(store).pick(model)


def load_embeddings(store: FeatureStore, model: ScoredModel) -> tuple[pd.DataFrame, np.ndarray]:
    """Every scored track of ``model`` (``track_id``, ``path``, ``label``) and its embedding.

    Returns
    -------
    tracks : pandas.DataFrame
        Sorted by ``track_id``.
    embeddings : np.ndarray [shape=(n, d), dtype=float32]
    """
    scores = ScoreStore(store)
    tables = []
    for path in scores.files(model.name, model.version, "scores"):
        with store.fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh, columns=["track_id", "path", "label", "embedding"]))
    if not tables:
        raise StoreError(f"model {model.name} v{model.version} has no committed scores")
    table = pa.concat_tables(tables).sort_by("track_id")
    column = table["embedding"].combine_chunks()
    emb = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), model.embed_dim)
    return table.drop(["embedding"]).to_pandas(), np.ascontiguousarray(emb, dtype=np.float32)


def find_track(store: FeatureStore, tracks: pd.DataFrame, track: str) -> int:
    """Row of ``track`` (a track id, a path or URI the store has seen, or a file to hash)."""
    hit = np.flatnonzero(tracks["track_id"].to_numpy() == track)
    if len(hit):
        return int(hit[0])
    candidates = {track}
    if "://" not in track:
        candidates.add(os.path.abspath(track))
    hit = np.flatnonzero(tracks["path"].isin(candidates).to_numpy())
    if len(hit):
        return int(hit[0])
    from featurestore.query import connect

    con = connect(store)
    try:
        rows = con.execute("SELECT track_id FROM sources WHERE uri IN (SELECT unnest(?))",
                           [sorted(candidates)]).fetchall()
    finally:
        con.close()
    for (tid,) in rows:
        hit = np.flatnonzero(tracks["track_id"].to_numpy() == tid)
        if len(hit):
            return int(hit[0])
    raise ParameterError(f"track {track!r} is not a scored track id or a known path in "
                         f"{store.url}")


def similar(store_url: str, track: str, *, k: int = 10, model: str | None = None
            ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The ``k`` tracks most like ``track`` (by cosine similarity of the model's embeddings).

    Returns
    -------
    neighbours : pandas.DataFrame
        ``rank``, ``track_id``, ``similarity``, ``label``, ``path``.
    info : dict
        The query track, the model version and how it was answered (``table`` or ``exact``).
    """
    if k < 1:
        raise ParameterError(f"k must be >= 1, got {k}")
    store = FeatureStore(store_url)
    chosen = pick_model(store, model)
    tracks, emb = load_embeddings(store, chosen)
    row = find_track(store, tracks, track)
    info = {"track_id": tracks["track_id"].iat[row], "path": tracks["path"].iat[row],
            "label": tracks["label"].iat[row], "model": f"{chosen.name}/{chosen.version}",
            "tracks": len(tracks)}
    cached = _from_table(store, chosen, info["track_id"], k)
    if cached is not None:
        found, info["method"] = cached, "table"
    else:
        result = exact_search(emb[row:row + 1], emb, min(k, max(1, len(tracks) - 1)),
                              exclude=np.array([row]))
        keep = result.index[0] >= 0
        idx = result.index[0][keep]
        found = pd.DataFrame({"rank": np.arange(1, len(idx) + 1, dtype=np.int32),
                              "track_id": tracks["track_id"].to_numpy()[idx],
                              "similarity": result.similarity[0][keep]})
        info["method"] = "exact"
    meta = tracks.set_index("track_id")
    found["label"] = meta["label"].reindex(found["track_id"]).to_numpy()
    found["path"] = meta["path"].reindex(found["track_id"]).to_numpy()
    return found, info


def _from_table(store: FeatureStore, model: ScoredModel, track_id: str, k: int
                ) -> pd.DataFrame | None:
    """The committed neighbours of ``track_id`` if that table is current and deep enough."""
    scores = ScoreStore(store)
    current = scores.neighbours_current(model.name, model.version)
    if current is None or current["k"] < k or current["source_digest"] != _source_digest(
            scores, model):
        return None
    import pyarrow.dataset as ds

    data = ds.dataset(scores.neighbours_files(model.name, model.version), format="parquet",
                      filesystem=store.fs)
    found = data.to_table(columns=["rank", "neighbour_id", "similarity"],
                          filter=ds.field("track_id") == track_id).to_pandas()
    found = found.sort_values("rank").head(k)
    return pd.DataFrame({"rank": found["rank"].to_numpy(np.int32),
                         "track_id": found["neighbour_id"].to_numpy(),
                         "similarity": found["similarity"].to_numpy()})


def _source_digest(scores: ScoreStore, model: ScoredModel) -> str:
    """Names the committed score parts a neighbours run was computed from."""
    parts = sorted(m.part_id for m in scores.manifests(model.name, model.version))
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()


# --- all-pairs neighbours ---------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _matrix(store_url: str, run_dir: str) -> np.ndarray:
    """The run's embedding matrix, memory-mapped (local) or read once per process."""
    store = FeatureStore(store_url)
    path = f"{run_dir}/embeddings.npy"
    if store.is_local:
        return np.load(path, mmap_mode="r")
    with store.fs.open(path, "rb") as fh:
        return np.load(io.BytesIO(fh.read()))


@functools.lru_cache(maxsize=2)
def _index(store_url: str, run_dir: str, dim: int) -> AnnIndex:
    store = FeatureStore(store_url)
    with store.fs.open(f"{run_dir}/index.{ANN_BACKEND}", "rb") as fh:
        return AnnIndex.from_bytes(fh.read(), dim, backend=ANN_BACKEND, threads=1,
                                   **ANN_PARAMS)


@task(name="build-ann-index", retries=1, cache_policy=NO_CACHE)
def build_index_task(store_url: str, run_dir: str, threads: int) -> float:
    """Build the HNSW index of the run's embeddings and store it beside them."""
    started = time.perf_counter()
    emb = np.asarray(_matrix(store_url, run_dir))
    index = AnnIndex(emb.shape[1], backend=ANN_BACKEND, threads=threads, **ANN_PARAMS)
    index.add(emb)
    store = FeatureStore(store_url)
    with store.fs.open(f"{run_dir}/index.{ANN_BACKEND}", "wb") as fh:
        fh.write(index.to_bytes())
    return time.perf_counter() - started


@task(name="neighbours-block", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="neighbours-{start}")
def block_task(store_url: str, run_dir: str, start: int, stop: int, k: int, method: str,
               model_json: dict[str, Any], check: int = 0) -> dict[str, Any]:
    """The ``k`` nearest tracks of rows ``start..stop`` into one part file.

    With the approximate index, ``check`` seeded rows of the block are also searched exactly
    and the share of their exact neighbours the index found is returned (``recall``, over
    ``checked`` rows), so every ANN run measures its own recall@k on the real embeddings.
    Returns ``{"part": file name, "checked": n, "recall": share or None}``.
    """
    model = ScoredModel.from_dict(model_json)
    emb = _matrix(store_url, run_dir)
    store = FeatureStore(store_url)
    with store.fs.open(f"{run_dir}/ids.parquet", "rb") as fh:
        ids = pq.read_table(fh)["track_id"].to_numpy(zero_copy_only=False)
    queries = np.asarray(emb[start:stop])
    own = np.arange(start, stop)
    kk = min(k, len(ids) - 1)
    if method == "exact":
        found: Neighbours = exact_search(queries, emb, kk, exclude=own)
    else:
        found = _index(store_url, run_dir, emb.shape[1]).search(queries, kk, exclude=own)
    keep = found.index >= 0
    rows, ranks = np.nonzero(keep)
    table = pa.Table.from_arrays([
        pa.array(ids[start + rows], pa.string()),
        pa.array(ranks + 1, pa.int32()),
        pa.array(ids[found.index[keep]], pa.string()),
        pa.array(found.similarity[keep], pa.float32()),
        pa.array([model.name] * len(rows), pa.string()),
        pa.array([model.version] * len(rows), pa.string()),
        pa.array([method] * len(rows), pa.string()),
    ], schema=NEIGHBOURS_SCHEMA)
    name = f"part-{start:09d}.parquet"
    with store.fs.open(f"{run_dir}/{name}", "wb") as fh:
        pq.write_table(table, fh, compression="zstd", row_group_size=NEIGHBOURS_ROW_GROUP)
    checked, recall = 0, None
    if method != "exact" and check > 0:
        pick = np.sort(np.random.default_rng([start, stop]).choice(
            stop - start, size=min(check, stop - start), replace=False))
        truth = exact_search(queries[pick], emb, kk, exclude=own[pick])
        checked, recall = len(pick), recall_at_k(found.index[pick], truth.index)
    return {"part": name, "checked": checked, "recall": recall}


@flow(name="neighbours", validate_parameters=False)
def neighbours_flow(store: str, k: int = 10, model: str | None = None, method: str = "auto",
                    workers: int = 1, progress: bool = True, force: bool = False
                    ) -> dict[str, Any]:
    """Write the ``neighbours`` table of a scored model version (``k`` rows per track)."""
    logger = get_run_logger()
    if method not in ("auto", "exact", "ann"):
        raise ParameterError(f"method must be auto, exact or ann, got {method!r}")
    if k < 1:
        raise ParameterError(f"k must be >= 1, got {k}")
    started = time.perf_counter()
    fstore = FeatureStore(store)
    scores = ScoreStore(fstore)
    chosen = pick_model(fstore, model)
    digest = _source_digest(scores, chosen)
    out: dict[str, Any] = {"model_name": chosen.name, "model_version": chosen.version, "k": k}
    current = scores.neighbours_current(chosen.name, chosen.version)
    if not force and current and current["k"] == k and current["source_digest"] == digest \
            and method in ("auto", current["method"]):
        logger.info("neighbours of %s v%s are current", chosen.name, chosen.version)
        return out | {"skipped": True, "method": current["method"],
                      "tracks": current["tracks"], "wall_s": time.perf_counter() - started}
    with fstore.lock():
        tracks, emb = load_embeddings(fstore, chosen)
        n = len(tracks)
        if n < 2:
            raise StoreError("need at least two scored tracks for neighbours")
        resolved = method if method != "auto" else (
            "exact" if n <= EXACT_MAX_TRACKS else "ann")
        nb_run = f"r-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        run_dir = scores.neighbours_run_dir(chosen.name, chosen.version, nb_run)
        fstore.fs.makedirs(run_dir, exist_ok=True)
        with fstore.fs.open(f"{run_dir}/embeddings.npy", "wb") as fh:
            np.save(fh, emb)
        with fstore.fs.open(f"{run_dir}/ids.parquet", "wb") as fh:
            pq.write_table(pa.table({"track_id": tracks["track_id"].to_numpy()}), fh)
        del emb
        build_s = 0.0
        if resolved == "ann":
            build_s = build_index_task.submit(fstore.url, run_dir, max(1, workers)).result()
        n_blocks = max(2 * workers, math.ceil(n / QUERY_BLOCK_MAX))
        bounds = np.linspace(0, n, min(n, n_blocks) + 1).astype(int)
        blocks = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)
                  if b > a]
        check = math.ceil(RECALL_SAMPLE / len(blocks)) if resolved == "ann" else 0
        futures = block_task.map(fstore.url, run_dir, [a for a, _ in blocks],
                                 [b for _, b in blocks], k, resolved,
                                 unmapped(chosen.to_dict()), check)
        parts, checked, hits = [], 0, 0.0
        with Progress("neighbours", total=n, unit="tracks", enabled=progress) as bar:
            for future, (a, b) in zip(futures, blocks, strict=True):
                res = future.result()
                parts.append(res["part"])
                if res["checked"]:
                    checked += res["checked"]
                    hits += res["recall"] * res["checked"]
                bar.advance(b - a)
        recall = hits / checked if checked else None
        if recall is not None:
            log = logger.warning if recall < RECALL_WARN else logger.info
            log("approximate neighbours: recall@%d %.3f against exact search on %d sampled "
                "tracks%s", k, recall, checked, "" if recall >= RECALL_WARN else
                f" (below {RECALL_WARN}: consider --method exact)")
        scores.commit_neighbours(chosen.name, chosen.version, {
            "run_id": nb_run, "k": k, "method": resolved, "tracks": n, "parts": sorted(parts),
            "source_digest": digest, "ann": ANN_PARAMS | {"backend": ANN_BACKEND}
            if resolved == "ann" else None, "build_s": build_s,
            "recall_sample": {"tracks": checked, "recall": recall} if checked else None})
    wall = time.perf_counter() - started
    logger.info("flow run %s: neighbours of %d tracks x %d by %s in %.1f s", run_id(), n, k,
                resolved, wall)
    publish("neighbours-summary", f"neighbours of {chosen.name} v{chosen.version}", {
        "tracks": n, "k": k, "method": resolved, "index build s": build_s,
        "recall@k (sampled)": "1 (exact)" if recall is None else recall, "wall s": wall})
    return out | {"skipped": False, "method": resolved, "tracks": n, "wall_s": wall,
                  "build_s": build_s, "recall": recall, "recall_checked": checked}


def run_neighbours(store: str, *, k: int = 10, model: str | None = None, method: str = "auto",
                   dask_address: str | None = None, n_workers: int | None = None,
                   progress: bool = True, force: bool = False, echo: bool = True
                   ) -> dict[str, Any]:
    """Run :func:`neighbours_flow` on a Dask cluster (an existing or a local one)."""
    with prefect_api(start=False) as api, dask_cluster(dask_address, n_workers=n_workers,
                                                       echo=echo) as cluster:
        api.start()
        runner = DaskTaskRunner(address=cluster.address)
        return dict(neighbours_flow.with_options(task_runner=runner)(
            store=store, k=k, model=model, method=method, workers=cluster.threads,
            progress=progress, force=force))

