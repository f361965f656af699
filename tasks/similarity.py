"""Nearest neighbours over L2-normalised embeddings: exact blocked search and an ANN index.

Similarity is the cosine, i.e. the inner product of unit vectors. :func:`exact_search` is a
blocked matrix product that keeps a running top-k per query, so memory stays at one tile
(``query_block x base_block`` floats) whatever the catalogue size. :class:`AnnIndex` wraps an
approximate HNSW index for catalogues where the exact all-pairs product is too slow (the
backend and the switch-over size were chosen by ``bench/neighbours_bench.py``; see
docs/scoring.md). Arrays in, arrays out: persisting an index is the feature store's job
(:meth:`AnnIndex.to_bytes` / :meth:`AnnIndex.from_bytes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.errors import ParameterError

TILE_ELEMENTS = 1 << 23
"""Similarities computed at once by :func:`exact_search`: 32 MiB of float32 plus the
selection's temporaries, about 100 MiB in all."""

ANN_BACKENDS = ("faiss", "usearch")


@dataclass(frozen=True)
class Neighbours:
    """The ``k`` nearest base rows of each query, most similar first.

    Attributes
    ----------
    index : np.ndarray [shape=(n_queries, k), dtype=int64]
        Row numbers in the base matrix; ``-1`` where fewer than ``k`` candidates exist.
    similarity : np.ndarray [shape=(n_queries, k), dtype=float32]
        Cosine similarity (``-inf`` where ``index`` is ``-1``).
    """

    index: np.ndarray
    similarity: np.ndarray


