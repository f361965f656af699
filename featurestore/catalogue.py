"""The catalogue as it is now: retire the rows of files that were replaced or deleted.

The ``tracks`` table of every feature set holds one row per track the catalogue has now. When a
file is replaced (its path now holds other bytes) or deleted (a run no longer lists it), the
track its old bytes made leaves the current views: its rows are deleted from the ``tracks`` and
``segments`` tables of every feature set and from every model version's ``scores`` and
``segment_scores`` (one Delta transaction per table; the rows stay reachable through earlier
table versions, ``mtag query --as-of`` and ``mtag train --as-of``, until vacuumed), unless
another listed file still has those bytes. A deleted file is also recorded in ``sources`` with
``status = 'gone'``, so a file that comes back is ingested again.

Retiring runs under the commit lease and leaves an intent record first, so a crash part-way is
finished by the next writer (:meth:`featurestore.store.FeatureStore.resolve_intents`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from featurestore.hashing import track_id_of
from featurestore.store import FeatureStore
from tasks.faults import failpoint


@dataclass(frozen=True)
class Retired:
    """What :func:`retire` removed."""

    tracks: int  # track ids retired
    rows: int  # rows deleted over every table


def retiring_tables(store: FeatureStore) -> list[str]:
    """Every table a retired track's rows are deleted from (``tracks`` last of all would
    hide the rest from a retry; it goes first, so a crash leaves the track out of the views).
    """
    out = []
    for record in store.feature_sets():
        fs_id = record["feature_set"]
        out += [store.table_path(fs_id, "tracks"), store.table_path(fs_id, "segments")]
    for name in ("scores", "segment_scores"):
        out += sorted(p.rsplit("/", 1)[0] for p in store.fs.glob(
            store.path("scores", "*", "v*", name, "_delta_log")))
    return out


def retire(store: FeatureStore, track_ids: set[str], *, reason: str, run: str = "") -> Retired:
    """Delete every row of ``track_ids`` from the current views (see the module docstring).

    Parameters
    ----------
    track_ids : set of str
        Tracks no listed file has any more.
    reason : str
        ``"superseded"`` or ``"gone"``, stored with each commit.
    run : str
        The flow run, stored with each commit.
    """
    if not track_ids:
        return Retired(0, 0)
    ids = sorted(track_ids)
    with store.commit_lease() as lease:
        store.resolve_intents()
        paths = retiring_tables(store)
        intent = store.path("_locks", f"intent-{uuid.uuid4().hex}.json")
        store.write_record(intent, {"kind": "retire", "tables": paths, "track_ids": ids,
                                    "reason": reason, "created_at": _now()})
        rows = 0
        meta: dict[str, Any] = {"mtag.operation": f"retire:{reason}", "mtag.run": run}
        for i, path in enumerate(paths):
            if i:
                failpoint("retire.between")
            lease.check()
            rows += store.delete_tracks(path, ids, metadata=meta)
        store.fs.rm(intent)
    return Retired(len(ids), rows)


def mark_gone(store: FeatureStore, uris: list[str]) -> None:
    """Record in ``sources`` that ``uris`` are no longer listed (after their tracks are
    retired: a crash before this line leaves them to be found gone again).
    """
    store.record_sources([{"uri": u, "size_bytes": None, "mtime": None, "content_hash": None,
                           "track_id": None, "status": "gone"} for u in uris])


def orphaned(known: dict[str, tuple[int, float, str]], probed: dict[str, str],
             gone: list[str]) -> set[str]:
    """Track ids no file has once this run's ``probed`` files (URI -> track id) and ``gone``
    URIs apply to ``known`` (URI -> (size, mtime, content hash)).
    """
    before = {u: track_id_of(known[u][2]) for u in [*probed, *gone] if u in known}
    candidates = {t for u, t in before.items() if probed.get(u) != t}
    if not candidates:
        return set()
    left = set(gone)
    still = {track_id_of(h) for u, (_, _, h) in known.items()
             if u not in left and u not in probed}
    still.update(probed.values())
    return candidates - still


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
