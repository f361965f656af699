"""Planning: which files need work, and how they group into shards sized by audio minutes."""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from featurestore.hashing import short_hash, track_id_of
from featurestore.sources import SourceFile
from flows.records import ProbeRecord, ShardBatch, ShardPlan

MAX_TASK_RUNS = 1000
"""Most task runs one flow run plans, whatever the catalogue size (Prefect degrades past a few
thousand task runs per flow run, and each ``DaskTaskRunner`` submit costs 170-290 ms in the
flow process): past it, a task processes a batch of shards, one after another, and a retry
redoes only the shards its failed attempt did not finish."""

TRACK_OVERHEAD_S = 1.0
"""Audio seconds a track's fixed cost (open, header, write) counts for when sizing shards."""


@dataclass(frozen=True)
class Triage:
    """Listed files split by what the run must do with them."""

    to_probe: list[SourceFile]
    unchanged: int  # known by URI, size and mtime, and already committed


def triage(files: Iterable[SourceFile], known: dict[str, tuple[int, float, str]],
           committed: set[str]) -> Triage:
    """Skip files whose URI, size and mtime match a committed track; probe the rest."""
    to_probe, unchanged = [], 0
    for f in files:
        hit = known.get(f.uri)
        if hit and hit[0] == f.size_bytes and hit[1] == f.mtime \
                and track_id_of(hit[2]) in committed:
            unchanged += 1
        else:
            to_probe.append(f)
    return Triage(to_probe, unchanged)


def batches(items: list, n_batches: int, max_size: int) -> list[list]:
    """Split ``items`` into about ``n_batches`` contiguous batches of at most ``max_size``."""
    if not items:
        return []
    size = max(1, min(max_size, -(-len(items) // max(1, n_batches))))
    return [items[i:i + size] for i in range(0, len(items), size)]


def plan_shards(records: list[ProbeRecord], feature_set: str, *, shard_minutes: float,
                workers: int = 1, max_tracks: int = 2000) -> list[ShardPlan]:
    """Group records into shards of about ``shard_minutes`` of audio, evenly sized.

    Parameters
    ----------
    records : list of ProbeRecord
        Tracks to process, one per track id.
    feature_set : str
    shard_minutes : float > 0
        Upper target of audio per shard.
    workers : int
        Worker slots: there are at least two shards' worth of work per slot; on small
        catalogues the shards taper (see :func:`_sizes`), so no worker idles at the end.
    max_tracks : int
        Upper bound of tracks per shard.

    Returns
    -------
    list of ShardPlan
        Largest first (the order to submit them in). Shards hold consecutive URIs; shard ids
        hash the feature set and the sorted track ids, so re-planning the same pending tracks
        gives the same names.
    """
    def cost(r: ProbeRecord) -> float:
        audio = r.duration_s if r.status == "ok" and r.duration_s else 0.0
        return audio + TRACK_OVERHEAD_S

    ordered = sorted(records, key=lambda r: r.uri)
    if not ordered:
        return []
    total = sum(cost(r) for r in ordered)
    n = max(2 * workers, math.ceil(total / (shard_minutes * 60.0)),
            math.ceil(len(ordered) / max_tracks))
    if n < 8 * workers:
        n = math.ceil(n / workers) * workers
    n = min(n, len(ordered))
    bounds = list(itertools.accumulate(_sizes(total, n, workers, shard_minutes * 60.0)))
    groups: list[list[ProbeRecord]] = [[] for _ in bounds]
    done, last = 0.0, 0
    for r in ordered:
        # contiguous: a track goes to the shard its cost midpoint falls in
        k = max(bisect.bisect_right(bounds, done + cost(r) / 2), last)
        k = min(k, len(groups) - 1)
        while k < len(groups) and len(groups[k]) >= max_tracks:
            k += 1
        if k == len(groups):
            groups.append([])
        groups[k].append(r)
        last = k
        done += cost(r)
    shards = []
    for members in groups:
        if members:
            shard_id = "s-" + short_hash(feature_set, *sorted(r.track_id for r in members))
            shards.append(ShardPlan(shard_id, feature_set, tuple(members)))
    return sorted(shards, key=lambda s: -s.audio_s)


def _sizes(total: float, n: int, workers: int, cap: float = math.inf) -> list[float]:
    """Shard sizes (cost) for ``n`` even shards' worth of work: a catalogue of fewer than
    eight shards per worker slot tapers, each shard a ``1/(2*workers)`` share of what is left
    but none under a third of an even shard, so the last shards to start are small and no
    worker finishes long after the others (guided self-scheduling); larger catalogues keep
    ``n`` even shards (their tail is already under an eighth of a worker's share). No shard
    is over ``cap``.
    """
    even = total / n
    if n >= 8 * workers or workers < 1:
        return [even] * n
    sizes, left, smallest = [], total, even / 3
    while left > 0:
        size = min(even * 2, cap, max(smallest, left / (2 * workers)))
        if left - size < smallest / 2:
            size = left
        sizes.append(size)
        left -= size
    return sizes


def batch_shards(shards: list[ShardPlan], max_tasks: int = MAX_TASK_RUNS) -> list[ShardBatch]:
    """Group shards into at most ``max_tasks`` task batches of about equal audio, largest
    first; with no more shards than ``max_tasks`` every batch is one shard.
    """
    if len(shards) <= max_tasks:
        return [ShardBatch(s.shard_id, (s,)) for s in shards]
    groups: list[list[ShardPlan]] = [[] for _ in range(max_tasks)]
    lightest = [(0.0, k) for k in range(max_tasks)]  # a heap of (load, batch)
    for s in sorted(shards, key=lambda s: -s.audio_s):  # longest first onto the lightest
        load, k = heapq.heappop(lightest)
        groups[k].append(s)
        heapq.heappush(lightest, (load + s.audio_s + TRACK_OVERHEAD_S * len(s.tracks), k))
    out = [ShardBatch("b-" + short_hash(*(s.shard_id for s in g)), tuple(g)) for g in groups]
    return sorted(out, key=lambda b: -sum(s.audio_s for s in b.shards))


def dedupe(records: Iterable[ProbeRecord], committed: set[str]) -> tuple[list[ProbeRecord], int]:
    """Keep one record per new track id; return them and how many were skipped."""
    seen: set[str] = set()
    keep, skipped = [], 0
    for r in sorted(records, key=lambda r: r.uri):
        if r.track_id in committed or r.track_id in seen:
            skipped += 1
            continue
        seen.add(r.track_id)
        keep.append(r)
    return keep, skipped
