""""More like this": one track's nearest neighbours, and the all-pairs ``neighbours`` flow.

:func:`similar` answers one query: from the committed ``neighbours`` table when it is current
(a lookup), otherwise by an exact search over the scored embeddings (one matrix-vector product,
fast for millions of tracks; loading the embeddings is what costs). ``neighbours_flow`` computes
the ``k`` nearest tracks of every track: the flow writes the embedding matrix once, query blocks
fan out over Dask, each worker searching exactly (tiled matrix products) or, past
:data:`EXACT_MAX_TRACKS`, in an HNSW index built once by one task; the run becomes visible when
its record is written last. The task bodies are in :mod:`flows.neighbours_worker`, the run's
files in :mod:`featurestore.neighbours`.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from featurestore.scores import ScoredModel, ScoreStore
from featurestore.store import FeatureStore
from featurestore.tables import DataFile
from flows.cluster import Echo
from flows.neighbours_worker import ANN_BACKEND, ANN_PARAMS, BlockResult, build_index, search_block
from flows.records import from_fields
from flows.report import publish, run_id
from flows.runtime import commit_as_completed, run_on_cluster
from tasks.errors import ParameterError, StoreError
from tasks.similarity import exact_search

RECALL_SAMPLE = 256
"""Tracks an approximate run also searches exactly, to measure its own recall@k."""
RECALL_WARN = 0.9
"""Below this sampled recall an approximate run logs a warning."""
EXACT_MAX_TRACKS = 200_000
"""Above this many tracks ``neighbours --method auto`` uses the HNSW index (see
docs/scoring.md: where the ANN build plus queries beat the exact all-pairs product)."""

QUERY_BLOCK_MAX = 50_000
"""Most query rows one block task searches."""


# --- one track ------------------------------------------------------------------------------
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
    scores = ScoreStore(store)
    chosen = scores.pick(model)
    tracks, emb = scores.embeddings(chosen)
    row = find_track(store, tracks, track)
    info = {"track_id": tracks["track_id"].iat[row], "path": tracks["path"].iat[row],
            "label": tracks["label"].iat[row], "model": f"{chosen.name}/{chosen.version}",
            "tracks": len(tracks)}
    cached = _from_table(scores, chosen, str(info["track_id"]), k)
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


def _from_table(scores: ScoreStore, model: ScoredModel, track_id: str, k: int
                ) -> pd.DataFrame | None:
    """The committed neighbours of ``track_id`` if that table is current and deep enough."""
    current = scores.neighbours_current(model.name, model.version)
    if current is None or current["k"] < k or current["source_digest"] != \
            scores.source_digest(model.name, model.version):
        return None
    found = scores.neighbours_of(model.name, model.version, track_id)
    found = found.sort_values("rank").head(k)
    return pd.DataFrame({"rank": found["rank"].to_numpy(np.int32),
                         "track_id": found["neighbour_id"].to_numpy(),
                         "similarity": found["similarity"].to_numpy()})


# --- all-pairs neighbours ---------------------------------------------------------------------
@dataclass
class NeighboursSummary:
    """What a neighbours run did (``skipped``: the committed table was already current)."""

    model_name: str
    model_version: str
    k: int
    skipped: bool = False
    method: str = ""
    tracks: int = 0
    wall_s: float = 0.0
    build_s: float = 0.0
    recall: float | None = None
    recall_checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeighboursSummary:
        """Inverse of :meth:`to_dict`."""
        return from_fields(cls, data)

    def render(self) -> str:
        """Human-readable end-of-run summary."""
        who = f"{self.model_name} v{self.model_version}"
        if self.skipped:
            return (f"Nothing to do: the neighbours table of {who} (k={self.k}, "
                    f"{self.method}) is current for its {self.tracks} tracks.")
        lines = [f"Wrote neighbours of {who}: {self.tracks} tracks x {self.k} "
                 f"({self.method} search) in {self.wall_s:.1f} s. "
                 "Query them: mtag query --store STORE \"SELECT * FROM neighbours\""]
        if self.recall is not None:
            lines.append(f"  recall@{self.k} of the approximate index against exact search "
                         f"on {self.recall_checked} sampled tracks: {self.recall:.3f}")
        return "\n".join(lines)


@task(name="build-ann-index", retries=1, cache_policy=NO_CACHE)
def build_index_task(store_url: str, model_json: dict[str, Any], run_id: str,
                     threads: int) -> float:
    """Build the HNSW index of the run's embeddings and store it beside them."""
    return build_index(store_url, ScoredModel.from_dict(model_json), run_id, threads)


@task(name="neighbours-block", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="neighbours-{start}")
def block_task(store_url: str, model_json: dict[str, Any], run_id: str, start: int, stop: int,
               k: int, method: str, check: int = 0) -> BlockResult:
    """The ``k`` nearest tracks of rows ``start..stop`` into one part file."""
    return search_block(store_url, ScoredModel.from_dict(model_json), run_id, start, stop, k,
                        method, check)


