"""The store's commit lease: at most one process at a time may commit to the store's tables.

Only the holder of the *commit lease* commits to the store's (Delta Lake) tables. The lease is
taken for one commit (seconds) or one compaction (minutes), never for a whole run, and works
the same for processes on one host or on several hosts that share a local folder or an
``s3://`` bucket.

How it works
------------
The lease is a sequence of generation-numbered objects under the store root::

    _locks/commit-000000000001.json
    _locks/commit-000000000002.json     {"owner", "host", "pid", "process", "acquired_at",
    ...                                  "expires_at", "released"}

The highest generation is the current lease. To acquire, a process reads it; if there is none,
or it is released, or it has expired, the process creates the next generation with an
*exclusive create* (a hard link of a finished temporary file on a local disk, a conditional
``PutObject`` with ``If-None-Match: *`` on S3: :func:`featurestore.records.put_if_absent`),
which exactly one contender can win; the others re-read and wait.
The holder renews by rewriting its own object with a later ``expires_at`` (the
:class:`CommitLease` context manager does this from a daemon thread every ``ttl / 3``), and
releases by rewriting it with ``released: true``; only the owner ever writes its generation.
Releasing also deletes generations older than ``g - 2``.

Guarantees
----------
* Two contenders never both create the same generation, so at most one process at a time
  holds the *current* generation, on one host or many.
* A holder that stops (crash, kill, lost network) blocks the others for at most ``ttl``
  seconds: its lease expires and the next contender takes over. A contender on the same
  kernel and in the same PID namespace as the holder (its record's ``process``: boot id,
  PID namespace, and the holder's start time) takes over at once when that process is gone
  (or is a zombie, or its PID now names another process): a `kill -9` of a run does not
  make the next run on that machine wait out the ttl. Anywhere else (another host, another
  container) only expiry counts.
* A holder that merely stalls past its ``expires_at`` (a long pause, a suspended VM) may be
  taken over while it still believes it holds the lease. This is what :meth:`CommitLease.check`
  is for (fencing): it raises once a higher generation exists or the lease has expired, and
  the holder calls it right before every commit. The commit that follows must then finish well
  within the lease's remaining time (at least ``2/3 ttl`` under the renewing context manager).

What it does not guarantee
--------------------------
* **Clocks.** Expiry is judged by each contender's wall clock against the holder's
  ``expires_at``: the clock skew between hosts must be well below ``ttl`` (use NTP; keep ``ttl``
  in tens of seconds). A contender whose clock runs ahead by more than the holder's remaining
  time takes the lease over early; the holder's next :meth:`~CommitLease.check` then raises, but
  a commit already past its check is not stopped.
* **Storage.** Exclusive creates are needed: a local filesystem (one host, or a network
  filesystem with atomic hard links or ``O_EXCL``) or an S3 store that honours
  ``If-None-Match`` (AWS S3 since 2024, MinIO, moto). Other fsspec filesystems are refused
  with :class:`StoreError`.
* **Re-entrancy.** A :class:`CommitLease` that is held refuses a second :meth:`acquire`, and
  a second :class:`CommitLease` of the same process waits for the first like any other
  contender: take the lease once per commit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from featurestore import records
from tasks.errors import StoreError

if TYPE_CHECKING:
    from types import TracebackType

    from featurestore.store import FeatureStore

LOCK_DIR = "_locks"
"""Folder of the lease objects under the store root."""

_NAME = re.compile(r"^commit-(\d{12})\.json$")
_KEEP = 2
"""Generations older than ``g - _KEEP`` are deleted when generation ``g`` is released."""


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _namespace() -> str | None:
    """``boot id/PID namespace`` of this process: two processes that share it see the same
    PIDs (None where /proc does not say, e.g. off Linux). Read once: a process never
    changes either.
    """
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{ns}" if boot else None


def process_identity(pid: int) -> str | None:
    """``boot id/PID namespace/start time`` of a live process ``pid`` of this namespace (None
    if it is gone, a zombie, or /proc does not say).
    """
    ns = _namespace()
    stat = _read_text(f"/proc/{pid}/stat")
    if ns is None or stat is None:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3
    if not fields or fields[0] in ("Z", "X"):
        return None
    return f"{ns}/{fields[19]}"  # field 22: start time in clock ticks since boot


@dataclass(frozen=True)
class _Record:
    owner: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float
    released: bool
    process: str = ""  # process_identity of the holder ("" where unknown)

    def to_bytes(self) -> bytes:
        data = {"owner": self.owner, "host": self.host, "pid": self.pid,
                "process": self.process, "acquired_at": self.acquired_at,
                "expires_at": self.expires_at, "released": self.released}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> _Record:
        data = json.loads(raw)
        return cls(owner=str(data["owner"]), host=str(data["host"]), pid=int(data["pid"]),
                   acquired_at=float(data["acquired_at"]),
                   expires_at=float(data["expires_at"]), released=bool(data["released"]),
                   process=str(data.get("process") or ""))

    def holder_gone(self) -> bool:
        """Whether the holder is known to be gone: it ran in this process's PID namespace on
        this boot, and its PID is no longer that process.
        """
        if not self.process:
            return False
        ns = _namespace()
        if ns is None or self.process.rsplit("/", 1)[0] != ns:
            return False  # another host, container or boot: only expiry can tell
        return process_identity(self.pid) != self.process


class _Backend:
    """Exclusive create, overwrite, read, list and delete of the lease objects."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.fs = store.fs
        self.dir = store.path(LOCK_DIR)
        self.s3 = records.is_s3(self.fs)
        if not (store.is_local or self.s3):
            protocol = self.fs.protocol
            raise StoreError(
                f"store {store.url}: the commit lease needs conditional writes (an exclusive "
                f"create), which only a local filesystem or S3 offer here, not {protocol!r}; "
                "put the store on a local disk or an S3-compatible object store"
            )
        if store.is_local:
            os.makedirs(self.dir, exist_ok=True)

    def path(self, generation: int) -> str:
        return f"{self.dir}/commit-{generation:012d}.json"

    def create(self, generation: int, data: bytes) -> bool:
        """Create ``generation`` unless it exists; ``True`` if this call created it."""
        return records.put_if_absent(self.fs, self.path(generation), data)

    def overwrite(self, generation: int, data: bytes) -> None:
        """Replace ``generation``'s content (readers see the old or the new, never a mix)."""
        records.put(self.fs, self.path(generation), data)

    def read(self, generation: int, grace: float) -> _Record | None:
        """The record of ``generation``; ``None`` if it is gone.

        A record that cannot be parsed (a damaged file, or one from a release that created the
        file before writing it, caught in between or whose writer died there) reads as held by
        an unknown process until its modification time plus ``grace`` seconds.
        """
        path = self.path(generation)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return _Record.from_bytes(raw)
        except (ValueError, KeyError, TypeError):
            try:
                modified = self._mtime(path)
            except FileNotFoundError:
                return None
            return _Record(owner="", host="unknown", pid=-1, acquired_at=modified,
                           expires_at=modified + grace, released=False)

    def generations(self) -> list[int]:
        """Every generation present, ascending."""
        if self.store.is_local:
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                return []
        else:
            try:
                names = [p.rstrip("/").rsplit("/", 1)[-1]
                         for p in self.fs.ls(self.dir, detail=False)]
            except FileNotFoundError:
                return []
        found = (_NAME.match(name) for name in names)
        return sorted(int(m.group(1)) for m in found if m)

    def delete(self, generation: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(generation))

    def _mtime(self, path: str) -> float:
        if self.store.is_local:
            return os.stat(path).st_mtime
        modified = self.fs.info(path).get("LastModified")
        return modified.timestamp() if isinstance(modified, dt.datetime) else time.time()


