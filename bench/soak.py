#!/usr/bin/env python
"""Soak test: many nightly ingest increments with random catalogue changes and faults.

A catalogue folder of ``--files`` short generated WAV files (1-4 s, 22,050 Hz, fixed
``--seed``) is ingested into a fresh store; then ``--runs`` times:

1. random **catalogue changes** are applied: new files, replaced bytes (in place, or the same
   length), deleted files, a deleted file restored with its old bytes (sometimes its old mtime
   too, as a restore from backup does), a rename, two files swapping names, a duplicate copy;
   now and then a non-audio file, a truncated WAV, an undecodable file, a hidden file;
2. with probability ``--fault-rate`` a **fault** for this run: one of the fail points of
   :data:`tasks.faults.FAILPOINTS` (``MTAG_FAILPOINTS``, once per run through
   ``MTAG_FAILPOINT_ONCE``), SIGTERM or SIGKILL sent to the ``mtag ingest`` process after a
   random delay, or a file rewritten, replaced or deleted by a background thread while the
   run is going;
3. ``mtag ingest CAT --store STORE --workers 2 --no-progress --shard-minutes 0.05`` runs as a
   subprocess (its own session, killed as a group on timeout; a ``worker.track`` run uses
   ``--shard-minutes 0.5``, so that its shards hold more than one track); after a faulted run
   a clean run follows, as the next night would;
4. the **checks**: ``mtag verify`` exits 0, and with ``mtag query --format json``:
   every regular, non-hidden file now in the folder has its content's track id (first 16 hex
   digits of BLAKE2b-128 of its bytes) in ``tracks`` exactly once (files with the same bytes
   count once); no track has bytes no current file has; no ``(track_id, segment)`` twice, no
   segment without its track, an ok track has ``n_segments`` segments; ``sources`` shows every
   current file ``present`` with its track id and every file deleted since a check ``gone``;
   each row's status fits its bytes (generated audio ``ok``, non-audio ``unsupported``,
   undecodable ``failed``, truncated ``ok`` or ``failed``; none left ``retry`` after a clean
   run).

Figures: **lost** counts current files whose track is missing (and ok tracks missing
segments), **doubled** counts tracks present twice, stale tracks (bytes no current file has),
duplicated segments and segments without a track; **sources wrong** and **wrong status** the
other two checks. Each is counted once per distinct problem over the whole soak (a problem a
later run repairs is still counted); every check's own figures are in the JSON. The script
exits 1 if anything was lost, doubled, wrong, failed verification, hung or a clean run exited
non-zero, after printing the first failing check in detail. The store as it was at that check
is copied to ``WORKDIR/first-failure-store`` and the work folder is kept.

Every ``mtag`` command's output is kept under ``WORKDIR/logs/``. By default one
``prefect server start`` serves the whole soak (``PREFECT_API_URL``, as under ``mtag stack``);
``--prefect ephemeral`` lets each ingest start its own temporary API, as a bare ``mtag ingest``
does (some 40 s more a run on a loaded 2-core machine). The server's Prefect home is
``bench/results/prefect-home-soak`` unless ``PREFECT_HOME`` is set (``--prefect-home``).

Results: ``bench/results/soak-<YYYYmmdd-HHMMSS>.json`` (``--out``).

Usage::

    .venv/bin/python bench/soak.py --runs 6                 # a quick look
    .venv/bin/python bench/soak.py --runs 25 --seed 7       # ~20 min on 2 cores
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import benchenv  # first: puts the repository root on sys.path

SR = 22050
SUBDIRS = ("", "disc 1", "disc2/side b")
SIGNAL_KINDS = ("sigterm", "sigkill")
MIDRUN_KIND = "midrun-change"
#: --shard-minutes of a worker.track run (its point is after a shard's first track: with
#: 0.05 min = 3 s most shards of 1-4 s tracks hold one track)
WORKER_SHARD_MINUTES = 0.5
DASK_LINE = "Dask: local cluster"  # the ingest's first line: its flow is about to start


def fault_kinds() -> list[str]:
    """Every fault the soak injects: the fail points, the two signals, a mid-run change."""
    from tasks.faults import FAILPOINTS

    return [*FAILPOINTS, *SIGNAL_KINDS, MIDRUN_KIND]


def track_id_of_bytes(data: bytes) -> str:
    """The track id the pipeline gives these bytes (featurestore/hashing.py)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# the catalogue
