#!/usr/bin/env python
"""Nearest neighbours: exact tiled search against HNSW indexes (usearch, faiss, hnswlib).

For each catalogue size N (``--sizes``, default 100,000 and 1,000,000) it generates N random
unit vectors of dimension D (``--dim``, default 256: float32 standard normals through
``tasks.predictions.l2_normalize``, seeded RNG) and draws Q query rows (``--queries``, default
1000) from that base set; every search leaves the query's own row out (``exclude=``), as the
all-pairs "similar tracks" job does. k = 10. It measures:

1. **exact**: ``tasks.similarity.exact_search`` over the Q queries (one timed call): ms per
   query, and the all-pairs time extrapolated to N queries (``N x time per query``). Its
   neighbours are the ground truth for recall.
2. **ANN**, for each backend (``--backends``) and HNSW connectivity M (``--connectivity``,
   default 16 32), with ``expansion_add`` fixed (``--expansion-add``, default 128): the index is
   built once (build time, serialised size: ``len(AnnIndex.to_bytes())``; hnswlib:
   ``index_file_size()``), then for each ``expansion_search`` (``--expansion-search``, default
   64 128 256) set on the same index (usearch ``_index.expansion_search``, faiss
   ``_index.hnsw.efSearch``, hnswlib ``set_ef``):

   * batch throughput: queries/s of one ``search`` call over all Q queries with every thread
     (median of 3 calls, after one warm-up call on a slice; the JSON also has one native
     batch call, ``batch_native_s``);
   * single-query latency: median ms over 200 one-row searches, through our wrapper
     (``AnnIndex.search``; ``n/a`` if that raises) and through the native library call
     (``k + 1`` neighbours, no post-processing), the difference being the wrapper's cost;
   * recall@10 against exact;
   * all-pairs time = build + N x (batch time per query).

3. Per N, a one-line recommendation: the setting with the highest batch throughput among those
   reaching recall@10 >= 0.95 (if none does, the one with the best recall), and whether its
   all-pairs time beats exact all-pairs. At the end, the N at which ANN all-pairs beats exact:
   the first measured N where it does, and an estimate from the largest N under the model
   "exact all-pairs ~ N^2, ANN all-pairs ~ N log N" (an estimate: recall at a fixed setting
   also drops as N grows).

Prints a table per N and writes every figure (plus cores, CPU model, load average, package
versions and the git commit) to ``bench/results/neighbours-<time>.json`` (or ``--out``).

Random unit vectors in 256 dimensions have no cluster structure and a high intrinsic
dimension: they are close to the hardest case for HNSW, so recall here is a pessimistic
figure for real embeddings at the same settings. ``--intrinsic-dim d`` draws them instead from
a random d-dimensional subspace (normal in d dimensions, one fixed random map to D, then
normalised), which is closer to what a trained model's embeddings look like.

Threads (``--threads``, default: the CPUs this process may use) apply to the ANN builds and
batch searches and, through ``threadpoolctl``, to the BLAS used by the exact search.

hnswlib has no binary wheel for this platform; ``pip install hnswlib`` builds the sdist
(0.8.0: ~40 s with g++ on the 2-core dev machine). Its setup.py compiles with
``-march=native`` unless ``HNSWLIB_NO_NATIVE=1`` is set, so a wheel from pip's cache is not
portable to other CPUs. It is not a project dependency: when it is not installed it is skipped
with a note.

Memory: the base set is N x D float32 (1 GiB at 1M x 256), and each index holds its own copy
plus the graph; one index is alive at a time. The 1M size takes a long time on 2 cores (the
builds dominate): run it on a quiet machine.

Usage::

    .venv/bin/python bench/neighbours_bench.py                          # 100k and 1M
    .venv/bin/python bench/neighbours_bench.py --sizes 20000 50000 --queries 300
    .venv/bin/python bench/neighbours_bench.py --backends usearch faiss --connectivity 16
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from typing import Any

import benchenv  # before tasks.*: puts the repository on sys.path
import numpy as np

from tasks.predictions import l2_normalize
from tasks.similarity import AnnIndex, exact_search, recall_at_k

K = 10
TARGET_RECALL = 0.95
SINGLE_QUERIES = 200
BATCH_REPEATS = 3
GEN_CHUNK = 100_000
ALL_BACKENDS = ("usearch", "faiss", "hnswlib")
VERSION_PACKAGES = ("mtag", "numpy", "faiss-cpu", "usearch", "hnswlib", "threadpoolctl")
CODE_PATHS = ("tasks/similarity.py", "tasks/predictions.py")  # what the diff hash covers


# ----------------------------------------------------------------------------------------
# machine facts
def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, load, versions, BLAS pools, git commit."""
    info = benchenv.environment(VERSION_PACKAGES, code_paths=CODE_PATHS, threadpools=True)
    info["git"]["similarity_untracked"] = benchenv.untracked("tasks/similarity.py")
    return info


