"""What an ingest run decides before any audio is decoded: the preflight.

:func:`look_up` lists a source and splits it against the store's snapshots (no audio opened);
:func:`keep_earlier_rows` and :func:`update_catalogue` apply what probing found to the
catalogue (replaced and deleted files retired, gone files marked); :class:`IngestSummary` is
what a run reports. Nothing here imports Prefect, Dask or the feature stack, so a command can
decide (and start working, :mod:`flows.headstart`) before those have loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from featurestore.catalogue import mark_gone, orphaned, retire
from featurestore.hashing import track_id_of
from featurestore.sources import discover, in_scope, listing_scope
from featurestore.store import FeatureStore, ShardCounts
from flows.plan import Triage, triage
from flows.records import ProbeRecord, ShardResult, from_fields
from flows.report import run_id
from tasks.config import FeatureConfig

MASS_REMOVAL_SHARE = 0.5
"""A run that finds more than this share of the known files under its source gone (and more
than :data:`MASS_REMOVAL_MIN`) retires none of them unless told to (``--accept-removals``):
an unmounted disk or an emptied bucket looks like a deleted catalogue."""
MASS_REMOVAL_MIN = 10


@dataclass
class IngestSummary:
    """What an ingest run did (printed at the end, returned to callers)."""

    feature_set: str
    files: int = 0
    unchanged: int = 0
    duplicates: int = 0
    ok: int = 0
    failed: int = 0
    unsupported: int = 0
    segments: int = 0
    shards: int = 0
    shards_failed: int = 0
    committed_elsewhere: int = 0
    head_start_shards: int = 0  # begun before the flow run (flows.headstart)
    retried: int = 0
    superseded: int = 0
    gone: int = 0
    gone_held: int = 0
    audio_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 1
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    def _catalogue_lines(self) -> list[str]:
        lines = []
        if self.superseded:
            lines.append(f"  {self.superseded} replaced files: their old tracks left the "
                         "current views (earlier table versions keep them)")
        if self.gone:
            lines.append(f"  {self.gone} files no longer listed: marked gone, their tracks "
                         "left the current views")
        if self.gone_held:
            lines.append(f"  ! {self.gone_held} known files are missing from the source, more "
                         "than half of it: nothing was retired (an unmounted disk?); if they "
                         "were deleted, run again with --accept-removals")
        return lines

    @property
    def skipped(self) -> int:
        """Files that needed no work: unchanged since the last run, or duplicate content."""
        return self.unchanged + self.duplicates

    @property
    def realtime_x(self) -> float:
        """Audio seconds processed per wall second."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including derived figures."""
        return asdict(self) | {"skipped": self.skipped, "realtime_x": self.realtime_x}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IngestSummary:
        """Inverse of :meth:`to_dict` (derived figures are recomputed)."""
        return from_fields(cls, data, errors=lambda es: [tuple(e) for e in es])

    def add(self, result: ShardResult, *, counts: ShardCounts | None = None,
            unsupported: int = 0) -> None:
        """Count a committed shard (``counts`` as committed, default the shard's own;
        ``unsupported`` of its failed tracks are unsupported file types).
        """
        counts = counts or result.counts
        self.ok += counts.n_ok
        self.unsupported += unsupported
        self.failed += counts.n_failed - unsupported
        self.segments += counts.n_segments
        self.audio_s += counts.audio_s
        self.compute_s += result.compute_s
        self.shards += 1
        self.errors.extend(result.errors)
        self.peak_rss_mb[result.worker] = max(self.peak_rss_mb.get(result.worker, 0.0),
                                              result.peak_rss_mb)

    def render(self) -> str:
        """Human-readable end-of-run summary."""
        changes = self._catalogue_lines()
        if self.ok + self.failed + self.unsupported == 0 and self.shards_failed == 0:
            return "\n".join([
                f"Nothing to do: all {self.files} files are already in feature set "
                f"{self.feature_set} ({self.unchanged} unchanged, {self.duplicates} "
                f"duplicate or renamed).", *changes])
        hours = self.audio_s / 3600
        per_core = self.realtime_x / max(1, self.workers)
        lines = [
            f"Ingested into feature set {self.feature_set}: "
            f"{self.ok} ok, {self.failed} failed, {self.unsupported} unsupported, "
            f"{self.skipped} skipped (already in store or duplicate)",
            f"  {hours:.2f} h of audio, {self.segments} segments in {self.shards} shards; "
            f"wall {self.wall_s:.1f} s = {self.realtime_x:.0f}x realtime "
            f"({per_core:.0f}x per worker, {self.workers} workers)",
        ]
        if self.shards_failed:
            lines.append(f"  {self.shards_failed} shards failed after retries; "
                         "run again to finish them")
        if self.head_start_shards:
            lines.append(f"  {self.head_start_shards} of the shards began while the cluster "
                         "and the Prefect API started")
        if self.committed_elsewhere:
            lines.append(f"  {self.committed_elsewhere} tracks were committed by another "
                         "writer at the same time (kept once)")
        if self.retried:
            lines.append(f"  {self.retried} tracks whose last attempt failed for a transient "
                         "reason were tried again")
        lines += changes
        for path, stage, error in self.errors[:10]:
            lines.append(f"  ! {stage:8s} {path}: {error}")
        if len(self.errors) > 10:
            lines.append(f"  ... {len(self.errors) - 10} more (query the tracks table)")
        return "\n".join(lines)


