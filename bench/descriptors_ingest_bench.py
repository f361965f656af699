#!/usr/bin/env python
"""What the descriptors (tempo, key, loudness) and the tag reader cost a whole ingest.

Runs ``mtag ingest SOURCE --store <fresh store>`` as a user does (a new process, its own
cluster and Prefect API), alternating the default feature config (descriptors and tags on)
with the same config switched off (``descriptors: false, tags: false``), R times each on the
same files, and prints the median wall time of each, the pairwise ratio on/off and the
throughput cost. Writes ``bench/results/descriptors-ingest-<time>.json``.

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


def run(source: str, config: str | None, workers: int) -> float:
    store = tempfile.mkdtemp(prefix="desc-bench-")
    cmd = [sys.executable, "-m", "flows.cli", "ingest", source, "--store", store,
           "--workers", str(workers), "--no-progress"]
    if config:
        cmd += ["--feature-config", config]
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    shutil.rmtree(store, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"ingest failed: {out.stderr[-2000:]}")
    return wall


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
    on_s, off_s = [], []
    for _ in range(args.repeats):
        on_s.append(run(args.source, None, args.workers))
        off_s.append(run(args.source, off, args.workers))
    ratios = [a / b for a, b in zip(on_s, off_s, strict=True)]
    result = {
        "source": args.source, "workers": args.workers, "repeats": args.repeats,
        "on_wall_s": on_s, "off_wall_s": off_s,
        "on_median_s": statistics.median(on_s), "off_median_s": statistics.median(off_s),
        "ratio_median": statistics.median(ratios),
        "throughput_cost": 1 - 1 / statistics.median(ratios),
    }
    print(f"descriptors+tags on : median {result['on_median_s']:.1f} s  {on_s}")
    print(f"descriptors+tags off: median {result['off_median_s']:.1f} s  {off_s}")
    print(f"on/off ratio (pairwise median) {result['ratio_median']:.3f} -> throughput cost "
          f"{100 * result['throughput_cost']:.1f} % (target <= 15 %)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"descriptors-ingest-{time.strftime('%Y%m%d-%H%M%S')}"
                        ".json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
