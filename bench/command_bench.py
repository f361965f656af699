#!/usr/bin/env python
"""The whole ``mtag ingest`` command against per-file baselines, timed as a user times it.

In one run, alternating, ``--repeats`` times (after one warm-up of each), on the same files:

(a) ``mtag -v ingest SOURCE --store <fresh dir> --no-progress`` as a subprocess: wall time from
    exec to exit, user + system CPU of the whole process tree (``os.wait4``: the command and
    every descendant it reaped: Dask workers, the temporary Prefect API), the flow's own wall
    time as its summary prints it ("wall X s"), and the **time to first extraction**: the
    arrival (``time.perf_counter``, line by line on the merged stdout/stderr pipe) of the
    first line matching one of ``--first-work-regex`` (record of which matched), plus a few
    fixed start-up milestones (cluster up, Prefect API, flow start, first task finished...);
(b) the plain per-file librosa loop and (c) the floor (decode + soxr + one STFT + mel), each as
    W whole processes at once over the same files dealt round-robin W ways (this script's
    child mode, ``--baseline KEY --files-from LIST --part k/W``, which runs
    ``ingest_bench.plain_loop_file`` / ``floor_file`` under one BLAS thread), timed from outside
    from the first exec to the last exit, CPU from ``os.wait4`` of each child.

Ratios are taken pair by pair within each repeat: ``floor_wall / mtag_wall`` is "mtag at N x
the floor" (1.0 = as fast as the floor). × realtime per core = audio s / wall s / W, with the
audio seconds the floor decoded (header durations when the baselines are skipped).

The warm-up (``--warmup light``, default) runs each of the three once on the first W files, after
all source files have been read once into the page cache: it pays .pyc compilation, numba's
cache, the Prefect database and cold shared libraries, in far less time than a full pass;
``--warmup full`` warms up on every file, ``none`` skips it.

Prints a table and writes ``bench/results/command-[LABEL-]<source>-<time>.json`` (after every
run, so a killed run keeps what it measured), the table as ``.txt`` and every mtag run's
time-stamped output as ``.log`` next to it.

Usage::

    .venv/bin/python bench/command_bench.py --source /usr/share/games/singularity/music
    .venv/bin/python bench/command_bench.py --source ../shared/datasets/philharmonia-dev
    .venv/bin/python bench/command_bench.py --source DIR --limit 4 --repeats 1   # quick check
"""

from __future__ import annotations

import os
import sys

# the environment as given, before ingest_bench's import applies the CLI's quiet defaults:
# the mtag subprocess gets this one (its -v then really brings the logs back)
ORIGINAL_ENV = dict(os.environ)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import benchenv  # noqa: E402  (puts the repository on sys.path; imports nothing heavy)

DEFAULT_FIRST_WORK = (r"Task run 'extract", r"head start")
"""Markers of the first feature extraction, earliest line wins. With the code of 2026-12-01
Prefect logs nothing when a task run *starts* on a worker (at INFO), so ``Task run 'extract``
first matches ``Task run 'extract-...' - Finished in state Completed()``: the end of the first
extract task, an upper bound on the start."""

MILESTONES: tuple[tuple[str, str], ...] = (
    ("scheduler", r"distributed\.scheduler - State start"),
    ("workers registered", r"Register worker addr"),
    ("dask ready", r"^Dask: "),
    ("prefect api start", r"Starting temporary server|starting a temporary Prefect API"),
    ("flow begins", r"Beginning flow run"),
    ("files listed", r"files listed, \d+ unchanged"),
    ("task runner", r"prefect\.task_runner\.dask - Connecting"),
    ("first task done", r"Task run '.*' - Finished in state"),
    ("first extract done", r"Task run 'extract.*' - Finished in state"),
    ("summary", r"Ingested into feature set"),
    ("prefect api stop", r"Stopping temporary server"),
)
"""Informational time stamps of an mtag run (first matching line of each)."""