def _check(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ParameterError(f"{name} must be a (n, d) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ParameterError(f"{name} has dimension {x.shape[1]}, expected {dim}")
    if not np.isfinite(x).all():
        raise ParameterError(f"{name} holds NaN or infinite values")
    return x


def exact_search(queries: np.ndarray, base: np.ndarray, k: int, *,
                 exclude: np.ndarray | None = None,
                 tile_elements: int = TILE_ELEMENTS) -> Neighbours:
    """Exact top-``k`` inner-product search, tiled over queries and base rows.

    Parameters
    ----------
    queries : np.ndarray [shape=(q, d), dtype=float32]
    base : np.ndarray [shape=(n, d), dtype=float32]
        Unit rows (then the inner product is the cosine similarity).
    k : int >= 1
    exclude : np.ndarray [shape=(q,), dtype=int], optional
        A base row to leave out for each query (its own row, for all-pairs neighbours); ``-1``
        leaves nothing out.
    tile_elements : int
        Similarities held at once; bounds the memory.

    Returns
    -------
    Neighbours
        Most similar first; among equal similarities the lower base row comes first, except
        that which of several rows tied at the ``k``-th place is kept is unspecified.
    """
    if k < 1:
        raise ParameterError(f"k must be >= 1, got {k}")
    base = _check(base, "base")
    queries = _check(queries, "queries", base.shape[1])
    nq, nb = queries.shape[0], base.shape[0]
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.shape != (nq,):
            raise ParameterError("exclude needs one entry per query")
    best_i = np.full((nq, k), -1, dtype=np.int64)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    if nq == 0 or nb == 0:
        return Neighbours(best_i, best_s)
    q_block = max(1, min(nq, 2048))
    b_block = max(k, min(nb, tile_elements // q_block))
    for q0 in range(0, nq, q_block):
        q1 = min(nq, q0 + q_block)
        cur_i, cur_s = best_i[q0:q1], best_s[q0:q1]
        for b0 in range(0, nb, b_block):
            b1 = min(nb, b0 + b_block)
            sims = queries[q0:q1] @ base[b0:b1].T
            if exclude is not None:
                rows = np.flatnonzero((exclude[q0:q1] >= b0) & (exclude[q0:q1] < b1))
                sims[rows, exclude[q0:q1][rows] - b0] = -np.inf
            kk = min(k, b1 - b0)
            # the k largest without negating a copy of the tile
            part = np.argpartition(sims, -kk, axis=1)[:, -kk:] if kk < b1 - b0 else \
                np.broadcast_to(np.arange(b1 - b0), (q1 - q0, b1 - b0))
            cand_s = np.concatenate([cur_s, np.take_along_axis(sims, part, axis=1)], axis=1)
            cand_i = np.concatenate([cur_i, part + b0], axis=1)
            cur_i, cur_s = _select(cand_i, cand_s, k)
        best_i[q0:q1], best_s[q0:q1] = cur_i, cur_s
    best_i[~np.isfinite(best_s)] = -1
    return Neighbours(best_i, best_s)


def _select(index: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best candidates per row, by similarity then lower index."""
    big = np.where(index < 0, np.iinfo(np.int64).max, index)
    order = np.lexsort((big, -sims), axis=1)[:, :k]
    return np.take_along_axis(index, order, axis=1), np.take_along_axis(sims, order, axis=1)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact neighbours that the approximate search also returned.

    Parameters
    ----------
    approx, exact : np.ndarray [shape=(q, k), dtype=int]
        Neighbour row numbers (``-1`` entries of ``exact`` are ignored).

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    if approx.shape[0] != exact.shape[0]:
        raise ParameterError("approx and exact need the same number of queries")
    hits = total = 0
    for a, e in zip(approx, exact, strict=True):
        want = set(e[e >= 0].tolist())
        hits += len(want & set(a.tolist()))
        total += len(want)
    return hits / total if total else 1.0


class AnnIndex:
    """An approximate inner-product (cosine) index over unit vectors: HNSW.

    Parameters
    ----------
    dim : int
        Embedding size.
    backend : {"faiss", "usearch"}
        Library that holds the graph (faiss by default: it built faster and recalled more
        at the same settings in ``bench/neighbours_bench.py``).
    connectivity : int
        HNSW edges per node (``M``).
    expansion_add, expansion_search : int
        Candidate list sizes when building and when searching (``efConstruction``,
        ``efSearch``); larger is slower and more exact.
    threads : int, optional
        Threads for building and batch search (default: the CPUs this process may use).
    """

    def __init__(self, dim: int, *, backend: str = "faiss", connectivity: int = 32,
                 expansion_add: int = 128, expansion_search: int = 256,
                 threads: int | None = None) -> None:
        if backend not in ANN_BACKENDS:
            raise ParameterError(f"ANN backend must be one of {ANN_BACKENDS}, got {backend!r}")
        self.dim, self.backend = dim, backend
        self.params = {"connectivity": connectivity, "expansion_add": expansion_add,
                       "expansion_search": expansion_search}
        self.threads = threads or _cpus()
        self.size = 0
        self._index = self._new()

    def _new(self) -> Any:
        p = self.params
        if self.backend == "usearch":
            from usearch.index import Index

            return Index(ndim=self.dim, metric="ip", dtype="f32",
                         connectivity=p["connectivity"], expansion_add=p["expansion_add"],
                         expansion_search=p["expansion_search"])
        import faiss

        faiss.omp_set_num_threads(self.threads)
        index = faiss.IndexHNSWFlat(self.dim, p["connectivity"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["expansion_add"]
        index.hnsw.efSearch = p["expansion_search"]
        return index

    def add(self, vectors: np.ndarray) -> None:
        """Add rows; they get the next row numbers (``size .. size + n - 1``)."""
        x = _check(vectors, "vectors", self.dim)
        if self.backend == "usearch":
            keys = np.arange(self.size, self.size + len(x), dtype=np.uint64)
            self._index.add(keys, x, threads=self.threads)
        else:
            import faiss

            faiss.omp_set_num_threads(self.threads)
            self._index.add(x)
        self.size += len(x)

    def search(self, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None
               ) -> Neighbours:
        """Approximate top-``k`` of each query (``exclude`` as in :func:`exact_search`)."""
        if k < 1:
            raise ParameterError(f"k must be >= 1, got {k}")
        q = _check(queries, "queries", self.dim)
        extra = 1 if exclude is not None else 0
        kk = min(k + extra, self.size)
        if len(q) == 0 or kk == 0:
            return Neighbours(np.full((len(q), k), -1, np.int64),
                              np.full((len(q), k), -np.inf, np.float32))
        if self.backend == "usearch":
            found = self._index.search(q, kk, threads=self.threads)
            idx = np.asarray(found.keys, dtype=np.int64).reshape(len(q), -1)
            dist = np.asarray(found.distances, dtype=np.float32).reshape(len(q), -1)
            # one query gives a Matches (no counts), several a BatchMatches
            counts = np.asarray(getattr(found, "counts", [idx.shape[1]])).reshape(len(q))
            valid = np.arange(idx.shape[1])[None, :] < counts[:, None]
            sims = np.where(valid, 1.0 - dist, -np.inf).astype(np.float32)  # ip distance
            idx = np.where(valid, idx, -1)
        else:
            import faiss

            faiss.omp_set_num_threads(self.threads)  # a process-wide setting: set per call
            sims, idx = self._index.search(q, kk)
            sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
            idx = idx.astype(np.int64)
        if exclude is not None:
            drop = idx == np.asarray(exclude)[:, None]
            sims = np.where(drop, -np.inf, sims)
            idx = np.where(drop, -1, idx)
        idx, sims = _select(idx, sims, kk)
        idx, sims = idx[:, :k], sims[:, :k]
        if idx.shape[1] < k:
            pad = k - idx.shape[1]
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        idx[~np.isfinite(sims)] = -1
        return Neighbours(idx, sims)

    def to_bytes(self) -> bytes:
        """Serialise the index (for the store)."""
        if self.backend == "usearch":
            return bytes(self._index.save())
        import faiss

        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int, *, backend: str = "faiss",
                   threads: int | None = None, **params: int) -> AnnIndex:
        """Restore an index written by :meth:`to_bytes`."""
        index = cls(dim, backend=backend, threads=threads, **params)
        if backend == "usearch":
            from usearch.index import Index

            index._index = Index.restore(data)
            index._index.expansion_search = index.params["expansion_search"]
            index.size = len(index._index)
        else:
            import faiss

            index._index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            index._index.hnsw.efSearch = index.params["expansion_search"]
            index.size = index._index.ntotal
        return index


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
