#!/usr/bin/env python
"""Orchestration overhead of the ingest flow on many short tracks.

Generates N (default 1000) short synthetic wav tracks (2-4 s of tones, harmonics and noise at
22,050 Hz, fixed seed) in a temporary folder, runs ``run_ingest`` with W (default 2) workers on
a fresh store, then again on the same store (a no-op rerun), and reports:

* the flow's wall time and the sum of the shards' ``compute_s``;
* orchestration overhead = ``wall - compute_s / W`` (the time the workers were not computing,
  per worker) and, as the issue literally states it, ``wall - compute_s``;
* shard and probe task counts, and overhead per track in ms;
* the no-op rerun's wall time;
* (unless ``--no-inprocess``) the same tracks through the per-file path in-process on one
  thread, for what the features alone cost.

Usage::

    .venv/bin/python bench/orchestration_bench.py            # 1000 tracks, 2 workers
    .venv/bin/python bench/orchestration_bench.py --tracks 200 --workers 2
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import benchenv
import ingest_bench as ib  # before numpy/Prefect/Dask: sets their environment
import numpy as np

SR = 22050


def make_tracks(folder: str, n: int, *, seed: int = 1234, per_dir: int = 100
                ) -> tuple[list[str], float]:
    """Write ``n`` synthetic wav tracks under ``folder``; return paths and total seconds."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    paths, total = [], 0.0
    for i in range(n):
        seconds = float(rng.uniform(2.0, 4.0))
        t = np.arange(int(seconds * SR)) / SR
        y = np.zeros_like(t)
        for _ in range(int(rng.integers(1, 4))):
            f0 = float(rng.uniform(55.0, 1760.0))
            for h in range(1, int(rng.integers(1, 6)) + 1):
                if f0 * h < SR / 2:
                    y += rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * t
                                                            + rng.uniform(0, 2 * np.pi))
        env = np.minimum(1.0, t / 0.02) * np.exp(-t * rng.uniform(0.0, 1.5))
        y = y * env + rng.uniform(0.0, 0.3) * rng.standard_normal(t.size)
        y = 0.5 * y / max(1e-9, float(np.abs(y).max()))
        sub = os.path.join(folder, f"part{i // per_dir:03d}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"track_{i:05d}.wav")
        sf.write(path, y.astype(np.float32), SR, subtype="PCM_16")
        paths.append(path)
        total += t.size / SR
    return paths, total


def ingest(source: str, store: str, workers: int) -> dict[str, Any]:
    """One run_ingest; flow figures plus the outer wall time."""
    from flows.ingest import run_ingest

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with ib.CpuMonitor() as mon:
        s = run_ingest(source, store, n_workers=workers, progress=False)
    outer = time.perf_counter() - t0
    return {
        "files": s.files, "ok": s.ok, "failed": s.failed, "unsupported": s.unsupported,
        "unchanged": s.unchanged, "duplicates": s.duplicates, "segments": s.segments,
        "shards": s.shards, "shards_failed": s.shards_failed, "workers": s.workers,
        "audio_s": s.audio_s, "compute_s": s.compute_s, "wall_s": s.wall_s,
        "outer_wall_s": outer, "peak_rss_mb": dict(s.peak_rss_mb),
        "errors": [list(e) for e in s.errors], "feature_set": s.feature_set,
        "cpu_s": mon.figures(),
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }


def render(res: dict[str, Any]) -> str:
    """The compact table."""
    first, rerun = res["first"], res["rerun"]
    w = first["workers"]
    o = res["overhead"]
    m = res["machine"]
    lines = [
        f"== orchestration bench: {res['tracks']} synthetic tracks "
        f"({res['audio_s'] / 60:.1f} min, 2-4 s each), W={w} workers; "
        f"{m['cpu_count']} cores, load at start {m['loadavg_start'][0]:.2f}",
        f"   {benchenv.git_line(m['git'])}",
        "",
        f"  {'files ok/failed':40s}{first['ok']}/{first['failed']}",
        f"  {'segments':40s}{first['segments']}",
        f"  {'shard tasks (probe tasks)':40s}{first['shards']} ({res['probe_tasks']})",
        f"  {'flow wall s':40s}{first['wall_s']:.2f}",
        f"  {'wall s incl. cluster start/stop':40s}{first['outer_wall_s']:.2f}",
        f"  {'sum of shard compute_s':40s}{first['compute_s']:.2f}",
        f"  {'overhead = wall - compute_s/W  (s)':40s}{o['per_worker_s']:.2f}"
        f"   = {o['per_worker_ms_per_track']:.1f} ms/track "
        f"({100 * o['per_worker_fraction']:.0f}% of wall)",
        f"  {'overhead = wall - compute_s    (s)':40s}{o['literal_s']:.2f}"
        f"   = {o['literal_ms_per_track']:.1f} ms/track",
        f"  {'peak RSS MB per worker':40s}{ib.fmt_rss(first['peak_rss_mb'])}",
        f"  {'CPU s: workers / Prefect API / flow':40s}"
        f"{first['cpu_s'].get('dask_worker_s', 0):.1f} / "
        f"{first['cpu_s'].get('prefect_api_s', 0):.1f} / {first['cpu_s']['main_s']:.1f}"
        f"   (all, exact: {first['cpu_s']['total_s']:.1f})",
    ]
    if "inprocess" in res:
        ip = res["inprocess"]
        lines += [
            f"  {'in-process (c), 1 thread: wall s':40s}{ip['wall_s']:.2f}"
            f"   = {1000 * ip['wall_s'] / res['tracks']:.1f} ms/track, "
            f"{ip['realtime_x']:.0f}x realtime",
            f"  {'compute_s - in-process (task-side extra)':40s}"
            f"{first['compute_s'] - ip['wall_s']:.2f}"
            f"   = {1000 * (first['compute_s'] - ip['wall_s']) / res['tracks']:.1f} ms/track",
            f"  {'wall - in-process/W (all overhead)':40s}"
            f"{first['wall_s'] - ip['wall_s'] / w:.2f}"
            f"   = {1000 * (first['wall_s'] - ip['wall_s'] / w) / res['tracks']:.1f} ms/track",
        ]
    lines += [
        "",
        f"  {'no-op rerun, same store: flow wall s':40s}{rerun['wall_s']:.2f}"
        f"   ({rerun['unchanged']} unchanged, {rerun['ok']} processed)",
        f"  {'no-op rerun incl. cluster':40s}{rerun['outer_wall_s']:.2f}"
        f"   (CPU s all: {rerun['cpu_s']['total_s']:.1f})",
    ]
    for e in first["errors"][:5]:
        lines.append(f"  ! {e[1]} {e[0]}: {e[2]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracks", type=int, default=1000, help="synthetic tracks (1000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup-tracks", type=int, default=20,
                   help="tracks of a throwaway ingest first, so the measured run does not pay "
                        "the Prefect API start (0 to skip; default 20)")
    p.add_argument("--no-inprocess", action="store_true",
                   help="skip the in-process timing of the same tracks")
    p.add_argument("--keep", action="store_true", help="keep the tracks and the store")
    p.add_argument("--out", help="JSON path (default bench/results/orchestration-<time>.json)")
    args = p.parse_args(argv)

    from flows.ingest import PROBE_BATCH_MAX
    from flows.plan import batches

    root = tempfile.mkdtemp(prefix="mtag-orch-bench-")
    tracks_dir = os.path.join(root, "tracks")
    store = os.path.join(root, "store")
    res: dict[str, Any] = {
        "bench": "orchestration",
        "started": benchenv.now(),
        "machine": benchenv.environment(ib.VERSION_PACKAGES),
        "tracks": args.tracks,
        "workers": args.workers,
        "seed": args.seed,
    }
    try:
        t0 = time.perf_counter()
        paths, audio_s = make_tracks(tracks_dir, args.tracks, seed=args.seed)
        res["generate_s"] = time.perf_counter() - t0
        res["audio_s"] = audio_s
        res["probe_tasks"] = len(batches(paths, 2 * args.workers, PROBE_BATCH_MAX))
        print(f"generated {len(paths)} tracks ({audio_s / 60:.1f} min) in "
              f"{res['generate_s']:.1f} s under {tracks_dir}", flush=True)

        if args.warmup_tracks > 0:
            warm_dir = os.path.join(root, "warmup")
            make_tracks(warm_dir, args.warmup_tracks, seed=args.seed + 1)
            print(f"warm-up ingest of {args.warmup_tracks} tracks ...", flush=True)
            res["warmup"] = ingest(warm_dir, os.path.join(root, "warmup-store"), args.workers)

        print("ingest on a fresh store ...", flush=True)
        res["first"] = first = ingest(tracks_dir, store, args.workers)
        print(f"  wall {first['wall_s']:.2f} s, compute_s {first['compute_s']:.2f} s", flush=True)
        print("no-op rerun on the same store ...", flush=True)
        res["rerun"] = ingest(tracks_dir, store, args.workers)
        res["store_mb"] = ib.dir_size_mb(store)

        w = max(1, first["workers"])
        per_worker = first["wall_s"] - first["compute_s"] / w
        literal = first["wall_s"] - first["compute_s"]
        res["overhead"] = {
            "per_worker_s": per_worker,
            "per_worker_ms_per_track": 1000 * per_worker / args.tracks,
            "per_worker_fraction": per_worker / first["wall_s"],
            "literal_s": literal,
            "literal_ms_per_track": 1000 * literal / args.tracks,
        }

        if not args.no_inprocess:
            print("in-process (c) on the same tracks, 1 thread ...", flush=True)
            b = ib.make_baselines()
            with ib.one_thread():
                ib.ours_file(paths[0], b)
                res["inprocess"] = ib.time_method(ib.ours_file, paths, b, 1)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    res["machine"]["loadavg_end"] = os.getloadavg()
    res["finished"] = benchenv.now()
    table = render(res)
    res["table"] = table
    print()
    print(table)
    path = benchenv.write_json(res, "orchestration", args.out)
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