FLOW_WALL = re.compile(r"; wall ([0-9.]+) s")
WORKERS_RE = re.compile(r"per worker, (\d+) workers?\)")
AUDIO_H = re.compile(r"([0-9.]+) h of audio")
KINDS = ("mtag", "plain_loop", "floor")
LABELS = {"mtag": "(a) mtag ingest", "plain_loop": "(b) plain loop", "floor": "(c) floor"}


# ----------------------------------------------------------------------------------------
# child mode: one of the W baseline processes
def child_main(key: str, files_from: str, part: str) -> int:
    t_start = time.perf_counter()
    import ingest_bench as ib  # applies the CLI's environment defaults (benchenv)

    k, w = (int(x) for x in part.split("/"))
    with open(files_from) as fh:
        files = [line.rstrip("\n") for line in fh if line.strip()]
    mine = files[k::w]  # dealt round-robin, as ingest_bench.time_parallel does
    fn = ib.METHODS[key]
    t_setup = time.perf_counter()
    # the floor's mel basis as ingest_bench.make_baselines builds it, without the project's
    # SpectralExtractor that make_baselines also builds (seconds of numba set-up that neither
    # baseline uses: a whole baseline process should not pay for it)
    import librosa
    import numpy as np

    b = ib.Baselines(mel_basis=librosa.filters.mel(sr=ib.SR, n_fft=ib.N_FFT, n_mels=ib.N_MELS,
                                                   dtype=np.float32),
                     config=None, extractor=None)
    t_work = time.perf_counter()
    audio = 0.0
    with ib.one_thread():
        for path in mine:
            audio += fn(path, b)
    t_end = time.perf_counter()
    print("RESULT " + json.dumps({
        "key": key, "part": part, "files": len(mine), "audio_s": audio,
        "import_s": t_setup - t_start, "setup_s": t_work - t_setup, "work_s": t_end - t_work}),
        flush=True)
    return 0


