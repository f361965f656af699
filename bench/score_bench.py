#!/usr/bin/env python
"""Scoring throughput and embedding quality on a labelled catalogue.

    .venv/bin/python bench/score_bench.py --source ../shared/datasets/philharmonia-dev \
        --labels ../shared/datasets/philharmonia-dev/labels.csv [--store DIR]

1. Ingests SOURCE into STORE if it has no features yet, and, unless the store's MLflow already
   has ``--name`` (default ``bench-score``) with a champion, trains ``--model`` (default
   ``mfcc_cnn``, class-balanced, 30 epochs) with ``train_flow`` (split 70/10/20, seeded) and
   registers it.
2. **Scoring from stored features, as a user runs it**: ``mtag score`` (``python -m
   flows.cli score --json``) on the store with W workers, ``--repeats`` times, each a process
   of its own timed from its start to its exit (the model's scores are deleted before each
   run, so each run does the full work); tracks/s per worker by the flow's own wall and by
   the whole command's. Then the same through ``run_score`` in this process (what a Python
   caller or the scheduled flow runs). Baseline in the same run, before and after the
   command runs: the same model on the same tensors in this process, one thread, no
   orchestration and no writing (``Predictor.predict`` over each shard's memory-mapped
   tensors), i.e. the scoring floor; the ratios are to the median of those floors.
3. **Scoring from raw audio**: ``run_score SOURCE`` into a fresh store (ingest with the
   model's feature config, then score) on ``--raw-limit`` files (default all); tracks/s and
   audio x realtime per worker, end to end.
4. **Quality**: ``neighbours`` (k = 10, exact) of the scored store, and the share of each
   track's 10 nearest neighbours with the same true label (from LABELS). Target >= 0.95.

Every figure goes to ``bench/results/score-<time>.json`` with the machine facts.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

import benchenv
import ingest_bench as ib  # before numpy/Prefect/Dask: sets their environment

VERSION_PACKAGES = (*ib.VERSION_PACKAGES, "torch", "mlflow", "faiss-cpu")


def ensure_model(store: str, labels: str, source: str, name: str, model: str,
                 epochs: int) -> dict[str, Any]:
    """Ingest and train if needed; return the training summary (or {} if it existed)."""
    from featurestore.store import FeatureStore
    from flows.ingest import run_ingest
    from flows.train import train_flow
    from tasks.errors import StoreError
    from training import tracking

    try:
        FeatureStore(store).default_feature_set()
    except StoreError:
        print(f"ingesting {source} into {store} ...", flush=True)
        print(run_ingest(source, store, progress=False).render(), flush=True)
    tracking.configure(FeatureStore(store))
    if tracking.alias_version(name, tracking.CHAMPION) is not None:
        return {}
    print(f"training {model} as {name} ...", flush=True)
    t0 = time.perf_counter()
    out = train_flow(store=store, labels=labels, model=model, registered_name=name,
                      valid_size=0.1, test_size=0.2,
                      train_config={"epochs": epochs, "patience": 8, "seed": 0,
                                    "balance": True})
    best = out.best
    print(f"  test accuracy {best['test']['accuracy']:.4f}, macro-F1 "
          f"{best['test']['macro_f1']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"model": best["model"], "test_accuracy": best["test"]["accuracy"],
            "test_macro_f1": best["test"]["macro_f1"], "train_s": time.perf_counter() - t0}


def inprocess_floor(store: str, uri: str, batch_size: int | None = None) -> dict[str, Any]:
    """The model over every shard's stored tensors in this process (one thread), in the
    batches the scoring workers use (the model's own rule, decision 71) unless ``batch_size``
    says otherwise.
    """
    import torch

    from featurestore.reader import shard_matrices
    from featurestore.store import FeatureStore
    from flows.score import scored_model, tracking_uri_for
    from flows.score_worker import load_predictor

    fstore = FeatureStore(store)
    tracking_uri = tracking_uri_for(fstore)
    model, _ = scored_model(uri, tracking_uri)
    predictor = load_predictor(tracking_uri, model.uri, "cpu")
    torch.set_num_threads(1)
    n_seg = 0
    t0 = time.perf_counter()
    for m in fstore.manifests(model.feature_set):
        if predictor.input == "summary":
            break
        if m.tensor_file is None:  # a shard of failed tracks only
            continue
        for _, _, x in shard_matrices(fstore, model.feature_set, m.tensor_file,
                                      predictor.input):
            predictor.predict(x, embeddings=True, batch_size=batch_size)
            n_seg += len(x)
    wall = time.perf_counter() - t0
    n_tracks = sum(m.counts.n_ok for m in fstore.manifests(model.feature_set))
    return {"tracks": n_tracks, "segments": n_seg, "wall_s": wall, "batch_size": batch_size,
            "tracks_per_s": n_tracks / wall, "segments_per_s": n_seg / wall}


def clear_scores(store: str, uri: str) -> None:
    """Remove the scores of the version ``uri`` names, so that a run does the full work."""
    from featurestore.scores import ScoreStore
    from featurestore.store import FeatureStore
    from flows.score import scored_model, tracking_uri_for

    fstore = FeatureStore(store)
    model, _ = scored_model(uri, tracking_uri_for(fstore))
    shutil.rmtree(ScoreStore(fstore).model_root(model.name, model.version), ignore_errors=True)


def score_command(store: str, uri: str, workers: int) -> dict[str, Any]:
    """One full ``mtag score`` of the store as a process of its own, timed from outside."""
    clear_scores(store, uri)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "flows.cli", "score", "--store", store, "--model-uri", uri,
           "--workers", str(workers), "--no-progress", "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    whole = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"mtag score failed ({out.returncode}): {out.stderr[-2000:]}")
    s = json.loads(out.stdout[out.stdout.index("\n{") + 1:])
    per = max(1, s["workers"])
    return {"tracks": s["tracks"], "segments": s["segments"], "parts": s["parts"],
            "wall_s": s["wall_s"], "command_wall_s": whole, "compute_s": s["compute_s"],
            "workers": s["workers"], "tracks_per_s_per_worker": s["tracks"] / s["wall_s"] / per,
            "command_tracks_per_s_per_worker": s["tracks"] / whole / per}


def score_stored(store: str, uri: str, workers: int) -> dict[str, Any]:
    """One full scoring run of the store in this process (``run_score``)."""
    from flows.score import run_score

    clear_scores(store, uri)
    t0 = time.perf_counter()
    s = run_score(store, uri, n_workers=workers, progress=False)
    return {"tracks": s.tracks, "segments": s.segments, "parts": s.parts, "wall_s": s.wall_s,
            "outer_wall_s": time.perf_counter() - t0, "compute_s": s.compute_s,
            "workers": s.workers, "tracks_per_s": s.tracks_per_s,
            "tracks_per_s_per_worker": s.tracks_per_s / max(1, s.workers),
            "unconfident": s.unconfident}


def score_raw(source: str, train_store: str, uri: str, workers: int, limit: int | None
              ) -> dict[str, Any]:
    """Ingest-then-score of raw audio into a fresh store."""
    from flows.score import run_score

    src = source
    tmp = tempfile.mkdtemp(prefix="mtag-score-raw-")
    if limit:
        files = ib.shuffled(ib.list_audio(source))[:limit]
        src = ib.write_manifest(files)
    fresh = os.path.join(tmp, "store")
    t0 = time.perf_counter()
    s = run_score(fresh, uri, source=src, tracking_uri=train_store, n_workers=workers,
                  progress=False)
    outer = time.perf_counter() - t0
    ingest = s.ingest.to_dict() if s.ingest else {}
    wall = s.wall_s  # the score flow's wall time includes its ingest subflow
    shutil.rmtree(tmp, ignore_errors=True)
    return {"tracks": s.tracks, "audio_s": ingest.get("audio_s"), "ingest_wall_s":
            ingest.get("wall_s"), "score_wall_s": wall - (ingest.get("wall_s") or 0.0),
            "wall_s": wall,
            "outer_wall_s": outer, "workers": s.workers,
            "tracks_per_s_per_worker": s.tracks / wall / max(1, s.workers),
            "audio_x_per_worker": (ingest.get("audio_s") or 0.0) / wall / max(1, s.workers)}


def quality(store: str, labels: str, workers: int, k: int = 10) -> dict[str, Any]:
    """Neighbours of every scored track; share of them with the same true label."""
    from featurestore.query import connect, run_query
    from featurestore.store import FeatureStore
    from flows.neighbours import run_neighbours
    from training.labels import match_labels, read_labels

    t0 = time.perf_counter()
    out = run_neighbours(store, k=k, n_workers=workers, progress=False, force=True)
    fstore = FeatureStore(store)
    con = connect(fstore)
    tracks = run_query(con, "SELECT track_id, path, status FROM tracks").to_pandas()
    sources = run_query(con, "SELECT uri, track_id FROM sources").to_pandas()
    pairs = run_query(con, "SELECT track_id, neighbour_id FROM neighbours").to_pandas()
    con.close()
    lab = match_labels(read_labels(labels), tracks, sources).frame
    truth = dict(zip(lab["track_id"], lab["labels"].map(lambda x: x[0]), strict=True))
    a = pairs["track_id"].map(truth)
    b = pairs["neighbour_id"].map(truth)
    known = a.notna() & b.notna()
    share = float((a[known] == b[known]).mean())
    per_track = (a[known] == b[known]).groupby(pairs["track_id"][known]).mean()
    return {"k": k, "tracks": out.tracks, "method": out.method, "wall_s":
            time.perf_counter() - t0, "same_label_share": share,
            "tracks_all_same": float((per_track == 1.0).mean()),
            "worst_track_share": float(per_track.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(),
                                                    "mtag-bench-score"))
    ap.add_argument("--name", default="bench-score")
    ap.add_argument("--model", default="mfcc_cnn")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--raw-limit", type=int, help="files for the raw-audio run (default all)")
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    res: dict[str, Any] = {"machine": benchenv.environment(VERSION_PACKAGES),
                           "source": args.source, "store": args.store}
    res["training"] = ensure_model(args.store, args.labels, args.source, args.name,
                                   args.model, args.epochs)
    uri = f"models:/{args.name}@champion"
    floors = [inprocess_floor(args.store, uri)]
    commands = [score_command(args.store, uri, args.workers) for _ in range(args.repeats)]
    floors.append(inprocess_floor(args.store, uri))
    runs = [score_stored(args.store, uri, args.workers) for _ in range(args.repeats)]
    floors.append(inprocess_floor(args.store, uri))
    # the floor as measured before decision 71 (batches of 256), for the earlier figures
    res["floor_batch_256"] = inprocess_floor(args.store, uri, 256)
    res["command"], res["stored"], res["floors"] = commands, runs, floors
    res["floor"] = min(floors, key=lambda f: abs(
        f["tracks_per_s"] - statistics.median(g["tracks_per_s"] for g in floors)))
    if not args.skip_raw:
        res["raw"] = score_raw(args.source, args.store, uri, args.workers, args.raw_limit)
    res["quality"] = quality(args.store, args.labels, args.workers)

    med = statistics.median(r["tracks_per_s_per_worker"] for r in runs)
    f = res["floor"]
    print(f"\n== score bench: {args.source}; model {uri}; W={args.workers}; "
          f"load at start {res['machine']['loadavg_start'][0]:.2f}")
    for i, r in enumerate(commands, 1):
        print(f"  mtag score, run {i}: {r['tracks']} tracks in {r['wall_s']:.1f} s flow wall, "
              f"{r['command_wall_s']:.1f} s whole command: {r['tracks_per_s_per_worker']:.1f} "
              f"tracks/s per worker by the flow, {r['command_tracks_per_s_per_worker']:.1f} by "
              f"the command; task compute {r['compute_s']:.1f} s")
    for key, what in (("tracks_per_s_per_worker", "flow wall"),
                      ("command_tracks_per_s_per_worker", "whole command")):
        ratios = sorted(r[key] / f["tracks_per_s"] for r in commands)
        print(f"  mtag score, per worker by {what} / floor: median "
              f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")
    for i, r in enumerate(runs, 1):
        print(f"  stored features, run {i}: {r['tracks']} tracks, {r['segments']} segments "
              f"in {r['wall_s']:.1f} s flow wall ({r['outer_wall_s']:.1f} s with cluster): "
              f"{r['tracks_per_s']:.1f} tracks/s = {r['tracks_per_s_per_worker']:.1f} per "
              f"worker; task compute {r['compute_s']:.1f} s")
    each = ", ".join(f"{g['tracks_per_s']:.0f}" for g in floors)
    print(f"  in-process floor (1 thread, model only): {f['tracks_per_s']:.1f} tracks/s, "
          f"{f['segments_per_s']:.0f} segments/s (the median of {each}); in batches of 256 "
          f"(the floor before decision 71): {res['floor_batch_256']['tracks_per_s']:.1f}")
    print(f"  run_score in this process, median per worker / floor: "
          f"{med / f['tracks_per_s']:.2f}")
    if "raw" in res:
        r = res["raw"]
        print(f"  raw audio (ingest + score), {r['tracks']} tracks: {r['wall_s']:.1f} s "
              f"(ingest {r['ingest_wall_s']:.1f} + score {r['score_wall_s']:.1f}) = "
              f"{r['tracks_per_s_per_worker']:.1f} tracks/s per worker, "
              f"{r['audio_x_per_worker']:.0f}x realtime per worker")
    q = res["quality"]
    print(f"  quality: {q['tracks']} tracks, k={q['k']} ({q['method']}): same-label share "
          f"{q['same_label_share']:.4f} (target >= 0.95); all 10 same for "
          f"{100 * q['tracks_all_same']:.1f}% of tracks; worst track {q['worst_track_share']:.1f}")
    path = benchenv.write_json(res, "score", args.out)
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