# ----------------------------------------------------------------------------------------
# data
def make_data(n: int, dim: int, n_queries: int, seed: int,
              intrinsic_dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """N unit rows (float32) and Q distinct query row numbers, from a seeded RNG.

    With ``intrinsic_dim`` d, the rows are standard normals in d dimensions mapped into ``dim``
    by one fixed random linear map, then normalised: unit vectors on a d-dimensional
    manifold, closer to learned embeddings (whose intrinsic dimension is far below their
    width) than isotropic noise. Generated in chunks: ``l2_normalize`` works in float64, so
    one call over 1M x 256 rows would hold several GiB of temporaries.
    """
    rng = np.random.default_rng([seed, n, dim, intrinsic_dim or 0])
    lift = (rng.standard_normal((intrinsic_dim, dim), dtype=np.float32)
            if intrinsic_dim else None)
    base = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, GEN_CHUNK):
        e = min(n, s + GEN_CHUNK)
        if lift is None:
            x = rng.standard_normal((e - s, dim), dtype=np.float32)
        else:
            x = rng.standard_normal((e - s, lift.shape[0]), dtype=np.float32) @ lift
        base[s:e] = l2_normalize(x)
    rows = rng.choice(n, size=min(n_queries, n), replace=False).astype(np.int64)
    return base, rows