# ----------------------------------------------------------------------------------------
# timing processes from outside
def _cpu(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def _children_cpu() -> float:
    return _cpu(resource.getrusage(resource.RUSAGE_CHILDREN))


def become_subreaper() -> bool:
    """Adopt this script's orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    ``mtag`` starts its Dask workers from multiprocessing's fork server, which nobody reaps:
    it outlives the command by a moment and would be re-parented to init, taking the workers'
    CPU seconds with it. Adopted, it is reaped here and its CPU counted (see
    :func:`reap_orphans`).
    """
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(group: int, t0: float, wait_s: float = 60.0) -> dict[str, Any]:
    """Reap every adopted descendant of the command that just exited (its process group is
    ``group``); SIGKILL what is left after ``wait_s``. Returns their count and CPU seconds and
    when the last one exited (s from ``t0``)."""
    n, cpu, last = 0, 0.0, None
    deadline = time.perf_counter() + wait_s
    while True:
        try:
            pid, _status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if time.perf_counter() > deadline:
                _kill_group(group)
                deadline = time.perf_counter() + 5.0
            time.sleep(0.01)
            continue
        n += 1
        cpu += _cpu(ru)
        last = time.perf_counter() - t0
    return {"n": n, "cpu_s": cpu, "last_exit_s": last}


def _kill_group(pid: int) -> None:
    """SIGKILL the session this script started for ``pid`` (its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_mtag(cmd_base: Sequence[str], source: str, env: dict[str, str],
             patterns: Sequence[str], timeout: float, tmp: str | None, log: Any,
             extra: Sequence[str] = (), cwd: str = benchenv.REPO) -> dict[str, Any]:
    """One whole ``mtag ingest`` into a fresh store: wall, CPU, markers, flow wall."""
    parent = tempfile.mkdtemp(prefix="mtag-cmdbench-", dir=tmp)
    store = os.path.join(parent, "store")
    cmd = [*cmd_base, "-v", "ingest", source, "--store", store, "--no-progress", *extra]
    lines: list[tuple[float, str]] = []
    load0 = os.getloadavg()
    kids0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None

    def read() -> None:
        for raw in iter(proc.stdout.readline, b""):
            lines.append((time.perf_counter() - t0, raw.decode("utf-8", "replace").rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timer = threading.Timer(timeout, _kill_group, args=(proc.pid,))
    timer.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    orphans = reap_orphans(proc.pid, t0)
    reader.join(30.0)  # a descendant that outlived the command may still hold the pipe
    leftover = reader.is_alive()
    if leftover:
        _kill_group(proc.pid)
        reader.join(5.0)
    proc.stdout.close()
    kids_cpu = _children_cpu() - kids0
    from ingest_bench import dir_size_mb

    store_mb = dir_size_mb(store)
    shutil.rmtree(parent, ignore_errors=True)

    text = [t for _, t in lines]
    first: dict[str, Any] = {}
    for pat in patterns:
        rx = re.compile(pat)
        hit = next(((s, t) for s, t in lines if rx.search(t)), None)
        first[pat] = None if hit is None else {"s": hit[0], "line": hit[1][:300]}
    hits = [(v["s"], p) for p, v in first.items() if v is not None]
    first_s, matched = min(hits) if hits else (None, None)
    milestones = {}
    for name, pat in MILESTONES:
        rx = re.compile(pat)
        milestones[name] = next((s for s, t in lines if rx.search(t)), None)
    flow_walls = [float(m.group(1)) for t in text if (m := FLOW_WALL.search(t))]
    workers = [int(m.group(1)) for t in text if (m := WORKERS_RE.search(t))]
    audio_h = [float(m.group(1)) for t in text if (m := AUDIO_H.search(t))]
    log.write(f"\n===== {benchenv.now()} rc={proc.returncode} wall={wall:.2f} s: "
              f"{' '.join(cmd)}\n")
    log.writelines(f"{s:9.3f} {t}\n" for s, t in lines)
    log.flush()
    return {
        "cmd": cmd, "rc": proc.returncode, "wall_s": wall,
        "cpu_s": _cpu(ru) + orphans["cpu_s"], "cpu_s_command": _cpu(ru),
        "cpu_s_rusage_children": kids_cpu, "orphans": orphans,
        "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024,
        "first_work_s": first_s, "first_work_pattern": matched, "first_work": first,
        "milestones_s": milestones,
        "flow_wall_s": flow_walls[-1] if flow_walls else None,
        "workers_reported": workers[-1] if workers else None,
        "audio_h_reported": audio_h[-1] if audio_h else None,
        "store_mb": store_mb, "lines": len(lines), "pipe_held_after_exit": leftover,
        "tail": text[-40:] if proc.returncode != 0 else None,
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }


def run_baseline(key: str, list_path: str, workers: int, env: dict[str, str],
                 timeout: float) -> dict[str, Any]:
    """W child processes of ``key`` at once; wall from the first exec to the last exit."""
    outs = [tempfile.TemporaryFile() for _ in range(workers)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--baseline", key,
                               "--files-from", list_path, "--part", f"{k}/{workers}"],
                              cwd=benchenv.REPO, env=env, stdin=subprocess.DEVNULL,
                              stdout=outs[k], stderr=subprocess.STDOUT,
                              start_new_session=True)
              for k in range(workers)]
    pending = {p.pid: k for k, p in enumerate(procs)}
    exits: list[float] = [0.0] * workers
    cpu: list[float] = [0.0] * workers
    rcs: list[int] = [0] * workers
    while pending:
        if time.perf_counter() - t0 > timeout:
            for pid in pending:
                _kill_group(pid)
        for pid in list(pending):
            got, status, ru = os.wait4(pid, os.WNOHANG)
            if got == 0:
                continue
            k = pending.pop(pid)
            exits[k] = time.perf_counter() - t0
            cpu[k] = _cpu(ru)
            rcs[k] = procs[k].returncode = os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    parts, tails = [], []
    for k, fh in enumerate(outs):
        fh.seek(0)
        text = fh.read().decode("utf-8", "replace")
        fh.close()
        res = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
        parts.append(res[-1] if res else None)
        if rcs[k] != 0 or not res:
            tails.append(text[-3000:])
    ok = all(p is not None for p in parts) and not any(rcs)
    return {
        "rc": max(rcs, key=abs), "ok": ok, "wall_s": max(exits), "exit_s": exits,
        "cpu_s": sum(cpu), "cpu_s_per_process": cpu, "parts": parts, "tails": tails or None,
        "audio_s": sum(p["audio_s"] for p in parts if p) if ok else None,
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }


def code_hash(root: str) -> str:
    """A short hash of the pipeline's Python files under ``root`` (which code mtag ran)."""
    import hashlib

    h = hashlib.blake2b(digest_size=6)
    for part in benchenv.PIPELINE_CODE:
        for dirpath, dirs, names in os.walk(os.path.join(root, part)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()


def warm_page_cache(files: Sequence[str]) -> float:
    """Read every file once (so that no counted run pays the first disk read)."""
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------
# the table
def _med(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Medians, ranges, per-core rates and the pairwise ratios of the counted runs."""
    runs = res["runs"]
    w = res["workers"]
    audio = res["audio_s"]
    out: dict[str, Any] = {}
    for kind in KINDS:
        rs = [r[kind] for r in runs if kind in r]
        walls = [r["wall_s"] for r in rs]
        if not walls:
            continue
        med = statistics.median(walls)
        out[kind] = {"n": len(walls), "wall_median_s": med, "wall_min_s": min(walls),
                     "wall_max_s": max(walls), "cpu_median_s": _med([r["cpu_s"] for r in rs]),
                     "per_core_x": audio / med / w if audio and med else None,
                     "failed_runs": sum(1 for r in rs if r["rc"] != 0)}
    m = [r["mtag"] for r in runs if "mtag" in r]
    if m:
        out["mtag"]["first_work_median_s"] = _med([r["first_work_s"] for r in m])
        out["mtag"]["first_work_patterns"] = sorted({r["first_work_pattern"] or "none"
                                                     for r in m})
        out["mtag"]["flow_wall_median_s"] = _med([r["flow_wall_s"] for r in m])
        out["mtag"]["outside_flow_median_s"] = _med(
            [r["wall_s"] - r["flow_wall_s"] for r in m if r["flow_wall_s"] is not None])
        out["mtag"]["milestones_median_s"] = {
            name: _med([r["milestones_s"].get(name) for r in m]) for name, _ in MILESTONES}
    for base in ("floor", "plain_loop"):
        pairs = [r[base]["wall_s"] / r["mtag"]["wall_s"] for r in runs
                 if base in r and "mtag" in r and r[base]["ok"] and r["mtag"]["rc"] == 0]
        if pairs:
            out[f"{base}_over_mtag"] = {"per_repeat": pairs, "median": statistics.median(pairs),
                                        "min": min(pairs), "max": max(pairs)}
    return out


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    m = res["machine"]
    w = res["workers"]
    lines = [f"== command bench{' (' + res['label'] + ')' if res['label'] else ''}: "
             f"{res['source']}",
             f"   {res['files']} audio files{res['limit_note']}, {res['audio_s'] / 60:.1f} min "
             f"audio ({res['audio_from']}); W={w}; {_done(res)} counted repeats after "
             f"warm-up '{res['warmup']}'; {m['cpu_count']} cores ({m['cpu_model']})",
             f"   {benchenv.git_line(m['git'])}",
             f"   mtag ran the code of {res.get('code_dir', '-')} (flows from "
             f"{res.get('flows_imported_from', '-')}; pipeline .py hash "
             f"{res.get('code_hash', '-')})",
             f"   started {res['started']}, finished {res.get('finished', '-')}; load avg "
             f"(1/5/15 min) at start {_loads(m['loadavg_start'])}, at end "
             f"{_loads(res.get('loadavg_end'))}",
             f"   mtag: {' '.join(res['mtag_cmd'])} -v ingest {res['mtag_source']} --store FRESH "
             f"--no-progress{''.join(' ' + a for a in res['mtag_extra_args'])}",
             "",
             f"  {'':24s}{'wall s med':>11s}{'min':>8s}{'max':>8s}{'x rt/core':>11s}"
             f"{'CPU s med':>11s}{'runs':>6s}"]
    for kind in KINDS:
        if kind not in s:
            continue
        k = s[kind]
        label = LABELS[kind] + ("" if kind == "mtag" else f", {w} procs")
        fail = f"  ({k['failed_runs']} FAILED)" if k["failed_runs"] else ""
        lines.append(f"  {label:24s}{k['wall_median_s']:>11.2f}{k['wall_min_s']:>8.2f}"
                     f"{k['wall_max_s']:>8.2f}{_f(k['per_core_x']):>11s}"
                     f"{_f(k['cpu_median_s']):>11s}{k['n']:>6d}{fail}")
    lines.append("")
    for base, name in (("floor", "floor"), ("plain_loop", "plain loop")):
        r = s.get(f"{base}_over_mtag")
        if r:
            lines.append(f"  mtag at {r['median']:.3f}x the {name} (median of pairs "
                         f"{base}_wall/mtag_wall; per repeat "
                         f"{', '.join(f'{x:.3f}' for x in r['per_repeat'])})")
    if "mtag" in s:
        k = s["mtag"]
        ends = any("Finished in state" in (r["first_work"].get(r["first_work_pattern"]) or {})
                   .get("line", "") for r in (x["mtag"] for x in res["runs"])
                   if r["first_work_pattern"])
        lines.append(f"  time to first extraction (median): {_f(k['first_work_median_s'], '.2f')}"
                     f" s from exec; marker matched: {', '.join(k['first_work_patterns'])}"
                     + ("\n    (on a 'Finished in state' line: the END of the first extract "
                        "task, an upper bound; see 'task runner' below)" if ends else ""))
        lines.append(f"  in-flow wall (summary 'wall X s', median): "
                     f"{_f(k['flow_wall_median_s'], '.2f')} s of "
                     f"{k['wall_median_s']:.2f} s whole command; outside the flow "
                     f"{_f(k['outside_flow_median_s'], '.2f')} s (median of runs)")
        ms = k["milestones_median_s"]
        lines.append("  mtag milestones, s from exec (median): " + "; ".join(
            f"{name} {v:.1f}" for name, v in ms.items() if v is not None))
    lines.append("")
    lines.append("  per repeat (wall s / CPU s / load 1-min before):")
    for i, r in enumerate(res["runs"]):
        cells = []
        for kind in KINDS:
            if kind in r:
                x = r[kind]
                extra = (f", first {_f(x['first_work_s'], '.1f')}, flow "
                         f"{_f(x['flow_wall_s'], '.1f')}" if kind == "mtag" else "")
                bad = "" if x["rc"] == 0 else f" rc={x['rc']}"
                cells.append(f"{kind} {x['wall_s']:.1f}/{x['cpu_s']:.1f}/"
                             f"{x['loadavg_before'][0]:.1f}{extra}{bad}")
        lines.append(f"    {i + 1}: " + "; ".join(cells))
    return "\n".join(lines)


def _done(res: dict[str, Any]) -> str:
    n, want = len(res["runs"]), res["repeats"]
    return str(n) if n == want else f"{n} of {want} (INCOMPLETE)"


def _loads(x: Sequence[float] | None) -> str:
    return "-" if not x else "/".join(f"{v:.2f}" for v in x)


# ----------------------------------------------------------------------------------------
def mtag_command(given: str | None) -> list[str]:
    """The ``mtag`` console script next to this Python (the pyproject entry point,
    ``flows.cli:entry``), else ``python -m flows.cli``."""
    if given:
        return given.split()
    script = os.path.join(os.path.dirname(sys.executable), "mtag")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "flows.cli"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="folder of audio (searched recursively; required)")
    p.add_argument("--repeats", type=int, default=3, help="counted repeats of each (3)")
    p.add_argument("--workers", type=int,
                   help="W baseline processes (default: this process's CPUs); when given, "
                        "also passed to mtag as --workers")
    p.add_argument("--limit", type=int,
                   help="first N files by sorted path (mtag then reads a CSV manifest)")
    p.add_argument("--skip-baselines", action="store_true", help="time mtag only")
    p.add_argument("--warmup", choices=("light", "full", "none"), default="light",
                   help="one warm-up of each: on the first W files (light, default), on "
                        "every file (full), or none")
    p.add_argument("--first-work-regex", action="append",
                   help="marker of the first extraction in mtag -v's output; repeatable, the "
                        f"earliest matching line wins (default: {' | '.join(DEFAULT_FIRST_WORK)})")
    p.add_argument("--mtag", help="the mtag command (default: .venv/bin/mtag next to this Python)")
    p.add_argument("--code", metavar="DIR",
                   help="run mtag on the flows/tasks/featurestore of DIR (a copy of the "
                        "repository, e.g. `git archive HEAD | tar -x -C DIR`): cwd DIR, "
                        "PYTHONPATH=DIR ahead of the editable install")
    p.add_argument("--prefect-home",
                   help="PREFECT_HOME of the mtag runs (default: $PREFECT_HOME if set, else "
                        "bench/results/prefect-home-command, kept between runs like ~/.prefect)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds (1800)")
    p.add_argument("--tmp", help="folder for the fresh stores (default: the system's temp)")
    p.add_argument("--label", default="", help="added to the result names, e.g. baseline")
    p.add_argument("--out", help="JSON path (default bench/results/command-...-<time>.json)")
    p.add_argument("--render", metavar="JSON", help="only print the table of a results file")
    # child mode
    p.add_argument("--baseline", choices=("plain_loop", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--files-from", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.render:
        with open(args.render) as fh:
            print(render(json.load(fh)))
        return 0
    if args.baseline:
        if not (args.files_from and args.part):
            p.error("--baseline needs --files-from and --part k/W")
        return child_main(args.baseline, args.files_from, args.part)
    if not args.source:
        p.error("--source is required")
    if not become_subreaper():
        print("warning: cannot adopt orphans (PR_SET_CHILD_SUBREAPER): the CPU of processes "
              "that outlive mtag (its fork server's workers) is not counted", file=sys.stderr)

    import ingest_bench as ib  # after ORIGINAL_ENV was taken

    started = benchenv.now()
    source = os.path.abspath(args.source)
    files = sorted(ib.list_audio(source))
    if not files:
        print(f"no audio files under {source}", file=sys.stderr)
        return 2
    limit_note = ""
    if args.limit is not None and args.limit < len(files):
        limit_note = f" (--limit {args.limit} of {len(files)})"
        files = files[:args.limit]
    workers = args.workers or benchenv.cpus()
    name = os.path.basename(source.rstrip("/")) or "source"
    stem = "command-" + (f"{args.label}-" if args.label else "") + name
    json_path = args.out or benchenv.result_path(stem)
    base_path = json_path.removesuffix(".json")

    work = tempfile.mkdtemp(prefix="mtag-cmdbench-lists-", dir=args.tmp)
    list_path = os.path.join(work, "files.txt")
    with open(list_path, "w") as fh:
        fh.writelines(f"{f}\n" for f in files)
    warm_files = files[:workers]
    warm_list = os.path.join(work, "warm.txt")
    with open(warm_list, "w") as fh:
        fh.writelines(f"{f}\n" for f in warm_files)
    mtag_source = source if not limit_note else ib.write_manifest(files)
    warm_source = mtag_source if args.warmup == "full" else ib.write_manifest(warm_files)

    mtag_env = dict(ORIGINAL_ENV)
    mtag_env["PREFECT_HOME"] = args.prefect_home or ORIGINAL_ENV.get(
        "PREFECT_HOME", os.path.join(benchenv.RESULTS, "prefect-home-command"))
    os.makedirs(mtag_env["PREFECT_HOME"], exist_ok=True)
    mtag_env["PYTHONUNBUFFERED"] = "1"  # lines arrive when printed, as on a terminal
    base_env = dict(ORIGINAL_ENV)
    for var in benchenv.THREAD_ENV:  # one BLAS/OpenMP thread, as Dask's nanny gives workers
        base_env[var] = "1"
    code_dir = os.path.abspath(args.code) if args.code else benchenv.REPO
    if args.code:
        mtag_env["PYTHONPATH"] = os.pathsep.join(
            x for x in (code_dir, ORIGINAL_ENV.get("PYTHONPATH")) if x)
    cmd_base = mtag_command(args.mtag)
    flows_file = subprocess.run(
        [sys.executable, "-c", "import flows; print(flows.__file__)"], cwd=code_dir,
        env=mtag_env, capture_output=True, text=True, check=False).stdout.strip()
    extra = ["--workers", str(args.workers)] if args.workers else []
    patterns = args.first_work_regex or list(DEFAULT_FIRST_WORK)

    audio_hdr = sum(ib.header_durations(files).values())
    res: dict[str, Any] = {
        "label": args.label, "source": source, "mtag_source": mtag_source,
        "files": len(files), "limit_note": limit_note, "workers": workers,
        "repeats": args.repeats, "warmup": args.warmup, "first_work_regex": patterns,
        "mtag_cmd": cmd_base, "mtag_extra_args": extra,
        "prefect_home": mtag_env["PREFECT_HOME"], "audio_header_s": audio_hdr,
        "code_dir": code_dir, "flows_imported_from": flows_file,
        "code_hash": code_hash(code_dir),
        "audio_s": audio_hdr, "audio_from": "headers", "started": started,
        "machine": benchenv.environment(ib.VERSION_PACKAGES),
        "page_cache_read_s": warm_page_cache(files), "warmup_runs": {}, "runs": [],
    }
    log = open(base_path + ".log", "w")
    kinds = ["mtag"] if args.skip_baselines else list(KINDS)

    def one(kind: str, warm: bool) -> dict[str, Any]:
        if kind == "mtag":
            return run_mtag(cmd_base, warm_source if warm else mtag_source, mtag_env,
                            patterns, args.timeout, args.tmp, log, extra, code_dir)
        lst = list_path if (not warm or args.warmup == "full") else warm_list
        return run_baseline(kind, lst, workers, base_env, args.timeout)

    def save() -> None:  # after every repeat: a killed run keeps its figures and table
        res["summary"] = summarise(res)
        benchenv.write_json(res, stem, json_path)
        if res["runs"]:
            with open(base_path + ".txt", "w") as fh:
                fh.write(render(res) + "\n")

    try:
        if args.warmup != "none":
            for kind in kinds:
                r = one(kind, warm=True)
                res["warmup_runs"][kind] = r
                print(f"warm-up {kind}: {r['wall_s']:.1f} s (rc {r['rc']})", flush=True)
        for i in range(args.repeats):
            row: dict[str, Any] = {}
            for kind in kinds:
                row[kind] = one(kind, warm=False)
                x = row[kind]
                print(f"repeat {i + 1}/{args.repeats} {kind}: wall {x['wall_s']:.1f} s, CPU "
                      f"{x['cpu_s']:.1f} s, rc {x['rc']}, load {x['loadavg_before'][0]:.1f}",
                      flush=True)
                if kind == "floor" and x["ok"] and x["audio_s"]:
                    res["audio_s"], res["audio_from"] = x["audio_s"], "decoded by the floor"
            res["runs"].append(row)
            save()
    finally:
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    res["finished"] = benchenv.now()
    res["loadavg_end"] = os.getloadavg()
    save()
    print()
    print(render(res))
    print(f"\nwrote {json_path} (+ .txt, .log)")
    failed = any(r[k]["rc"] != 0 for r in res["runs"] for k in r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