class Catalogue:
    """The catalogue folder, the changes applied to it and what each file's bytes are."""

    def __init__(self, root: str, rng: Any) -> None:
        self.root = root
        self.rng = rng
        self.serial = 0
        self.kind_of: dict[str, str] = {}  # track id -> audio|nonaudio|undecodable|truncated
        self.deleted: dict[str, tuple[bytes, float]] = {}  # path -> (bytes, mtime)
        self.changes: Counter[str] = Counter()
        self.lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    # bytes ------------------------------------------------------------------------------
    def audio_bytes(self, seconds: float | None = None) -> bytes:
        """A new WAV (PCM 16) of music-like audio, 1-4 s unless ``seconds``."""
        import soundfile as sf

        from tests.factories import music_like

        self.serial += 1
        s = float(self.rng.uniform(1.0, 4.0)) if seconds is None else seconds
        buf = io.BytesIO()
        sf.write(buf, music_like(s, SR, seed=1_000_000 + self.serial), SR, format="WAV",
                 subtype="PCM_16")
        return self.note(buf.getvalue(), "audio")

    def note(self, data: bytes, kind: str) -> bytes:
        self.kind_of[track_id_of_bytes(data)] = kind
        return data

    def new_name(self, ext: str = ".wav", *, hidden: bool = False) -> str:
        self.serial += 1
        sub = SUBDIRS[int(self.rng.integers(len(SUBDIRS)))]
        stem = f"track {self.serial:05d}" if self.rng.random() < 0.3 else f"t{self.serial:05d}"
        name = ("." if hidden else "") + stem + ext
        return os.path.join(self.root, sub, name) if sub else os.path.join(self.root, name)

    @staticmethod
    def write(path: str, data: bytes, *, slow: bool = False) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            if slow:  # a copy in progress: half, a pause, the rest
                fh.write(data[: len(data) // 2])
                fh.flush()
                time.sleep(0.3)
                fh.write(data[len(data) // 2:])
            else:
                fh.write(data)

    @staticmethod
    def replace_atomically(path: str, data: bytes) -> None:
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{time.monotonic_ns()}")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    # listing ----------------------------------------------------------------------------
    def files(self) -> list[str]:
        """Regular, non-hidden files under the root (hidden folders skipped), sorted."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not name.startswith(".") and os.path.isfile(path) \
                        and not os.path.islink(path):
                    out.append(path)
        return sorted(out)

    def audio_files(self) -> list[str]:
        """The files whose bytes are generated audio (not truncated, not undecodable)."""
        return [p for p, tid in self.current().items() if self.kind_of.get(tid) == "audio"]

    def current(self) -> dict[str, str]:
        """Path -> track id of its bytes, for every file :meth:`files` lists."""
        out = {}
        for path in self.files():
            with open(path, "rb") as fh:
                out[path] = track_id_of_bytes(fh.read())
        return out

    def pick(self, paths: Sequence[str]) -> str | None:
        return paths[int(self.rng.integers(len(paths)))] if paths else None

    # changes ----------------------------------------------------------------------------
    def populate(self, n: int) -> None:
        for _ in range(n):
            self.write(self.new_name(), self.audio_bytes())

    def add(self) -> None:
        self.write(self.new_name(), self.audio_bytes())
        self.changes["add"] += 1

    def replace(self) -> None:
        path = self.pick(self.audio_files())
        if path is None:
            return
        if self.rng.random() < 0.5:  # the same length: the same size, other bytes
            import soundfile as sf

            data = self.audio_bytes(sf.info(path).frames / SR)
            self.changes["replace-same-size"] += 1
        else:
            data = self.audio_bytes()
            self.changes["replace"] += 1
        self.write(path, data)

    def delete(self, path: str | None = None, kind: str = "delete") -> str | None:
        path = path or self.pick(self.files())
        if path is None:
            return None
        with open(path, "rb") as fh:
            data = fh.read()
        self.deleted[path] = (data, os.stat(path).st_mtime)
        os.remove(path)
        self.changes[kind] += 1
        return path

    def restore(self) -> None:
        gone = sorted(p for p in self.deleted if not os.path.exists(p))
        path = self.pick(gone)
        if path is None:
            return
        data, mtime = self.deleted.pop(path)
        self.write(path, data)
        if self.rng.random() < 0.5:  # a restore from backup keeps the old mtime
            os.utime(path, (mtime, mtime))
            self.changes["restore-old-mtime"] += 1
        else:
            self.changes["restore"] += 1

    def rename(self) -> None:
        path = self.pick(self.files())
        if path is None:
            return
        new = self.new_name(os.path.splitext(path)[1])
        os.makedirs(os.path.dirname(new), exist_ok=True)
        os.rename(path, new)
        self.changes["rename"] += 1

    def swap(self) -> None:
        audio = self.audio_files()
        if len(audio) < 2:
            return
        i, j = self.rng.choice(len(audio), size=2, replace=False)
        a, b = audio[int(i)], audio[int(j)]
        tmp = a + ".swap"
        os.rename(a, tmp)
        os.rename(b, a)
        os.rename(tmp, b)
        self.changes["swap"] += 1

    def duplicate(self) -> None:
        path = self.pick(self.files())
        if path is None:
            return
        new = self.new_name(os.path.splitext(path)[1])
        os.makedirs(os.path.dirname(new), exist_ok=True)
        shutil.copyfile(path, new)
        self.changes["duplicate"] += 1

    def non_audio(self) -> None:
        self.serial += 1
        ext = (".txt", ".jpg", ".pdf")[int(self.rng.integers(3))]
        data = self.note(f"liner notes {self.serial}\n".encode() * 20, "nonaudio")
        self.write(self.new_name(ext), data)
        self.changes["non-audio"] += 1

    def truncated(self) -> None:
        data = self.audio_bytes(float(self.rng.uniform(2.0, 4.0)))
        del self.kind_of[track_id_of_bytes(data)]
        cut = self.note(data[: len(data) // 3], "truncated")
        self.write(self.new_name(), cut)
        self.changes["truncated"] += 1

    def undecodable(self) -> None:
        self.serial += 1
        if self.rng.random() < 0.5:
            data, ext = f"this is not an mp3 file {self.serial}\n".encode() * 40, ".mp3"
        else:
            data = b"RIFF\x00\x10\x00\x00WAVEjunk" + self.rng.bytes(4000)
            ext = ".wav"
        self.write(self.new_name(ext), self.note(data, "undecodable"))
        self.changes["undecodable"] += 1

    def hidden(self) -> None:
        self.write(self.new_name(hidden=True), self.audio_bytes())
        self.changes["hidden"] += 1

    def increment(self) -> list[str]:
        """Apply one night's random changes; return their kinds in order. Deletions come
        first, so that a replaced or renamed file is not also deleted the same night."""
        before = Counter(self.changes)
        r = self.rng
        for _ in range(int(r.integers(0, 3))):
            self.delete()
        if self.deleted and r.random() < 0.4:
            self.restore()
        for _ in range(int(r.integers(0, 3))):
            self.replace()
        if r.random() < 0.3:
            self.rename()
        if r.random() < 0.15:
            self.swap()
        if r.random() < 0.3:
            self.duplicate()
        for _ in range(int(r.integers(0, 4))):
            self.add()
        if r.random() < 0.12:
            self.non_audio()
        if r.random() < 0.12:
            self.truncated()
        if r.random() < 0.12:
            self.undecodable()
        if r.random() < 0.08:
            self.hidden()
        return sorted((self.changes - before).elements())

    def change_midrun(self) -> str | None:
        """The background fault's change: rewrite in place (slowly), replace atomically or
        delete a random audio file; return its kind."""
        with self.lock:
            path = self.pick(self.audio_files())
            if path is None:
                return None
            choice = int(self.rng.integers(3))
            if choice == 0:
                self.write(path, self.audio_bytes(), slow=True)
                kind = "midrun-rewrite"
            elif choice == 1:
                self.replace_atomically(path, self.audio_bytes())
                kind = "midrun-replace"
            else:
                self.delete(path, kind="midrun-delete")
                return "midrun-delete"
            self.changes[kind] += 1
            return kind


# ----------------------------------------------------------------------------------------
# processes
@dataclass
class Proc:
    """One finished subprocess."""

    argv: list[str]
    rc: int | None
    wall_s: float
    stdout: str
    stderr: str
    log: str
    timed_out: bool = False
    leftovers: int = 0  # processes of its session alive after it exited (then killed)
    signalled: str | None = None  # the signal the soak sent while it ran


def session_members(sid: int) -> list[int]:
    """Pids of the processes whose session is ``sid`` (the subprocess and its children,
    including those reparented after it died)."""
    import psutil

    out = []
    for pid in psutil.pids():
        if pid == sid:
            continue
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                out.append(pid)
    return out


def kill_session(sid: int, grace_s: float = 0.0) -> tuple[int, int]:
    """SIGKILL what is left of session ``sid`` (after waiting up to ``grace_s`` for it to
    go by itself); return how many processes were still alive to kill, and how many of them
    outlived the kill (after 10 s). While a session has members the kernel keeps its id, so
    every process found is one this script started or one of its descendants."""
    deadline = time.monotonic() + grace_s
    left = session_members(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = session_members(sid)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    still = session_members(sid) if left else []
    while still and time.monotonic() < end:
        time.sleep(0.1)
        still = session_members(sid)
    return len(left), len(still)


@dataclass
class Hook:
    """Something done to a running ingest: a signal, or a change to the catalogue.

    Its moment: ``delay_s`` after the line ``marker`` appears in the command's output (the
    local Dask cluster is up: the flow is about to list the source), or after the start when
    ``marker`` is None. A signal goes to the ingest process only, as the OOM killer or an
    operator would send it, and only if it is still running; ``change`` runs either way.
    """

    delay_s: float
    marker: str | None = None
    signal: str | None = None  # "sigterm" | "sigkill"
    change: Any = None  # callable returning the change's kind
    signalled: str | None = None
    during: bool = False  # the process was running when the hook acted
    acted_at_s: float | None = None  # seconds after the start
    change_kind: str | None = None

    def run(self, proc: subprocess.Popen, out_path: str) -> None:
        t0 = time.perf_counter()
        if self.marker:
            while proc.poll() is None:
                with contextlib.suppress(OSError), open(out_path) as fh:
                    if self.marker in fh.read():
                        break
                time.sleep(0.1)
        end = time.perf_counter() + self.delay_s
        while proc.poll() is None and time.perf_counter() < end:
            time.sleep(0.05)
        self.during = proc.poll() is None
        self.acted_at_s = round(time.perf_counter() - t0, 2)
        if self.signal and self.during:
            signum = signal.SIGTERM if self.signal == "sigterm" else signal.SIGKILL
            with contextlib.suppress(OSError):
                proc.send_signal(signum)
                self.signalled = self.signal
        if self.change:
            self.change_kind = self.change()


class Runner:
    """Runs ``python -m flows.cli ...`` commands in their own sessions, logging each."""

    def __init__(self, logs: str, env: dict[str, str], timeout_s: float) -> None:
        self.logs = logs
        self.env = env
        self.timeout_s = timeout_s
        self.count = 0
        self.live: set[int] = set()
        self.procs: dict[int, subprocess.Popen] = {}  # session -> its leader, while running
        self.survivors = 0  # processes that outlived a kill
        self.leftover_normal = 0  # processes left behind by commands that exited by themselves
        os.makedirs(logs, exist_ok=True)

    def mtag(self, args: list[str], tag: str, *, env: dict[str, str] | None = None,
             hook: Hook | None = None, timeout_s: float | None = None) -> Proc:
        """Run ``mtag ARGS`` to its end (or ``timeout_s``, then kill its session); with
        ``hook``, run its action in a thread once its moment comes (see :class:`Hook`)."""
        self.count += 1
        log = os.path.join(self.logs, f"{self.count:04d}-{tag}")
        argv = [sys.executable, "-m", "flows.cli", *args]
        started = time.perf_counter()
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
            proc = subprocess.Popen(argv, cwd=benchenv.REPO, env=env or self.env, stdout=out,
                                    stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            self.live.add(proc.pid)
            self.procs[proc.pid] = proc
            thread = None
            if hook:
                thread = threading.Thread(target=hook.run, args=(proc, log + ".out"),
                                          daemon=True)
                thread.start()
            timed_out = False
            try:
                proc.wait(timeout=timeout_s or self.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                self.survivors += kill_session(proc.pid)[1]
                proc.kill()
                proc.wait()
            wall = time.perf_counter() - started
            if thread:
                thread.join()
            # an exit of its own (SIGTERM's included: it cleans up) should leave nothing
            # behind; after a kill, clean up at once
            killed = timed_out or (proc.returncode or 0) < 0
            leftovers, survivors = kill_session(proc.pid, grace_s=0.0 if killed else 3.0)
            self.survivors += survivors
            if not killed:
                self.leftover_normal += leftovers
            self.live.discard(proc.pid)
        with open(log + ".out") as fh:
            stdout = fh.read()
        with open(log + ".err") as fh:
            stderr = fh.read()
        return Proc(argv, proc.returncode, wall, stdout, stderr, log, timed_out, leftovers,
                    hook.signalled if hook else None)

    def kill_all(self) -> int:
        """Kill what is left of every session started; return how many processes of them
        are still alive afterwards (0 unless a kill failed)."""
        for sid in list(self.live):
            leader = self.procs.pop(sid, None)
            if leader is not None and leader.poll() is None:
                leader.kill()
                leader.wait()
            self.survivors += kill_session(sid)[1]
            self.live.discard(sid)
        return self.survivors


def start_prefect_server(runner: Runner, home: str, timeout_s: float = 240.0
                         ) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` in its own session (as ``mtag stack`` does); return it
    and its API URL once ``/health`` answers."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in runner.env.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true"}
    log = open(os.path.join(runner.logs, "prefect-server.log"), "w")
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    runner.live.add(proc.pid)
    runner.procs[proc.pid] = proc
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}; see {log.name}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        time.sleep(1.0)
    raise RuntimeError(f"prefect server did not answer within {timeout_s:.0f} s; see "
                       f"{log.name}")


# ----------------------------------------------------------------------------------------
# the checks
#: one ``mtag query`` for a check: the tracks, the segment counts per track, the sources view
CHECK_SQL = """
SELECT 'track' AS kind, track_id, content_hash AS hash, path AS uri, status,
       CAST(retry AS VARCHAR) AS retry, n_segments AS n, NULL::BIGINT AS m, error
FROM tracks
UNION ALL
SELECT 'segments', track_id, NULL, NULL, NULL, NULL, count(*), count(DISTINCT segment), NULL
FROM segments GROUP BY track_id
UNION ALL
SELECT 'source', track_id, content_hash, uri, status, NULL, size_bytes, NULL, NULL
FROM sources
"""


@dataclass
class Check:
    """What one check after a clean run found."""

    run: int
    verify_rc: int | None = None
    verify_out: str = ""
    tracks_rows: int = 0
    segments_rows: int = 0
    files: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)
    doubled: list[dict[str, Any]] = field(default_factory=list)
    sources_wrong: list[dict[str, Any]] = field(default_factory=list)
    wrong_status: list[dict[str, Any]] = field(default_factory=list)
    query_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verify_rc == 0 and not (self.lost or self.doubled or self.sources_wrong
                                            or self.wrong_status or self.query_errors)

    def summary(self) -> dict[str, Any]:
        return {"run": self.run, "ok": self.ok, "verify_rc": self.verify_rc,
                "files": self.files, "tracks_rows": self.tracks_rows,
                "segments_rows": self.segments_rows, "lost": len(self.lost),
                "doubled": len(self.doubled), "sources_wrong": len(self.sources_wrong),
                "wrong_status": len(self.wrong_status), "query_errors": self.query_errors}

    def details(self) -> dict[str, Any]:
        return {**self.summary(), "verify_out": self.verify_out[-4000:],
                "lost": self.lost, "doubled": self.doubled,
                "sources_wrong": self.sources_wrong, "wrong_status": self.wrong_status}


def query(runner: Runner, store: str, sql: str, tag: str) -> tuple[list[dict[str, Any]] | None,
                                                                    str]:
    p = runner.mtag(["query", "--store", store, "--format", "json", sql], tag,
                    timeout_s=120)
    if p.rc != 0:
        return None, f"mtag query exited {p.rc}: {p.stderr[-1000:]}"
    try:
        return json.loads(p.stdout), ""
    except ValueError as exc:
        return None, f"mtag query: output is not JSON ({exc}): {p.stdout[:500]}"


def check(runner: Runner, cat: Catalogue, store: str, run: int, ever: set[str]) -> Check:
    """Verify the store and account for every file of the catalogue (module docstring)."""
    c = Check(run)
    v = runner.mtag(["verify", "--store", store], f"r{run:02d}-verify", timeout_s=300)
    c.verify_rc, c.verify_out = v.rc, (v.stdout + v.stderr).strip()
    rows, err = query(runner, store, CHECK_SQL, f"r{run:02d}-query")
    if rows is None:
        c.query_errors.append(err)
        return c
    tracks = [{"track_id": r["track_id"], "content_hash": r["hash"], "path": r["uri"],
               "status": r["status"], "retry": r["retry"] == "true",
               "n_segments": r["n"], "error": r["error"]}
              for r in rows if r["kind"] == "track"]
    segments = [{"track_id": r["track_id"], "n_rows": r["n"], "n_distinct": r["m"]}
                for r in rows if r["kind"] == "segments"]
    sources = [{"uri": r["uri"], "status": r["status"], "track_id": r["track_id"],
                "size_bytes": r["n"]} for r in rows if r["kind"] == "source"]
    current = cat.current()
    c.files = len(current)
    c.tracks_rows = len(tracks)
    c.segments_rows = sum(int(s["n_rows"]) for s in segments)
    expected = set(current.values())
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for row in tracks:
        rows_of.setdefault(row["track_id"], []).append(row)
    by_tid: dict[str, list[str]] = {}
    for path, tid in current.items():
        by_tid.setdefault(tid, []).append(path)

    # every current file's bytes once; nothing else
    for path, tid in current.items():
        if tid not in rows_of:
            c.lost.append({"problem": "file's track missing from tracks", "path": path,
                           "track_id": tid, "kind": cat.kind_of.get(tid)})
    for tid, rows in rows_of.items():
        if tid not in expected:
            c.doubled.append({"problem": "stale track: no current file has its bytes",
                              "track_id": tid, "rows": rows})
        elif len(rows) > 1:
            c.doubled.append({"problem": f"track in tracks {len(rows)} times",
                              "track_id": tid, "paths": by_tid[tid], "rows": rows})
    # segments
    segs = {s["track_id"]: s for s in segments}
    for tid, s in segs.items():
        if tid not in rows_of:
            c.doubled.append({"problem": "segments without a track", "track_id": tid,
                              "segment_rows": s["n_rows"]})
        if int(s["n_rows"]) != int(s["n_distinct"]):
            c.doubled.append({"problem": "duplicated (track_id, segment)", "track_id": tid,
                              "segment_rows": s["n_rows"], "distinct": s["n_distinct"]})
    for tid, rows in rows_of.items():
        for row in rows:
            want = int(row["n_segments"] or 0) if row["status"] == "ok" else 0
            got = int(segs[tid]["n_distinct"]) if tid in segs else 0
            if row["status"] == "ok" and got < want:
                c.lost.append({"problem": f"ok track has {got} of {want} segments",
                               "track_id": tid, "paths": by_tid.get(tid), "row": row})
            elif row["status"] == "ok" and got > want:
                c.doubled.append({"problem": f"ok track has {got} segments, n_segments {want}",
                                  "track_id": tid, "paths": by_tid.get(tid), "row": row})
            elif row["status"] != "ok" and got:
                c.doubled.append({"problem": f"{row['status']} track has {got} segments",
                                  "track_id": tid, "row": row})
    # statuses
    allowed = {"audio": {"ok"}, "nonaudio": {"unsupported"}, "undecodable": {"failed"},
               "truncated": {"ok", "failed"}}
    for tid, rows in rows_of.items():
        kind = cat.kind_of.get(tid)
        for row in rows:
            if row.get("content_hash") and row["content_hash"][:16] != tid:
                c.wrong_status.append({"problem": "content_hash does not start with track_id",
                                       "row": row})
            if tid not in expected:
                continue
            if row.get("retry"):
                c.wrong_status.append({"problem": "retry row left after a clean run",
                                       "paths": by_tid[tid], "kind": kind, "row": row})
            elif kind in allowed and row["status"] not in allowed[kind]:
                c.wrong_status.append({"problem": f"{kind} file has status {row['status']}",
                                       "paths": by_tid[tid], "row": row})
    # sources
    src = {s["uri"]: s for s in sources}
    for path, tid in current.items():
        s = src.get(path)
        if s is None or s["status"] != "present" or s["track_id"] != tid:
            c.sources_wrong.append({"problem": "current file not present with its track id",
                                    "path": path, "track_id": tid, "sources": s})
    for path in sorted(ever - set(current)):
        s = src.get(path)
        if s is None or s["status"] != "gone":
            c.sources_wrong.append({"problem": "deleted file not gone", "path": path,
                                    "sources": s})
    for uri, s in src.items():
        if s["status"] == "present" and uri not in current and uri not in ever:
            c.sources_wrong.append({"problem": "present record of a file never listed",
                                    "path": uri, "sources": s})
    return c


def problem_keys(c: Check) -> dict[str, set[str]]:
    """Identities of a check's problems, so a problem found again later counts once."""
    def key(p: dict[str, Any]) -> str:
        return f"{p['problem']}|{p.get('track_id') or ''}|{p.get('path') or ''}"

    return {"lost": {key(p) for p in c.lost}, "doubled": {key(p) for p in c.doubled},
            "sources_wrong": {key(p) for p in c.sources_wrong},
            "wrong_status": {key(p) for p in c.wrong_status}}


# ----------------------------------------------------------------------------------------
# the soak
def ingest_args(cat: Catalogue, store: str, a: argparse.Namespace, *,
                shard_minutes: float | None = None) -> list[str]:
    return ["ingest", cat.root, "--store", store, "--workers", str(a.workers), "--no-progress",
            "--shard-minutes", str(shard_minutes or a.shard_minutes)]


def run_soak(a: argparse.Namespace, work: str) -> tuple[dict[str, Any], bool]:
    import numpy as np

    rng = np.random.default_rng(a.seed)
    cat = Catalogue(os.path.join(work, "catalogue"), rng)
    store = os.path.join(work, "store")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MTAG_FAILPOINTS", "MTAG_FAILPOINT_ONCE")}
    env["PREFECT_HOME"] = a.prefect_home
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # the hooks watch the output as it is written
    runner = Runner(os.path.join(work, "logs"), env, a.run_timeout)
    prefect_url = None
    kinds = a.faults.split(",") if a.faults else fault_kinds()
    faults: Counter[str] = Counter()
    fired: Counter[str] = Counter()
    nonzero: Counter[str] = Counter()
    runs: list[dict[str, Any]] = []
    checks: list[Check] = []
    distinct: dict[str, set[str]] = {k: set() for k in ("lost", "doubled", "sources_wrong",
                                                        "wrong_status")}
    first_fail: dict[str, Any] | None = None
    internal_error: str | None = None
    hung: list[str] = []
    clean_nonzero: list[dict[str, Any]] = []
    ever: set[str] = set()
    clean_walls: list[float] = []
    feature_sets: set[str] = set()  # a change of feature code in the tree makes a new one
    flow_walls: list[float] = []  # the flows' own wall times (their summary lines)
    started = time.perf_counter()

    try:
        if a.prefect == "server":
            t0 = time.perf_counter()
            _, prefect_url = start_prefect_server(runner, a.prefect_home)
            env["PREFECT_API_URL"] = prefect_url
            print(f"Prefect server {prefect_url} (up in {time.perf_counter() - t0:.0f} s)")
        cat.populate(a.files)
        print(f"work folder {work}\ncatalogue {cat.root}: {a.files} files; store {store}")
        print(f"{'run':>3} {'fault':16s} {'fired':5s} {'rc':>5s} {'clean':>5s} {'ingest s':>8s} "
              f"{'files':>5s} {'tracks':>6s} {'segs':>5s} {'lost':>4s} {'dbl':>4s} "
              f"{'src':>4s} {'stat':>4s} {'vfy':>3s}  changes")
        for run in range(a.runs + 1):  # run 0: the first full ingest, no changes, no fault
            rec: dict[str, Any] = {"run": run}
            changes = cat.increment() if run else []
            rec["changes"] = changes
            fault = None
            if run and rng.random() < a.fault_rate:
                fault = kinds[int(rng.integers(len(kinds)))]
            if fault == "worker.track":  # more new tracks than 2 shards per worker slot
                for _ in range(2 * a.workers + 2):
                    cat.add()
                    changes.append("add")
            rec["fault"] = fault
            flow_est = float(np.median(flow_walls)) if flow_walls else 20.0
            fault_rc = None
            if fault:
                faults[fault] += 1
                fenv, hook = dict(env), None
                once = os.path.join(work, "failpoints", f"run{run:03d}")
                if fault in SIGNAL_KINDS or fault == MIDRUN_KIND:
                    # mostly while the flow works (after the Dask line), now and then while
                    # the command starts up
                    if rng.random() < 0.2:
                        hook = Hook(float(rng.uniform(0.5, 15.0)))
                    else:
                        hook = Hook(float(rng.uniform(0.0, max(2.0, flow_est * 1.2))),
                                    marker=DASK_LINE)
                    if fault == MIDRUN_KIND:
                        hook.change = cat.change_midrun
                    else:
                        hook.signal = fault
                    rec["hook"] = {"delay_s": round(hook.delay_s, 2),
                                   "after": "dask line" if hook.marker else "start"}
                else:
                    os.makedirs(os.path.dirname(once), exist_ok=True)
                    fenv["MTAG_FAILPOINTS"] = fault
                    fenv["MTAG_FAILPOINT_ONCE"] = once
                # worker.track fires after a shard's first track: give shards several tracks
                minutes = WORKER_SHARD_MINUTES if fault == "worker.track" else None
                p = runner.mtag(ingest_args(cat, store, a, shard_minutes=minutes),
                                f"r{run:02d}-fault-{fault}",
                                env=fenv, hook=hook)
                if hook:
                    rec["hook"].update(during=hook.during, acted_at_s=hook.acted_at_s,
                                       signalled=hook.signalled, change=hook.change_kind)
                    if hook.change_kind:
                        changes.append(hook.change_kind)
                    did = hook.signalled is not None if hook.signal else hook.during
                else:
                    did = os.path.exists(f"{once}.{fault}")
                fired[fault] += did
                fault_rc = p.rc
                rec.update(fault_fired=did, fault_rc=p.rc, fault_wall_s=round(p.wall_s, 2),
                           fault_log=p.log, fault_leftovers=p.leftovers)
                if p.rc != 0:
                    nonzero[fault] += 1
                if p.timed_out:
                    hung.append(p.log)
            clean = runner.mtag(ingest_args(cat, store, a), f"r{run:02d}-ingest")
            if clean.rc != 0:
                nonzero["clean"] += 1
                clean_nonzero.append({"run": run, "rc": clean.rc, "log": clean.log,
                                      "tail": (clean.stdout + clean.stderr)[-3000:]})
            if clean.timed_out:
                hung.append(clean.log)
            if not fault:
                clean_walls.append(clean.wall_s)
            for out in (clean.stdout, *([p.stdout] if fault else [])):
                feature_sets.update(re.findall(r"feature set (fs-[0-9a-f]+)", out))
            m = re.search(r"wall ([0-9.]+) s", clean.stdout)
            if m:
                flow_walls.append(float(m.group(1)))
            rec.update(clean_rc=clean.rc, clean_wall_s=round(clean.wall_s, 2),
                       clean_log=clean.log, clean_leftovers=clean.leftovers,
                       clean_summary=clean.stdout.strip()[-1500:])
            c = check(runner, cat, store, run, ever)
            ever |= set(cat.files())
            checks.append(c)
            rec["check"] = c.summary()
            for k, keys in problem_keys(c).items():
                distinct[k] |= keys
            if not c.ok and first_fail is None:
                first_fail = {"run": run, "fault": fault, "changes": changes,
                              "clean_log": clean.log, "store": store,
                              "store_copy": os.path.join(work, "first-failure-store"),
                              **c.details()}
                shutil.copytree(store, first_fail["store_copy"], dirs_exist_ok=True)
            runs.append(rec)
            did_s = ("yes" if rec["fault_fired"] else "no") if fault else ""
            print(f"{run:3d} {fault or '-':16s} {did_s:5s} "
                  f"{'' if fault_rc is None else fault_rc:>5} {clean.rc:>5} "
                  f"{clean.wall_s:8.1f} {c.files:5d} {c.tracks_rows:6d} {c.segments_rows:5d} "
                  f"{len(c.lost):4d} {len(c.doubled):4d} {len(c.sources_wrong):4d} "
                  f"{len(c.wrong_status):4d} {c.verify_rc!s:>3}  {' '.join(changes)}",
                  flush=True)
            if a.stop_on_failure and not c.ok:
                break
    except Exception:  # the soak's own failure: report what it has, with the traceback
        import traceback

        internal_error = traceback.format_exc()
        print(internal_error, file=sys.stderr)
    finally:
        survivors = runner.kill_all()

    verify_failures = sum(c.verify_rc != 0 for c in checks)
    totals = {k: len(v) for k, v in distinct.items()}
    result = {
        "bench": "soak", "started_wall": None,
        "config": {k: v for k, v in vars(a).items()},
        "work": work, "store": store,
        "runs": len(runs) - 1 if runs else 0,
        "faults": dict(faults), "faults_fired": dict(fired),
        "nonzero_exits": dict(nonzero), "nonzero_exit_runs": sum(nonzero.values()),
        "changes": dict(cat.changes),
        "checks": len(checks),
        "rows_checked": sum(c.tracks_rows + c.segments_rows for c in checks),
        "tracks_rows_checked": sum(c.tracks_rows for c in checks),
        "segments_rows_checked": sum(c.segments_rows for c in checks),
        "verify_failures": verify_failures,
        "lost": totals["lost"], "doubled": totals["doubled"],
        "sources_wrong": totals["sources_wrong"], "wrong_status": totals["wrong_status"],
        "query_errors": sum(len(c.query_errors) for c in checks),
        "hung_runs": hung, "clean_nonzero": clean_nonzero,
        "leftover_processes_after_normal_exit": runner.leftover_normal,
        "processes_alive_at_end": survivors,
        "final_files": checks[-1].files if checks else 0,
        "feature_sets": sorted(feature_sets),
        "wall_s": round(time.perf_counter() - started, 1),
        "median_clean_ingest_s": float(np.median(clean_walls)) if clean_walls else None,
        "first_failure": first_fail,
        "internal_error": internal_error,
        "per_run": runs,
    }
    failed = bool(first_fail or hung or clean_nonzero or survivors or internal_error)
    return result, failed


def print_summary(r: dict[str, Any]) -> None:
    def line(label: str, value: Any) -> None:
        print(f"  {label:34s} {value}")

    print("\nsoak summary")
    line("runs (after the first ingest)", r["runs"])
    line("faults injected", sum(r["faults"].values()))
    for k in sorted(r["faults"]):
        line(f"  {k}", f"{r['faults'][k]} (fired {r['faults_fired'].get(k, 0)})")
    line("runs exited non-zero", r["nonzero_exit_runs"])
    for k in sorted(r["nonzero_exits"]):
        line(f"  {k}", r["nonzero_exits"][k])
    line("catalogue changes", sum(r["changes"].values()))
    for k in sorted(r["changes"]):
        line(f"  {k}", r["changes"][k])
    line("checks", r["checks"])
    line("rows checked (tracks + segments)",
         f"{r['rows_checked']} ({r['tracks_rows_checked']} + {r['segments_rows_checked']})")
    line("files in the catalogue at the end", r["final_files"])
    line("feature sets written", " ".join(r["feature_sets"]))
    line("verify failures", r["verify_failures"])
    line("lost", r["lost"])
    line("doubled", r["doubled"])
    line("sources wrong", r["sources_wrong"])
    line("wrong status", r["wrong_status"])
    line("query errors", r["query_errors"])
    line("hung runs (killed at the timeout)", len(r["hung_runs"]))
    line("clean runs exited non-zero", len(r["clean_nonzero"]))
    line("leftover processes (normal exits)", r["leftover_processes_after_normal_exit"])
    line("processes alive at the end", r["processes_alive_at_end"])
    line("median clean ingest (s)", r["median_clean_ingest_s"])
    line("wall time (s)", r["wall_s"])


def print_failure(r: dict[str, Any]) -> None:
    f = r["first_failure"]
    if f:
        print(f"\nFIRST FAILING CHECK: run {f['run']} (fault {f['fault']}; changes "
              f"{' '.join(f['changes']) or '-'})")
        print(f"  store {f['store']} (as it was then: {f['store_copy']}); "
              f"clean run log {f['clean_log']}.out/.err")
        print(f"  verify exit {f['verify_rc']}: {f['verify_out'][-1500:]}")
        for k in ("lost", "doubled", "sources_wrong", "wrong_status"):
            for p in f[k][:10]:
                print(f"  {k}: {json.dumps(p, default=str)[:1200]}")
            if len(f[k]) > 10:
                print(f"  {k}: ... {len(f[k]) - 10} more (in the JSON)")
        for e in f["query_errors"]:
            print(f"  query error: {e}")
    if r["internal_error"]:
        print(f"\nTHE SOAK ITSELF FAILED:\n{r['internal_error']}")
    for h in r["hung_runs"]:
        print(f"\nHUNG RUN (killed after the timeout): {h}.out/.err")
    for c in r["clean_nonzero"][:3]:
        print(f"\nCLEAN RUN EXITED {c['rc']} (run {c['run']}): {c['log']}.out/.err\n"
              f"{c['tail'][-1500:]}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=40, help="files in the first catalogue")
    p.add_argument("--runs", type=int, default=30, help="nightly increments after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault-rate", type=float, default=0.5)
    p.add_argument("--faults", help="comma-separated fault kinds to draw from (default: all "
                   f"of {','.join(fault_kinds())})")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-minutes", type=float, default=0.05)
    p.add_argument("--run-timeout", type=float, default=300.0,
                   help="seconds before an ingest counts as hung and is killed")
    p.add_argument("--workdir", help="folder for the catalogue, store and logs (default: a "
                   "temporary folder, removed after a clean soak unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument("--prefect", choices=("server", "ephemeral"), default="server",
                   help="server: one `prefect server start` for the whole soak, its URL in "
                   "PREFECT_API_URL (as under `mtag stack`); ephemeral: each ingest starts "
                   "its own temporary API, as a bare `mtag ingest` does (~40 s more a run "
                   "on a loaded 2-core machine)")
    p.add_argument("--prefect-home", default=os.environ.get(
        "PREFECT_HOME", os.path.join(benchenv.RESULTS, "prefect-home-soak")))
    p.add_argument("--out", help="results JSON (default bench/results/soak-<time>.json)")
    a = p.parse_args(argv)
    unknown = set(a.faults.split(",")) - set(fault_kinds()) if a.faults else set()
    if unknown:
        p.error(f"unknown fault kinds {sorted(unknown)}; known: {fault_kinds()}")
    os.makedirs(a.prefect_home, exist_ok=True)

    def stop(signum: int, frame: object) -> None:  # SIGTERM/SIGHUP: clean up like Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    machine = benchenv.environment(("mtag", "numpy", "soundfile", "deltalake", "duckdb",
                                    "dask", "prefect"))
    print(benchenv.git_line(machine["git"]))
    started = benchenv.now()
    if a.workdir:
        work = os.path.abspath(a.workdir)
        if os.path.exists(os.path.join(work, "store")):
            p.error(f"{work} already holds a store: give a new --workdir")
        os.makedirs(work, exist_ok=True)
    else:
        work = tempfile.mkdtemp(prefix="mtag-soak-")
    try:
        result, failed = run_soak(a, work)
    except KeyboardInterrupt:
        print(f"\ninterrupted; work folder kept: {work}")
        return 130
    result["started_wall"] = started
    result["finished"] = benchenv.now()
    machine["loadavg_end"] = os.getloadavg()
    result["machine"] = machine
    print_summary(result)
    path = benchenv.write_json(result, "soak", a.out)
    print(f"\nresults: {path}")
    if failed:
        print_failure(result)
        print(f"\nwork folder kept: {work}")
        return 1
    if not (a.workdir or a.keep):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