# ----------------------------------------------------------------------------------------
# backends: one interface over our wrapper (usearch, faiss) and hnswlib called directly
class WrapperBackend:
    """``tasks.similarity.AnnIndex`` with the knobs the bench turns."""

    def __init__(self, backend: str, dim: int, n: int, connectivity: int, expansion_add: int,
                 expansion_search: int, threads: int) -> None:
        del n
        self.name = backend
        self.threads = threads
        self.index = AnnIndex(dim, backend=backend, connectivity=connectivity,
                              expansion_add=expansion_add, expansion_search=expansion_search,
                              threads=threads)

    def add(self, x: np.ndarray) -> None:
        self.index.add(x)

    def set_expansion(self, ef: int) -> None:
        if self.name == "usearch":
            self.index._index.expansion_search = ef
        else:
            self.index._index.hnsw.efSearch = ef
        self.index.params["expansion_search"] = ef

    def search(self, q: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
        return self.index.search(q, k, exclude=exclude).index

    def native_search(self, q: np.ndarray, k: int) -> None:
        if self.name == "usearch":
            self.index._index.search(q, k + 1, threads=self.threads)
        else:
            self.index._index.search(q, k + 1)

    def size_bytes(self) -> int:
        return len(self.index.to_bytes())


class HnswlibBackend:
    """hnswlib's own API, inner-product space; results post-processed like the wrapper's."""

    def __init__(self, backend: str, dim: int, n: int, connectivity: int, expansion_add: int,
                 expansion_search: int, threads: int) -> None:
        import hnswlib

        self.name = backend
        self.threads = threads
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.init_index(max_elements=n, ef_construction=expansion_add, M=connectivity,
                              random_seed=0)
        self.index.set_num_threads(threads)
        self.index.set_ef(expansion_search)

    def add(self, x: np.ndarray) -> None:
        self.index.add_items(x, np.arange(len(x)), num_threads=self.threads)

    def set_expansion(self, ef: int) -> None:
        self.index.set_ef(ef)

    def search(self, q: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
        labels, _dist = self.index.knn_query(q, k=k + 1, num_threads=self.threads)
        labels = labels.astype(np.int64)
        drop = labels == exclude[:, None]
        order = np.argsort(drop, axis=1, kind="stable")  # kept ones first, in their order
        return np.take_along_axis(labels, order, axis=1)[:, :k]

    def native_search(self, q: np.ndarray, k: int) -> None:
        self.index.knn_query(q, k=k + 1, num_threads=self.threads)

    def size_bytes(self) -> int:
        return int(self.index.index_file_size())


def make_backend(name: str, **kw: Any) -> WrapperBackend | HnswlibBackend:
    """The adapter for ``name``."""
    return HnswlibBackend(name, **kw) if name == "hnswlib" else WrapperBackend(name, **kw)


def backend_available(name: str) -> str | None:
    """``None`` if ``name`` can be imported, else why not."""
    module = {"usearch": "usearch.index", "faiss": "faiss", "hnswlib": "hnswlib"}[name]
    try:
        __import__(module)
    except ImportError as exc:
        return f"{name} is not installed ({exc})"
    return None


# ----------------------------------------------------------------------------------------
# measurements
def time_exact(base: np.ndarray, rows: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """One timed exact search over the query rows; figures and the neighbour rows."""
    queries = base[rows]
    t0 = time.perf_counter()
    res = exact_search(queries, base, K, exclude=rows)
    wall = time.perf_counter() - t0
    n, q = base.shape[0], len(rows)
    per_q = wall / q
    return {"queries_s": wall, "ms_per_query": per_q * 1e3, "queries_per_s": q / wall,
            "all_pairs_s": per_q * n}, res.index


def time_single(fn: Any, queries: np.ndarray, rows: np.ndarray) -> tuple[float | None, str | None]:
    """Median ms of one-row calls ``fn(q_row, exclude_row)``; ``None`` and the error if it
    raises."""
    m = min(SINGLE_QUERIES, len(rows))
    times = []
    try:
        fn(queries[:1], rows[:1])  # warm-up
        for i in range(m):
            t0 = time.perf_counter()
            fn(queries[i:i + 1], rows[i:i + 1])
            times.append(time.perf_counter() - t0)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return statistics.median(times) * 1e3, None


def bench_backend(name: str, base: np.ndarray, rows: np.ndarray, exact_idx: np.ndarray,
                  connectivity: int, efs: list[int], args: argparse.Namespace,
                  threads: int) -> list[dict[str, Any]]:
    """Build one index, then measure each expansion_search on it."""
    n, dim = base.shape
    queries = np.ascontiguousarray(base[rows])
    idx = make_backend(name, dim=dim, n=n, connectivity=connectivity,
                       expansion_add=args.expansion_add, expansion_search=efs[0],
                       threads=threads)
    t0 = time.perf_counter()
    idx.add(base)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    size = idx.size_bytes()
    size_s = time.perf_counter() - t0
    out = []
    for ef in efs:
        idx.set_expansion(ef)
        idx.search(queries[:50], K, rows[:50])  # warm-up
        batch = []
        found = None
        for _ in range(BATCH_REPEATS):
            t0 = time.perf_counter()
            found = idx.search(queries, K, rows)
            batch.append(time.perf_counter() - t0)
        batch_s = statistics.median(batch)
        assert found is not None
        recall = recall_at_k(found, exact_idx)
        t0 = time.perf_counter()
        idx.native_search(queries, K)
        native_batch_s = time.perf_counter() - t0
        one_ms, one_err = time_single(lambda q, r: idx.search(q, K, r), queries, rows)
        native_ms, native_err = time_single(lambda q, _r: idx.native_search(q, K), queries, rows)
        row = {"backend": name, "connectivity": connectivity,
               "expansion_add": args.expansion_add, "expansion_search": ef,
               "build_s": build_s, "size_bytes": size, "serialise_s": size_s,
               "batch_s": batch_s, "batch_s_all": batch, "queries_per_s": len(rows) / batch_s,
               "batch_native_s": native_batch_s,
               "single_ms": one_ms, "single_error": one_err,
               "single_native_ms": native_ms, "single_native_error": native_err,
               f"recall_at_{K}": recall,
               "all_pairs_s": build_s + n * batch_s / len(rows)}
        out.append(row)
        print(f"  {_row_text(row)}", flush=True)
    return out  # the index is freed here: one alive at a time


# ----------------------------------------------------------------------------------------
# analysis
def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest throughput at recall >= target; else the best recall (then throughput)."""
    if not rows:
        return None
    ok = [r for r in rows if r[f"recall_at_{K}"] >= TARGET_RECALL]
    if ok:
        best = max(ok, key=lambda r: r["queries_per_s"])
        return {"row": best, "meets_target": True}
    best = max(rows, key=lambda r: (r[f"recall_at_{K}"], r["queries_per_s"]))
    return {"row": best, "meets_target": False}


def crossover_estimate(n0: int, exact_all_pairs_s: float, ann_all_pairs_s: float) -> float | None:
    """N where ``a N log N`` (ANN) equals ``e N^2`` (exact), both fitted at ``n0``.

    The larger root of ``e N = a log N``; ``None`` if the model has none above 2.
    """
    e = exact_all_pairs_s / n0**2
    a = ann_all_pairs_s / (n0 * math.log(n0))

    def f(x: float) -> float:
        return e * x - a * math.log(x)

    lo = max(2.0, a / e)  # f is convex with its minimum at a / e
    if f(lo) >= 0:  # no root above lo: ANN is cheaper at every N in the model
        return lo
    hi = lo * 2
    while f(hi) < 0:
        hi *= 2
        if hi > 1e15:
            return None
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------
# output
def _fmt_n(n: float) -> str:
    return f"{n:,.0f}"


def _fmt_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _label(r: dict[str, Any]) -> str:
    return f"{r['backend']} M={r['connectivity']} ef={r['expansion_search']}"


def _row_text(r: dict[str, Any]) -> str:
    return (f"{r['backend']:8s} {r['connectivity']:3d} {r['expansion_search']:4d} "
            f"{r['build_s']:8.1f} {r['size_bytes'] / 2**20:8.1f} {r['queries_per_s']:9.0f} "
            f"{_fmt_ms(r['single_ms']):>7s} {_fmt_ms(r['single_native_ms']):>7s} "
            f"{r[f'recall_at_{K}']:7.4f} {r['all_pairs_s']:10.1f}")


HEADER = (f"{'backend':8s} {'M':>3s} {'ef':>4s} {'build s':>8s} {'size MB':>8s} {'q/s':>9s} "
          f"{'1q ms':>7s} {'native':>7s} {'recall':>7s} {'all-pairs s':>10s}")


def render_size(res: dict[str, Any]) -> str:
    ex = res["exact"]
    lines = [f"\nN = {_fmt_n(res['n'])}, dim {res['dim']}, {res['queries']} queries, "
             f"k = {K}, {res['threads']} threads",
             f"exact: {ex['queries_s']:.2f} s for the queries, {ex['ms_per_query']:.3f} ms/query "
             f"({ex['queries_per_s']:.0f} q/s); all-pairs over N: {ex['all_pairs_s']:.1f} s "
             "(extrapolated)",
             HEADER]
    lines += [_row_text(r) for r in res["ann"]]
    for note in res.get("errors", []):
        lines.append(f"note: {note}")
    lines.append(recommendation_line(res))
    return "\n".join(lines)


def recommendation_line(res: dict[str, Any]) -> str:
    rec = res["recommendation"]
    if rec is None:
        return "recommendation: no ANN rows"
    r = rec["row"]
    why = (f"fastest with recall@{K} >= {TARGET_RECALL}" if rec["meets_target"]
           else f"nothing reaches recall@{K} {TARGET_RECALL}; best recall")
    ex = res["exact"]["all_pairs_s"]
    verdict = "ANN wins" if r["all_pairs_s"] < ex else "exact wins"
    return (f"recommendation (N={_fmt_n(res['n'])}): {_label(r)} ({why}): "
            f"{r['queries_per_s']:.0f} q/s, recall {r[f'recall_at_{K}']:.3f}; all-pairs "
            f"{r['all_pairs_s']:.1f} s vs exact {ex:.1f} s: {verdict} "
            f"({ex / r['all_pairs_s']:.2f}x)")


def crossover(results: list[dict[str, Any]]) -> dict[str, Any]:
    """First measured N where the recommended ANN setting's all-pairs beats exact, and the
    model estimate from the largest N."""
    measured = None
    for res in sorted(results, key=lambda r: r["n"]):
        rec = res["recommendation"]
        if rec and rec["row"]["all_pairs_s"] < res["exact"]["all_pairs_s"]:
            measured = res["n"]
            break
    estimate = None
    basis = None
    with_rec = [r for r in results if r["recommendation"]]
    if with_rec:
        last = max(with_rec, key=lambda r: r["n"])
        basis = {"n": last["n"], "setting": _label(last["recommendation"]["row"])}
        estimate = crossover_estimate(last["n"], last["exact"]["all_pairs_s"],
                                      last["recommendation"]["row"]["all_pairs_s"])
    return {"first_measured_n": measured, "model_estimate_n": estimate, "basis": basis,
            "model": "exact all-pairs ~ N^2, ANN all-pairs (build + N queries) ~ N log N"}


def crossover_line(c: dict[str, Any], sizes: list[int]) -> str:
    measured = (f"from N = {_fmt_n(c['first_measured_n'])} (first measured size where it does)"
                if c["first_measured_n"] else
                f"at none of the measured sizes ({', '.join(_fmt_n(s) for s in sizes)})")
    est = c["model_estimate_n"]
    est_txt = (f"model estimate from N = {_fmt_n(c['basis']['n'])} ({c['basis']['setting']}): "
               f"N ~ {_fmt_n(float(f'{est:.2g}'))}" if est else "model estimate: none")
    return f"ANN all-pairs beats exact all-pairs {measured}; {est_txt}"


# ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--backends", nargs="+", choices=ALL_BACKENDS, default=list(ALL_BACKENDS))
    ap.add_argument("--connectivity", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--expansion-search", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--expansion-add", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None,
                    help="ANN and BLAS threads (default: the CPUs this process may use)")
    ap.add_argument("--intrinsic-dim", type=int, default=None,
                    help="draw the vectors from a random d-dimensional subspace (default: "
                         "isotropic, the hardest case)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON path (default bench/results/neighbours-<time>.json)")
    args = ap.parse_args()
    threads = args.threads or benchenv.cpus()

    from threadpoolctl import threadpool_limits

    machine = machine_info()
    print(f"{machine['cpu_affinity']} cores ({machine['cpu_model']}); load "
          f"{machine['loadavg_start'][0]:.2f}; {threads} threads; git "
          f"{machine['git']['commit'][:10]}{' (dirty)' if machine['git']['dirty'] else ''}")
    print(", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v))
    skipped = {}
    backends = []
    for b in args.backends:
        why = backend_available(b)
        if why:
            skipped[b] = why
            print(f"skipping {why}")
        else:
            backends.append(b)

    results = []
    t_start = time.perf_counter()
    with threadpool_limits(limits=threads):
        for n in args.sizes:
            t0 = time.perf_counter()
            base, rows = make_data(n, args.dim, args.queries, args.seed, args.intrinsic_dim)
            gen_s = time.perf_counter() - t0
            kind = (f"intrinsic dimension {args.intrinsic_dim}" if args.intrinsic_dim
                    else "isotropic")
            print(f"\nN = {_fmt_n(n)} x {args.dim} ({kind}): data {gen_s:.1f} s; exact ...",
                  flush=True)
            exact, exact_idx = time_exact(base, rows)
            print(f"  exact {exact['ms_per_query']:.3f} ms/query, all-pairs "
                  f"{exact['all_pairs_s']:.1f} s (extrapolated)", flush=True)
            print(f"  {HEADER}", flush=True)
            res: dict[str, Any] = {"n": n, "dim": args.dim, "queries": len(rows),
                                   "intrinsic_dim": args.intrinsic_dim,
                                   "threads": threads, "data_s": gen_s, "exact": exact,
                                   "ann": [], "errors": []}
            for b in backends:
                for m in args.connectivity:
                    try:
                        res["ann"] += bench_backend(b, base, rows, exact_idx, m,
                                                    args.expansion_search, args, threads)
                    except Exception as exc:  # one failing backend must not lose the rest
                        msg = f"{b} M={m}: {type(exc).__name__}: {exc}"
                        res["errors"].append(msg)
                        print(f"  error: {msg}", flush=True)
                    gc.collect()
            for r in res["ann"]:
                for key, what in (("single_error", "1-row search through the wrapper"),
                                  ("single_native_error", "1-row native search")):
                    if r[key]:
                        note = f"{r['backend']} {what} failed: {r[key]}"
                        if note not in res["errors"]:
                            res["errors"].append(note)
            res["recommendation"] = recommend(res["ann"])
            res["loadavg_after"] = os.getloadavg()
            results.append(res)
            del base
            gc.collect()

    for res in results:
        print(render_size(res))
    cross = crossover(results)
    line = crossover_line(cross, args.sizes)
    print("\n" + line)
    data = {"args": vars(args), "k": K, "target_recall": TARGET_RECALL,
            "single_queries": SINGLE_QUERIES, "batch_repeats": BATCH_REPEATS,
            "machine": machine, "skipped_backends": skipped, "results": results,
            "crossover": cross, "summary": [recommendation_line(r) for r in results] + [line],
            "total_s": time.perf_counter() - t_start, "loadavg_end": os.getloadavg()}
    print(f"results written to {benchenv.write_json(data, 'neighbours', args.out)}")


if __name__ == "__main__":
    main()
