#!/usr/bin/env python
"""The open-set detector alone, over many draws: in-class tracks kept, out-of-class flagged.

``confident`` comes from the run's open-set detector (:mod:`training.novelty`), which depends
on the labelled non-test tracks and their stored features only, never on the classifier. So
its two figures of issue 13 (out-of-class flagged >= 0.80, in-class held-out kept >= 0.95)
can be measured without training: fit the detector as ``mtag train`` does on the reference
tracks of a draw, and read which tracks it keeps. ``bench/small_data.py`` measures them
through whole training and scoring runs, 5 repeats of 30 test tracks; this measures the same
rule over ``--draws`` draws (100 by default) and every in-class track of the store, in a few
minutes, at several conformal levels.

Per draw (protocol A of the small-data benchmark): 10 notes per class of
``../shared/datasets/philharmonia-dev`` drawn at random (seed = ``--seed`` + draw), split
6/2/2 per class (``small_data.draw``); the detector is fitted on the 8 train + valid notes of
each class (120 tracks), as :meth:`training.trainer.Prepared.novelty` fits it. Read:

* **test kept**: the draw's 30 test notes within the threshold;
* **unseen kept**: every other in-class note of the store (about 3,600), the precise figure;
* **flagged**, per category: the out-of-class set of ``small_data.make_openset`` (noise,
  generated environmental sounds, music of another kind: demo tracks of instruments
  philharmonia lacks and excerpts of the singularity soundtrack; speech when ``espeak-ng``
  is installed).

Both sets are ingested into one store (``mtag ingest``, as a user runs it) under
``--workdir`` (kept; a second run's ingests are incremental and add nothing). Output: a
table per level, and ``bench/results/open-set-<time>.json``.

    .venv/bin/python bench/open_set_coverage.py --workdir /tmp/osc
    .venv/bin/python bench/open_set_coverage.py --workdir /tmp/osc --draws 200 --levels 0.975
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import benchenv

benchenv.apply_cli_defaults()

import numpy as np  # noqa: E402
import small_data  # noqa: E402

from featurestore.query import connect  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from tasks.columns import summary_columns  # noqa: E402
from tasks.config import FeatureConfig  # noqa: E402
from training.novelty import (  # noqa: E402
    LEVEL,
    NoveltyDetector,
    nearest_distances,
    track_means,
)

LEVELS = (0.95, LEVEL, 0.99)


def build(work: str, philharmonia: str, seed: int) -> tuple[str, dict[str, dict[str, str]]]:
    """The store of both sets (ingested once) and the out-of-class rows by absolute path."""
    store = os.path.join(work, "store")
    ooc_dir = os.path.join(work, "ooc")
    demo = small_data.demo_pool(os.path.join(work, "demo"), 24)
    phil_classes = {lab for _, lab in small_data.philharmonia_pool(philharmonia)}
    other = sorted(r["path"] for r in demo if r["instrument"] not in phil_classes)
    rng = np.random.default_rng(seed + 1000)
    music = [(other[i], "demo music") for i in
             rng.choice(len(other), size=min(8, len(other)), replace=False)]
    music += [(p, "singularity excerpt") for p in
              small_data.game_excerpts(os.path.join(ooc_dir, "music"), 4)]
    rows, notes = small_data.make_openset(ooc_dir, music, seed=seed + 1)
    for note in notes:
        print(f"note: {note}", flush=True)
    manifest = small_data.write_manifest([r["path"] for r in rows],
                                         os.path.join(work, "ooc.csv"))
    for source in (philharmonia, manifest):  # incremental: a second run ingests nothing
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "ingest", source, "--store",
                        store, "--no-progress"], check=True, cwd=benchenv.REPO,
                       stdout=subprocess.DEVNULL)
        print(f"ingested {source} in {time.perf_counter() - started:.1f} s", flush=True)
    return store, {os.path.abspath(r["path"]): r for r in rows}


def load(store: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Segment rows (track ids, summary matrix), the columns, and per track: id and path."""
    columns = summary_columns(FeatureConfig())
    con = connect(FeatureStore(store))
    picked = ", ".join(f's."{c}"' for c in columns)
    seg = con.execute(f"SELECT s.track_id, {picked} FROM segments s").df()
    tracks = con.execute("SELECT track_id, path FROM tracks WHERE status = 'ok'").df()
    return (seg["track_id"].to_numpy(object), seg[columns].to_numpy(np.float64), columns,
            tracks["track_id"].to_numpy(object), tracks["path"].to_numpy(object))


