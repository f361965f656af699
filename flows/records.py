"""Small records passed between the flow and its tasks (never arrays or data frames), and the
rule every flow summary uses to be rebuilt from its dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from featurestore.scores import WrittenPart
from featurestore.store import ShardCounts, WrittenShard

T = TypeVar("T")


def from_fields(cls: type[T], data: dict[str, Any], **convert: Any) -> T:
    """Build dataclass ``cls`` from ``data``, ignoring keys that are not fields (derived
    figures a ``to_dict`` added); ``convert`` maps a field name to a function of its value.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: convert[k](v) if k in convert and v is not None else v
              for k, v in data.items() if k in names}
    return cls(**kwargs)


@dataclass(frozen=True)
class ProbeRecord:
    """A source file after hashing and reading its header."""

    uri: str
    size_bytes: int
    mtime: float
    content_hash: str
    track_id: str
    status: str  # "ok" (decodable header), "failed" or "unsupported"
    format: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    duration_s: float | None = None
    stage: str | None = None
    error: str | None = None
    identity: str | None = None  # featurestore.hashing.file_identity when it was hashed
    retry: bool = False  # a transient failure: the next run tries the file again


class _TokenById:
    """A task argument whose Dask token is its id (``_id_field``), which names its content.

    Dask tokenises every argument of a task it is given (to name the task): walking a shard's
    probe records, field by field, was 6 % of the ingest command's samples in py-spy, 1.7 %
    with this.
    """

    __slots__ = ()
    _id_field: ClassVar[str]

    def __dask_tokenize__(self) -> tuple[str, str]:
        return (type(self).__name__, getattr(self, self._id_field))


@dataclass(frozen=True)
class ShardPlan(_TokenById):
    """The tracks one task processes, sized by audio minutes."""

    shard_id: str
    feature_set: str
    tracks: tuple[ProbeRecord, ...]
    _id_field: ClassVar[str] = "shard_id"

    @property
    def audio_s(self) -> float:
        """Audio seconds the headers announce."""
        return sum(t.duration_s or 0.0 for t in self.tracks)


@dataclass(frozen=True)
class ShardResult:
    """What a shard task reports back: the files it wrote (to commit) and what it cost."""

    shard_id: str
    written: WrittenShard
    compute_s: float
    peak_rss_mb: float
    worker: str
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (path, stage, error)
    unsupported: int = 0  # of the failed tracks, how many are unsupported file types

    @property
    def counts(self) -> ShardCounts:
        """The shard's counts (as written)."""
        return self.written.counts


class ShardBatch(_TokenById):
    """The shards one task run processes: one, unless a run plans more shards than it may
    have task runs (:data:`flows.plan.MAX_TASK_RUNS`).

    Immutable, and deliberately not a dataclass: on every submit Prefect walks each task
    parameter that is a dataclass, list, tuple or dict down to its leaves (looking for
    futures to wait on), and a batch holds every probe record of its shards, field by field.
    An instance of a plain class is one leaf to that walk (see docs/decisions.md, 67).
    """

    __slots__ = ("batch_id", "shards")
    _id_field: ClassVar[str] = "batch_id"
    batch_id: str
    shards: tuple[ShardPlan, ...]

    def __init__(self, batch_id: str, shards: tuple[ShardPlan, ...]) -> None:
        object.__setattr__(self, "batch_id", batch_id)
        object.__setattr__(self, "shards", tuple(shards))

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def _values(self) -> tuple[str, tuple[ShardPlan, ...]]:
        return (self.batch_id, self.shards)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardBatch, self._values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardBatch):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"ShardBatch(batch_id={self.batch_id!r}, shards=<{len(self.shards)} shards>)"


@dataclass(frozen=True)
class ScorePlan(_TokenById):
    """The feature shards one scoring task turns into one part."""

    part_id: str
    shards: tuple[str, ...]
    tensor_files: tuple[str | None, ...]  # per shard, as its tracks rows name it
    n_tracks: int
    n_segments: int
    _id_field: ClassVar[str] = "part_id"


@dataclass(frozen=True)
class ScorePartResult:
    """What a scoring task reports back: the part's files (to commit) and what it cost."""

    written: WrittenPart
    compute_s: float
    label_counts: dict[str, int]
    n_unconfident: int
    device: str
    peak_rss_mb: float
    worker: str

    @property
    def n_tracks(self) -> int:
        """Tracks scored."""
        return self.written.n_tracks

    @property
    def n_segments(self) -> int:
        """Segments scored."""
        return self.written.n_segments
