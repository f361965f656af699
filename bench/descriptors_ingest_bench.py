#!/usr/bin/env python
"""What the descriptors (tempo, key, loudness) and the tag reader cost a whole ingest.

Runs ``mtag ingest SOURCE --store <fresh store>`` as a user does (a new process, its own
cluster and Prefect API), alternating the default feature config (descriptors and tags on)
with the same config switched off (``descriptors: false, tags: false``), R times each on the
same files, and prints the median wall time and CPU time (the whole process tree) of each,
the pairwise ratios on/off and the throughput cost; CPU time is the figure to trust on a
shared machine, wall time the one a user sees.
Writes ``bench/results/descriptors-ingest-<time>.json``.

Usage::

    .venv/bin/python bench/descriptors_ingest_bench.py --source /usr/share/games/singularity/music
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(source: str, config: str | None, workers: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the whole process tree: the command,
    its Dask workers and Prefect server, reaped by it) of one ingest into a fresh store."""
    store = tempfile.mkdtemp(prefix="desc-bench-")
    cmd = [sys.executable, "-m", "flows.cli", "ingest", source, "--store", store,
           "--workers", str(workers), "--no-progress"]
    if config:
        cmd += ["--feature-config", config]
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(store, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"ingest failed: {out.stderr[-2000:]}")
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    off = os.path.join(tempfile.mkdtemp(), "off.yaml")
    with open(off, "w") as fh:
        fh.write("descriptors: false\ntags: false\n")
    run(args.source, None, args.workers)  # warm-up: page cache, numba cache, imports
    on, off_runs = [], []
    for _ in range(args.repeats):
        on.append(run(args.source, None, args.workers))
        off_runs.append(run(args.source, off, args.workers))
    result: dict = {"source": args.source, "workers": args.workers, "repeats": args.repeats}
    for k, what in enumerate(("wall", "cpu")):
        a, b = [r[k] for r in on], [r[k] for r in off_runs]
        ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
        result[what] = {"on_s": a, "off_s": b, "on_median_s": statistics.median(a),
                        "off_median_s": statistics.median(b), "ratio_median": ratio,
                        "throughput_cost": 1 - 1 / ratio}
        print(f"{what:4s} on {statistics.median(a):7.1f} s  off {statistics.median(b):7.1f} s  "
              f"on/off (pairwise median) {ratio:.3f} -> throughput cost "
              f"{100 * (1 - 1 / ratio):.1f} % (target <= 15 %)   on={[round(x, 1) for x in a]}"
              f" off={[round(x, 1) for x in b]}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"descriptors-ingest-{time.strftime('%Y%m%d-%H%M%S')}"
                        ".json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