class CommitLease:
    """The store's commit lease (see the module docstring for what it guarantees).

    Parameters
    ----------
    store : FeatureStore
        Store whose tables the holder commits to (local folder or ``s3://``).
    ttl : float
        Seconds the lease stays valid without a renewal; a crashed holder blocks the others
        this long at most. Must be well above the clock skew between hosts.
    timeout : float
        Seconds :meth:`acquire` waits for a live holder before it raises.
    poll : float
        Mean seconds between two looks at a held lease (each sleep is jittered ±50 %).

    Attributes
    ----------
    generation : int or None
        Generation held (or last held); ``None`` before the first :meth:`acquire`.

    Examples
    --------
    >>> with CommitLease(store, ttl=60) as lease:   # doctest: +SKIP
    ...     lease.check()                           # right before every commit
    ...     table.commit(...)
    """

    def __init__(self, store: FeatureStore, *, ttl: float = 60.0, timeout: float = 600.0,
                 poll: float = 0.2) -> None:
        if ttl <= 0 or timeout < 0 or poll <= 0:
            raise StoreError(f"commit lease needs ttl > 0, timeout >= 0 and poll > 0, got "
                             f"ttl={ttl}, timeout={timeout}, poll={poll}")
        self.store = store
        self.ttl = float(ttl)
        self.timeout = float(timeout)
        self.poll = float(poll)
        self.generation: int | None = None
        self._backend = _Backend(store)
        self._record: _Record | None = None  # what this process last wrote, while held
        self._lock = threading.Lock()  # renewals (thread) against release / check
        self._stop: threading.Event | None = None
        self._renewer: threading.Thread | None = None
        self._renew_error: BaseException | None = None

    # --- acquire / release ----------------------------------------------------------------
    def acquire(self) -> CommitLease:
        """Take the lease, waiting up to ``timeout`` seconds for a live holder.

        Returns
        -------
        CommitLease
            ``self``, holding generation :attr:`generation`.

        Raises
        ------
        StoreError
            If this object already holds the lease, or another holder keeps it past
            ``timeout`` (the message names it: host, pid, since when, until when).
        """
        if self._record is not None:
            raise StoreError(f"store {self.store.url}: this process already holds the commit "
                             f"lease (generation {self.generation}); the lease is not "
                             "re-entrant")
        start = time.monotonic()
        deadline = start + self.timeout
        owner = uuid.uuid4().hex
        while True:
            gens = self._backend.generations()
            top = gens[-1] if gens else 0
            current = self._backend.read(top, self.ttl) if top else None
            now = time.time()
            if top and current is None:  # deleted under us (never the highest): look again
                continue
            if current is None or current.released or current.expires_at <= now or \
                    current.holder_gone():
                mine = _Record(owner=owner, host=socket.gethostname(), pid=os.getpid(),
                               acquired_at=now, expires_at=now + self.ttl, released=False,
                               process=process_identity(os.getpid()) or "")
                if self._create(top + 1, mine):
                    if self._backend.generations()[-1] == top + 1:
                        self.generation, self._record = top + 1, mine
                        self._renew_error = None
                        return self
                    # a stale view: top + 1 had been created and deleted long ago while this
                    # process was paused; the lease moved on, so step back and look again
                    self._backend.delete(top + 1)
                continue  # lost the race (or stepped back): re-read the new highest
            if time.monotonic() >= deadline:
                raise StoreError(self._held_message(top, current, time.monotonic() - start))
            pause = self.poll * random.uniform(0.5, 1.5)
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))

    def release(self) -> None:
        """Give the lease back (mark it released) and delete generations older than ``g - 2``.

        Does nothing if the lease is not held; if it was lost to a newer holder in the meantime,
        the newer holder's lease is left untouched.
        """
        self._stop_renewer()
        with self._lock:
            record, gen = self._record, self.generation
            self._record = None
            if record is None or gen is None:
                return
            gens = self._backend.generations()
            if not gens or gens[-1] == gen:
                self._backend.overwrite(gen, replace(record, released=True).to_bytes())
        for old in gens:
            if old < gen - _KEEP:
                with contextlib.suppress(OSError):  # best effort: a later release retries
                    self._backend.delete(old)

    def renew(self) -> None:
        """Extend the lease to ``ttl`` seconds from now.

        Raises
        ------
        StoreError
            If the lease is not held, has expired, or was taken over (see :meth:`check`);
            an expired lease is never revived, since another process may be taking it over.
        """
        with self._lock:
            self._check_locked()
            assert self._record is not None and self.generation is not None
            record = replace(self._record, expires_at=time.time() + self.ttl)
            self._backend.overwrite(self.generation, record.to_bytes())
            self._record = record
            self._check_locked()  # a takeover that raced this renewal

    def check(self) -> None:
        """Raise unless this process still holds the lease: call it right before each commit.

        Raises
        ------
        StoreError
            ``lost the commit lease ...`` if a higher generation exists (another process took
            it over) or the lease has expired; also if it is not held at all.
        """
        with self._lock:
            self._check_locked()

    # --- context manager ------------------------------------------------------------------
    def __enter__(self) -> CommitLease:
        self.acquire()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, args=(self._stop,),
                                         name=f"commit-lease-{self.generation}", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.release()
            return
        with contextlib.suppress(Exception):  # keep the caller's error; the lease expires
            self.release()

    # --- internals ------------------------------------------------------------------------
    def _create(self, generation: int, record: _Record) -> bool:
        if self._backend.create(generation, record.to_bytes()):
            return True
        # an S3 retry of a create that had succeeded answers "exists": it is ours if it says so
        found = self._backend.read(generation, self.ttl)
        return found is not None and found.owner == record.owner

    def _check_locked(self) -> None:
        record, gen = self._record, self.generation
        if record is None or gen is None:
            raise StoreError(f"store {self.store.url}: the commit lease is not held by this "
                             "process; acquire it first")
        gens = self._backend.generations()
        if gens and gens[-1] > gen:
            newer = self._backend.read(gens[-1], self.ttl)
            who = f"pid {newer.pid} on {newer.host}" if newer else "another process"
            raise StoreError(f"lost the commit lease of store {self.store.url}: generation "
                             f"{gens[-1]} (held by {who}) replaced generation {gen}; do not "
                             "commit, take the lease again")
        now = time.time()
        if record.expires_at <= now:
            why = (f"it expired {now - record.expires_at:.1f} s ago (ttl {self.ttl:g} s)")
            if self._renew_error is not None:
                why += f"; renewing it failed: {self._renew_error}"
            raise StoreError(f"lost the commit lease of store {self.store.url} (generation "
                             f"{gen}): {why}; do not commit, take the lease again")
        mine = self._backend.read(gen, self.ttl)
        if mine is None or mine.owner != record.owner:
            who = f"pid {mine.pid} on {mine.host}" if mine else "nobody (it is gone)"
            raise StoreError(f"lost the commit lease of store {self.store.url}: generation "
                             f"{gen} now belongs to {who}; does the object store honour "
                             "If-None-Match? Do not commit")

    def _renew_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                self.renew()
            except StoreError as exc:  # lost: check() tells the holder
                self._renew_error = exc
                return
            except Exception as exc:  # transient (network): retry until the lease expires
                self._renew_error = exc

    def _stop_renewer(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        self._stop = self._renewer = None

    def _held_message(self, generation: int, holder: _Record, waited: float) -> str:
        return (
            f"store {self.store.url}: the commit lease (generation {generation}) is held by pid "
            f"{holder.pid} on host {holder.host} since {_iso(holder.acquired_at)}, until "
            f"{_iso(holder.expires_at)} unless renewed; waited {waited:.1f} s. Wait for that "
            f"commit to finish or raise the timeout; if that process is gone, its lease "
            f"expires by itself at {_iso(holder.expires_at)} (never delete "
            f"{self.store.uri(self._backend.path(generation))} by hand while it may be alive)"
        )


def commit_lease(store: FeatureStore, **kw: Any) -> CommitLease:
    """A :class:`CommitLease` on ``store``: use it as ``with commit_lease(store): ...``.

    Parameters
    ----------
    store : FeatureStore
        Store whose tables the holder commits to.
    **kw
        ``ttl``, ``timeout`` and ``poll`` of :class:`CommitLease`.

    Returns
    -------
    CommitLease
        Not yet acquired; entering it acquires it and keeps it renewed.
    """
    return CommitLease(store, **kw)


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")
