"""Worker-side bodies of the neighbours tasks: build the HNSW index of a run, search one block
of query rows (exactly, or in the index) into one part of the ``neighbours`` table.

Plain functions (the Prefect wrappers are in :mod:`flows.neighbours`): they connect the search
math in :mod:`tasks.similarity` to the run's files in :mod:`featurestore.neighbours`. The
matrix and the index are loaded once per worker process and reused by its later blocks.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from featurestore.neighbours import NeighbourRun
from featurestore.scores import ScoredModel, ScoreStore
from featurestore.store import FeatureStore
from featurestore.tables import DataFile
from tasks.similarity import AnnIndex, Neighbours, exact_search, recall_at_k

ANN_BACKEND = "faiss"
ANN_PARAMS = {"connectivity": 32, "expansion_add": 128, "expansion_search": 256}


@dataclass(frozen=True)
class BlockResult:
    """What a block task reports: its part file, and the recall it measured (ANN only)."""

    part: DataFile
    rows: int
    checked: int = 0
    recall: float | None = None


@functools.lru_cache(maxsize=4)
def _run(store_url: str, name: str, version: str, run_id: str) -> NeighbourRun:
    return ScoreStore(FeatureStore(store_url)).neighbour_run(name, version, run_id)


@functools.lru_cache(maxsize=2)
def _matrix(store_url: str, name: str, version: str, run_id: str) -> np.ndarray:
    """The run's embedding matrix, memory-mapped (local) or read once per process."""
    return _run(store_url, name, version, run_id).embeddings()


@functools.lru_cache(maxsize=2)
def _index(store_url: str, name: str, version: str, run_id: str, dim: int) -> AnnIndex:
    data = _run(store_url, name, version, run_id).read_index(ANN_BACKEND)
    return AnnIndex.from_bytes(data, dim, backend=ANN_BACKEND, threads=1, **ANN_PARAMS)


def build_index(store_url: str, model: ScoredModel, run_id: str, threads: int) -> float:
    """Build the HNSW index of the run's embeddings, store it beside them; return seconds."""
    started = time.perf_counter()
    key = (store_url, model.name, model.version, run_id)
    emb = np.asarray(_matrix(*key))
    index = AnnIndex(emb.shape[1], backend=ANN_BACKEND, threads=threads, **ANN_PARAMS)
    index.add(emb)
    _run(*key).write_index(ANN_BACKEND, index.to_bytes())
    return time.perf_counter() - started


def search_block(store_url: str, model: ScoredModel, run_id: str, start: int, stop: int,
                 k: int, method: str, check: int = 0) -> BlockResult:
    """The ``k`` nearest tracks of rows ``start..stop`` into one part file (uncommitted).

    With the approximate index, ``check`` seeded rows of the block are also searched exactly
    and the share of their exact neighbours the index found is returned, so every ANN run
    measures its own recall@k on the real embeddings.
    """
    key = (store_url, model.name, model.version, run_id)
    emb = _matrix(*key)
    run = _run(*key)
    ids = run.track_ids()
    queries = np.asarray(emb[start:stop])
    own = np.arange(start, stop)
    kk = min(k, len(ids) - 1)
    if method == "exact":
        found: Neighbours = exact_search(queries, emb, kk, exclude=own)
    else:
        found = _index(*key, emb.shape[1]).search(queries, kk, exclude=own)
    keep = found.index >= 0
    rows, ranks = np.nonzero(keep)
    part = run.write_part(start, ids[start + rows], ranks + 1, ids[found.index[keep]],
                          found.similarity[keep], model_name=model.name,
                          model_version=model.version, method=method)
    if method == "exact" or check <= 0:
        return BlockResult(part, stop - start)
    pick = np.sort(np.random.default_rng([start, stop]).choice(
        stop - start, size=min(check, stop - start), replace=False))
    truth = exact_search(queries[pick], emb, kk, exclude=own[pick])
    return BlockResult(part, stop - start, len(pick), recall_at_k(found.index[pick],
                                                                  truth.index))