def query_blocks(n: int, workers: int) -> list[tuple[int, int]]:
    """Row ranges of the block tasks: two per worker slot at least, at most
    :data:`QUERY_BLOCK_MAX` rows each.
    """
    n_blocks = max(2 * workers, math.ceil(n / QUERY_BLOCK_MAX))
    bounds = np.linspace(0, n, min(n, n_blocks) + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


@flow(name="neighbours", validate_parameters=False)
def neighbours_flow(store: str, k: int = 10, model: str | None = None, method: str = "auto",
                    workers: int = 1, progress: bool = True, force: bool = False
                    ) -> NeighboursSummary:
    """Write the ``neighbours`` table of a scored model version (``k`` rows per track)."""
    logger = get_run_logger()
    if method not in ("auto", "exact", "ann"):
        raise ParameterError(f"method must be auto, exact or ann, got {method!r}")
    if k < 1:
        raise ParameterError(f"k must be >= 1, got {k}")
    started = time.perf_counter()
    fstore = FeatureStore(store)
    scores = ScoreStore(fstore)
    chosen = scores.pick(model)
    digest = scores.source_digest(chosen.name, chosen.version)
    summary = NeighboursSummary(chosen.name, chosen.version, k)
    current = scores.neighbours_current(chosen.name, chosen.version)
    if not force and current and current["k"] == k and current["source_digest"] == digest \
            and method in ("auto", current["method"]):
        logger.info("neighbours of %s v%s are current", chosen.name, chosen.version)
        summary.skipped, summary.method, summary.tracks = True, current["method"], \
            current["tracks"]
        summary.wall_s = time.perf_counter() - started
        return summary
    record, parts = _all_pairs(scores, chosen, summary, method, workers, progress)
    scores.commit_neighbours(chosen.name, chosen.version, record | {"source_digest": digest},
                             parts)
    summary.wall_s = time.perf_counter() - started
    logger.info("flow run %s: neighbours of %d tracks x %d by %s in %.1f s", run_id(),
                summary.tracks, k, summary.method, summary.wall_s)
    publish("neighbours-summary", f"neighbours of {chosen.name} v{chosen.version}", {
        "tracks": summary.tracks, "k": k, "method": summary.method,
        "index build s": summary.build_s, "recall@k (sampled)": "1 (exact)"
        if summary.recall is None else summary.recall, "wall s": summary.wall_s})
    return summary


def _all_pairs(scores: ScoreStore, model: ScoredModel, summary: NeighboursSummary, method: str,
               workers: int, progress: bool) -> tuple[dict[str, Any], list[DataFile]]:
    """Search every track's neighbours into a new run; return the run's record and parts."""
    tracks, emb = scores.embeddings(model)
    n = summary.tracks = len(tracks)
    if n < 2:
        raise StoreError("need at least two scored tracks for neighbours")
    resolved = summary.method = method if method != "auto" else (
        "exact" if n <= EXACT_MAX_TRACKS else "ann")
    nb_run = f"r-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run = scores.neighbour_run(model.name, model.version, nb_run)
    run.write_inputs(tracks["track_id"].to_numpy(), emb)
    del emb
    store_url = scores.store.url
    if resolved == "ann":
        summary.build_s = build_index_task.submit(store_url, model.to_dict(), nb_run,
                                                  max(1, workers)).result()
    blocks = query_blocks(n, workers)
    check = math.ceil(RECALL_SAMPLE / len(blocks)) if resolved == "ann" else 0
    futures = block_task.map(store_url, unmapped(model.to_dict()), nb_run,
                             [a for a, _ in blocks], [b for _, b in blocks], summary.k,
                             resolved, check)
    done: list[BlockResult] = []

    def collect(result: BlockResult) -> float:
        done.append(result)
        return result.rows

    failed = commit_as_completed(futures, collect, what="neighbours", total=n, unit="tracks",
                                 progress=progress)
    if failed:  # a run is committed whole or not at all
        raise StoreError(f"{failed} neighbour blocks failed after retries; the run was not "
                         "committed (run again)")
    _measured_recall(summary, done)
    parts = sorted((r.part for r in done), key=lambda p: p.path)
    return {"run_id": nb_run, "k": summary.k, "method": resolved, "tracks": n,
            "parts": [p.path for p in parts],
            "ann": ANN_PARAMS | {"backend": ANN_BACKEND} if resolved == "ann" else None,
            "build_s": summary.build_s,
            "recall_sample": {"tracks": summary.recall_checked, "recall": summary.recall}
            if summary.recall_checked else None}, parts


def _measured_recall(summary: NeighboursSummary, blocks: list[BlockResult]) -> None:
    """Pool the blocks' sampled recall into ``summary`` and warn when it is low."""
    checked = sum(b.checked for b in blocks)
    if not checked:
        return
    recall = sum((b.recall or 0.0) * b.checked for b in blocks) / checked
    summary.recall, summary.recall_checked = recall, checked
    logger = get_run_logger()
    say = logger.warning if recall < RECALL_WARN else logger.info
    say("approximate neighbours: recall@%d %.3f against exact search on %d sampled tracks%s",
        summary.k, recall, checked, "" if recall >= RECALL_WARN else
        f" (below {RECALL_WARN}: consider --method exact)")


def run_neighbours(store: str, *, k: int = 10, model: str | None = None, method: str = "auto",
                   dask_address: str | None = None, n_workers: int | None = None,
                   progress: bool = True, force: bool = False, echo: Echo = None
                   ) -> NeighboursSummary:
    """Run :func:`neighbours_flow` on a Dask cluster (an existing or a local one)."""
    result: NeighboursSummary = run_on_cluster(
        neighbours_flow, {"store": store, "k": k, "model": model, "method": method,
                          "progress": progress, "force": force},
        dask_address=dask_address, n_workers=n_workers, echo=echo)
    return result