def _share(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else float("nan")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    store, ooc = build(args.workdir, args.philharmonia, args.seed)
    seg_ids, x, columns, ids, paths = load(store)
    path_of = dict(zip(ids, paths, strict=True))
    tid_of = {p: t for t, p in path_of.items()}
    pool = small_data.philharmonia_pool(args.philharmonia)
    in_class = {tid_of[p] for p, _ in pool if p in tid_of}
    mean_ids, means = track_means(seg_ids, x)
    row_of = {t: i for i, t in enumerate(mean_ids)}
    ooc_by_cat: dict[str, list[int]] = defaultdict(list)
    for tid in mean_ids:
        found = ooc.get(os.path.abspath(path_of.get(tid, "")))
        if found is not None:
            ooc_by_cat[found["category"]].append(row_of[tid])
    ooc_rows = np.array(sorted(i for v in ooc_by_cat.values() for i in v))
    print(f"{len(in_class)} in-class tracks, {len(ooc_rows)} out-of-class "
          f"({', '.join(f'{k} {len(v)}' for k, v in sorted(ooc_by_cat.items()))})", flush=True)
    rows_of_track: dict[str, np.ndarray] = {}
    order = np.argsort(seg_ids, kind="stable")
    sorted_ids = seg_ids[order]
    bounds = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1], True])
    for a, b in itertools.pairwise(bounds):
        rows_of_track[sorted_ids[a]] = order[a:b]
    per_level: dict[str, list[dict[str, Any]]] = {f"{lv:g}": [] for lv in args.levels}
    started = time.perf_counter()
    for d in range(args.draws):
        drawn = small_data.draw(pool, args.seed + d)
        ref = [tid_of[r["path"]] for r in drawn if r["split"] != "test"]
        test = np.array([row_of[tid_of[r["path"]]] for r in drawn if r["split"] == "test"])
        unseen = np.array(sorted(row_of[t] for t in in_class - {tid_of[r["path"]]
                                                                for r in drawn}))
        seg_rows = np.concatenate([rows_of_track[t] for t in ref])
        for lv in args.levels:
            det = NoveltyDetector.fit(seg_ids[seg_rows], x[seg_rows], columns, level=lv)
            assert det is not None
            z = ((means - det.center) / det.scale).astype(np.float32)
            known = nearest_distances(z, det.reference) <= det.threshold
            per_level[f"{lv:g}"].append({
                "draw": d, "threshold": det.threshold, "test_kept": _share(known[test]),
                "unseen_kept": _share(known[unseen]), "ooc_flagged": _share(~known[ooc_rows]),
                **{f"flagged_{k}": _share(~known[np.array(v)])
                   for k, v in ooc_by_cat.items()}})
        if (d + 1) % 20 == 0:
            print(f"  {d + 1} draws, {time.perf_counter() - started:.0f} s", flush=True)
    return {"store": store, "draws": args.draws, "in_class_tracks": len(in_class),
            "ooc_tracks": {k: len(v) for k, v in ooc_by_cat.items()},
            "levels": {lv: summarise(v) for lv, v in per_level.items()},
            "per_draw": per_level}


def summarise(draws: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in draws[0]:
        if key == "draw":
            continue
        v = np.array([d[key] for d in draws], dtype=np.float64)
        out[key] = {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)),
                    "p5": float(np.percentile(v, 5)), "min": float(np.min(v))}
    out["draws_unseen_at_least_0.95"] = float(np.mean(
        [d["unseen_kept"] >= 0.95 for d in draws]))
    out["draws_flagged_at_least_0.80"] = float(np.mean(
        [d["ooc_flagged"] >= 0.80 for d in draws]))
    return out


def render(result: dict[str, Any]) -> str:
    keys = ["test_kept", "unseen_kept", "ooc_flagged",
            *sorted(k for k in next(iter(result["levels"].values())) if
                    k.startswith("flagged_"))]
    lines = [f"{result['draws']} draws; mean ± std over draws (5th percentile)", "",
             "| level | " + " | ".join(k.replace("_", " ") for k in keys) +
             " | draws: unseen ≥ 0.95 / flagged ≥ 0.80 |",
             "|---|" + "---:|" * (len(keys) + 1)]
    for lv, s in result["levels"].items():
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f} ({s[k]['p5']:.3f})" for k in keys]
        lines.append(f"| {lv} | " + " | ".join(cells) +
                     f" | {s['draws_unseen_at_least_0.95']:.2f} / "
                     f"{s['draws_flagged_at_least_0.80']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", required=True, help="the store and the out-of-class files "
                                                     "(kept; reused by the next run)")
    ap.add_argument("--philharmonia", default=small_data.PHILHARMONIA)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    record: dict[str, Any] = {"machine": benchenv.environment(
        ("mtag", "numpy"), code_paths=(*benchenv.PIPELINE_CODE, "training")),
        "started": benchenv.now(), "args": vars(args)}
    record |= measure(args)
    record["finished"] = benchenv.now()
    out = benchenv.write_json(record, "open-set", args.out)
    print(render(record))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