@dataclass(frozen=True)
class LookUp:
    """What the store already holds of a source: the preflight of every ingest run."""

    feature_set: str
    files: int
    triage: Triage
    committed: set[str]  # for good (see FeatureStore.committed_track_ids)
    retry: set[str]  # transient failures, tried again
    known: dict[str, tuple[int, float, str]]
    gone: list[str]  # known files under the source that the listing lacks
    gone_held: bool  # too many to retire without --accept-removals


def look_up(fstore: FeatureStore, source: str, cfg: FeatureConfig, *,
            accept_removals: bool = False) -> LookUp:
    """List ``source`` and split it against the store's snapshots (no audio is opened)."""
    fs_id = fstore.register_feature_set(cfg)
    files = discover(source)
    committed, retry = fstore.track_ids(fs_id)
    known = fstore.known_sources()
    scope = listing_scope(source)
    gone: list[str] = []
    in_source = 0
    if scope is not None:
        listed = {f.uri for f in files}
        for uri in known:
            if in_scope(uri, scope):
                in_source += 1
                if uri not in listed:
                    gone.append(uri)
    held = (not accept_removals and len(gone) > MASS_REMOVAL_MIN
            and len(gone) > MASS_REMOVAL_SHARE * in_source)
    return LookUp(fs_id, len(files), triage(files, known, committed), committed, retry, known,
                  sorted(gone), held)


def earlier_row_stands(record: ProbeRecord, look: LookUp) -> bool:
    """A known file that could not be read this time: its earlier row stays as it is."""
    return record.retry and record.uri in look.known


def keep_earlier_rows(records: list[ProbeRecord], look: LookUp, summary: IngestSummary
                       ) -> list[ProbeRecord]:
    """Leave out known files that could not be read this time (gone since the listing, an
    I/O error): their earlier rows stand, nothing is retired for a passing fault.
    """
    keep = []
    for r in records:
        if earlier_row_stands(r, look):
            summary.errors.append((r.uri, r.stage or "probe",
                                   f"{r.error} (its earlier row is kept)"))
        else:
            keep.append(r)
    return keep


def update_catalogue(fstore: FeatureStore, look: LookUp, records: list[ProbeRecord],
                     summary: IngestSummary) -> None:
    """Record what this run saw of the catalogue: the probed files in ``sources``; the tracks
    of replaced and deleted files retired from the current views
    (:mod:`featurestore.catalogue`); deleted files marked gone.
    """
    probed = {r.uri: r.track_id for r in records}
    changed = [u for u, t in probed.items()
               if u in look.known and track_id_of(look.known[u][2]) != t]
    gone = [] if look.gone_held else look.gone
    summary.gone_held = len(look.gone) if look.gone_held else 0
    superseded = orphaned(look.known, probed, [])
    lost = orphaned(look.known, probed, gone) - superseded
    run = run_id() or ""
    if superseded:
        retire(fstore, superseded, reason="superseded", run=run)
    if lost:
        retire(fstore, lost, reason="gone", run=run)
    summary.superseded, summary.gone = len(changed), len(gone)
    mark_gone(fstore, gone)
    fstore.record_sources([
        {"uri": r.uri, "size_bytes": r.size_bytes, "mtime": r.mtime,
         "content_hash": r.content_hash, "track_id": r.track_id, "status": "present"}
        for r in records
    ])


def summary_json(summary: IngestSummary) -> str:
    """The summary as indented JSON."""
    return json.dumps(summary.to_dict(), indent=1, default=str)
