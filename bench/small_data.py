#!/usr/bin/env python
"""Small-data benchmark: ``auto``, the best single candidate in hindsight and the ensemble on
repeated 60/20/20 splits of 10 tracks per class, and the open set (out-of-class material).

    .venv/bin/python bench/small_data.py                 # 5 repeats of each protocol
    .venv/bin/python bench/small_data.py --quick         # 2 repeats, smaller pools
    .venv/bin/python bench/small_data.py --protocols A --repeats 3

Protocols (each ingested ONCE into its own store, the open set included; a repeat only writes
a labels file):

* **A**: ``../shared/datasets/philharmonia-dev`` (15 instruments). Per repeat 10 notes per
  class drawn at random (seed ``--seed + repeat``) from the whole set.
* **B**: the demo's rendered styles (``flows.demo.make_catalogue``; label = ``style``:
  ballad, march, dance). A pool of ``--pool-per-style`` tracks per style is rendered once;
  per repeat 10 per style are drawn from it.

Per repeat the 10 tracks of a class are split 6/2/2 (train/valid/test) through the labels
file's ``split`` column, and ``run_train(--model auto)`` runs once (seed = repeat). Below
2,000 tracks ``auto`` cross-validates its CPU candidates (``flows.train.cv_candidates``:
linear, gbm, mfcc_cnn) over train + valid, refits every one on train + valid, builds the
``ensemble`` of the best three, evaluates *every* candidate once on the test tracks and
registers the chosen one. So one run gives auto's choice, each single's test figures and the
ensemble's, all from the same refits (``--model ensemble`` would fit the same singles and
register the same ensemble). "Best single in hindsight" is, per repeat, the single with the
best test macro-F1. Each candidate's logged model is registered under its own name
(``sd-<P>-r<i>-<model>``) and scored over the whole store (``run_score``, one Dask cluster
for the whole bench); the ``scores`` view's ``confident`` column then gives:

* the share of out-of-class tracks flagged not confident (target >= 0.80), per category;
* the share of the repeat's in-class *test* tracks kept confident (target >= 0.95), and the
  same over every in-class track of the store the repeat never trained on (a larger sample).

The out-of-class set (``--ooc-dir``, default a temp folder): speech rendered with
``espeak-ng`` (a bench-only tool, GPL; never a runtime dependency of mtag: skipped with a
note when it is not installed), white/pink/brown noise, generated environmental sounds
(rain, engine, wind, birds; numpy, written with soundfile), and music of another kind (A:
demo tracks of instruments philharmonia lacks, piano/violin/trumpet/organ, and excerpts of
``/usr/share/games/singularity/music``; B: philharmonia notes and the same excerpts).

Output: a table, and ``bench/results/small-data-<time>.json`` (rewritten after every repeat).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _early_threads() -> int:
    """``--threads`` read before numpy/torch are imported (their pools size at import)."""
    n = 1
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            n = int(sys.argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(n))
    return n


_early_threads()

import benchenv  # noqa: E402  (first of the bench's own modules: repository on sys.path)

benchenv.apply_cli_defaults()  # bench/results/prefect-home unless PREFECT_HOME is set

import numpy as np  # noqa: E402

VERSION_PACKAGES = ("mtag", "numpy", "scipy", "torch", "scikit-learn", "mlflow", "soundfile")
PHILHARMONIA = os.path.join(benchenv.REPO, "..", "shared", "datasets", "philharmonia-dev")
GAME_MUSIC = "/usr/share/games/singularity/music"
SINGLES = ("linear", "gbm", "mfcc_cnn")  # flows.train.cv_candidates on CPU (checked at run)
ENSEMBLE = "ensemble"
PER_CLASS = 10
SPLIT = (("train", 6), ("valid", 2), ("test", 2))  # of the 10 per class: 60/20/20
OOC_TARGET, IN_TARGET = 0.80, 0.95
SR = 22050


# ----------------------------------------------------------------------------------------
# in-class pools
def philharmonia_pool(root: str) -> list[tuple[str, str]]:
    """``(absolute path, label)`` of every note of ``labels.csv``."""
    root = os.path.abspath(root)
    with open(os.path.join(root, "labels.csv"), newline="") as fh:
        return [(os.path.join(root, r["path"]), r["label"]) for r in csv.DictReader(fh)]


def demo_pool(folder: str, n_tracks: int, seed: int = 7) -> list[dict[str, str]]:
    """Render the demo catalogue (if not there yet); rows ``path``, ``label`` (instrument),
    ``style``.
    """
    from flows.demo import make_catalogue

    labels = make_catalogue(os.path.join(folder, "catalogue"), n_tracks, seed=seed, workers=1)
    base = os.path.dirname(labels)
    with open(labels, newline="") as fh:
        return [{"path": os.path.join(base, r["path"]), "instrument": r["label"],
                 "style": r["style"]} for r in csv.DictReader(fh)]


def draw(pool: list[tuple[str, str]], seed: int, per_class: int = PER_CLASS
         ) -> list[dict[str, str]]:
    """``per_class`` random tracks of every class, each with its split (6/2/2 per class)."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = defaultdict(list)
    for path, label in pool:
        by_class[label].append(path)
    rows = []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        picked = [paths[i] for i in rng.choice(len(paths), size=per_class, replace=False)]
        sides = [s for s, n in SPLIT for _ in range(n * per_class // PER_CLASS)]
        sides += ["train"] * (per_class - len(sides))
        rows += [{"path": p, "label": label, "split": s}
                 for p, s in zip(picked, sides, strict=True)]
    return rows


def write_labels(rows: list[dict[str, str]], path: str) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def write_manifest(paths: list[str], path: str) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri"])
        for p in paths:
            w.writerow([p])
    return path


# ----------------------------------------------------------------------------------------
# the out-of-class set
def _colored(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit peak."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    x = np.fft.irfft(spec / f ** (exponent / 2.0), n)
    return x / (np.abs(x).max() + 1e-9)


def _lowpass(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    return sosfilt(butter(4, cutoff_hz, "low", fs=SR, output="sos"), x)


def _bandpass(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    return sosfilt(butter(4, [lo, hi], "band", fs=SR, output="sos"), x)


def rain(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    bed = 0.25 * _bandpass(rng.standard_normal(n), 800, 8000)
    drops = np.zeros(n)
    for start in rng.integers(0, n - 2000, size=int(seconds * rng.uniform(40, 120))):
        length = int(rng.integers(200, 1500))
        burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 5))
        drops[start:start + length] += burst * rng.uniform(0.2, 1.0)
    return bed + _bandpass(drops, 1500, 9000)


def engine(rng: np.random.Generator, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(28, 70) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    hum = sum(np.sin(k * phase) / k ** 0.8 for k in range(1, 14))
    am = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(6, 16) * t)
    return hum * am + 0.3 * _lowpass(rng.standard_normal(len(t)), 1500)


def wind(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    t = np.arange(n) / SR
    gust = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t + rng.uniform(0, 6))
    gust *= 0.7 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 1.3) * t)
    return _lowpass(_colored(rng, n, 1.0), rng.uniform(500, 1500)) * gust


def birds(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    x = 0.02 * _colored(rng, n, 1.0)
    at = 0
    while at < n - SR // 2:
        at += int(rng.uniform(0.05, 0.6) * SR)
        length = int(rng.uniform(0.04, 0.2) * SR)
        if at + length >= n:
            break
        tt = np.arange(length) / SR
        f_start, f_end = rng.uniform(2000, 6000), rng.uniform(2000, 7000)
        freq = f_start + (f_end - f_start) * tt / tt[-1] + 300 * np.sin(2 * np.pi * 30 * tt)
        chirp = np.sin(2 * np.pi * np.cumsum(freq) / SR) * np.hanning(length)
        x[at:at + length] += rng.uniform(0.3, 1.0) * chirp
        at += length
    return x


SPEECH = [
    ("en-us", "The quick brown fox jumps over the lazy dog near the bank of the river."),
    ("en", "Please remember to switch off the lights before you leave the building tonight."),
    ("en-us", "Flight two hundred and six to Amsterdam is now boarding at gate fourteen."),
    ("en", "In the beginning the universe was created. This has made a lot of people very "
           "angry and been widely regarded as a bad move."),
    ("de", "Der Zug nach Berlin hat heute leider zwanzig Minuten Verspätung."),
    ("fr", "Bonjour à tous, la réunion commencera dans cinq minutes dans la grande salle."),
    ("es", "El tiempo de mañana será soleado con algunas nubes por la tarde."),
    ("it", "La cena è pronta, venite a tavola prima che si raffreddi tutto."),
    ("en-us", "One, two, three, four, five, six, seven, eight, nine, ten."),
    ("en", "Welcome to the evening news. Our top story tonight concerns the weather."),
    ("nl", "Goedemorgen, de winkel is vandaag geopend tot zes uur."),
    ("pt", "Obrigado por ligar. Todos os nossos atendentes estão ocupados no momento."),
]


def _write(path: str, x: np.ndarray, sr: int = SR) -> str:
    import soundfile as sf

    x = np.asarray(x, np.float64)
    sf.write(path, (0.8 * x / (np.abs(x).max() + 1e-9)).astype(np.float32), sr,
             subtype="PCM_16")
    return path


def game_excerpts(folder: str, n: int, seconds: float = 15.0) -> list[str]:
    """``n`` excerpts of ``seconds`` cut from the singularity soundtrack (mono wav)."""
    import soundfile as sf

    if not os.path.isdir(GAME_MUSIC):
        return []
    os.makedirs(folder, exist_ok=True)
    out = []
    for name in sorted(os.listdir(GAME_MUSIC))[:n]:
        with sf.SoundFile(os.path.join(GAME_MUSIC, name)) as f:
            start = min(int(30 * f.samplerate), max(0, f.frames - int(seconds * f.samplerate)))
            f.seek(start)
            x = f.read(int(seconds * f.samplerate), dtype="float32", always_2d=True).mean(1)
            sr = f.samplerate
        out.append(_write(os.path.join(folder, f"game-{len(out):02d}.wav"), x, sr))
    return out


def make_openset(folder: str, music: list[str], *, seed: int = 0, per_kind: int = 3
                 ) -> tuple[list[dict[str, str]], list[str]]:
    """Write the out-of-class set under ``folder``; rows ``path``, ``category``, ``kind``
    and notes (what was skipped). ``music``: files of another kind of music, used as they are.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows: list[dict[str, str]] = []
    notes: list[str] = []
    espeak = shutil.which("espeak-ng")
    if espeak:
        for i, (voice, text) in enumerate(SPEECH):
            path = os.path.join(folder, f"speech-{i:02d}-{voice}.wav")
            speed = str(int(rng.integers(130, 190)))
            subprocess.run([espeak, "-v", voice, "-s", speed, "-w", path, text], check=True,
                           capture_output=True)
            rows.append({"path": path, "category": "speech", "kind": f"espeak-ng {voice}"})
    else:
        notes.append("espeak-ng not installed: no speech in the open set "
                     "(apt-get install -y espeak-ng)")
    for kind, exponent in (("white", 0.0), ("pink", 1.0), ("brown", 2.0)):
        for j in range(per_kind):
            seconds = float(rng.uniform(2, 15))
            x = _colored(rng, int(seconds * SR), exponent)
            rows.append({"path": _write(os.path.join(folder, f"noise-{kind}-{j}.wav"), x),
                         "category": "noise", "kind": f"{kind} noise"})
    for kind, fn in (("rain", rain), ("engine", engine), ("wind", wind), ("birds", birds)):
        for j in range(per_kind):
            seconds = float(rng.uniform(3, 15))
            rows.append({"path": _write(os.path.join(folder, f"env-{kind}-{j}.wav"),
                                        fn(rng, seconds)),
                         "category": "environment", "kind": kind})
    rows += [{"path": p, "category": "music", "kind": kind} for p, kind in music]
    return rows, notes


# ----------------------------------------------------------------------------------------
# one protocol
def track_ids(store: str) -> dict[str, str]:
    """Every URI the store has seen -> its track id."""
    from featurestore.query import connect, run_query
    from featurestore.store import FeatureStore

    con = connect(FeatureStore(store))
    try:
        df = run_query(con, "SELECT uri, track_id FROM sources").to_pandas()
    finally:
        con.close()
    return dict(zip(df["uri"], df["track_id"], strict=True))


def confident_of(store: str, name: str, version: str) -> dict[str, bool]:
    """``track_id -> confident`` of one scored model version (the ``scores`` view)."""
    from featurestore.query import connect, run_query
    from featurestore.store import FeatureStore

    con = connect(FeatureStore(store), model=f"{name}/{version}")
    try:
        df = run_query(con, "SELECT track_id, confident FROM scores").to_pandas()
    finally:
        con.close()
    return dict(zip(df["track_id"], df["confident"].astype(bool), strict=True))


def safe_batch_size(store: str, labels: str, seed: int, prefer: int = 64) -> int:
    """The largest batch size <= ``prefer`` that leaves no training set of this repeat (each
    CV fold's train tracks, and the refit's train + valid) with a last batch of exactly one
    segment.

    Works around a trainer bug: ``training/loop.py`` builds the train loader with
    ``drop_last=False`` and the networks' embedding head has a ``BatchNorm1d``
    (``training/models.py``), so a training set of ``k * batch_size + 1`` segments ends the
    epoch with a one-row batch and ``ValueError: Expected more than 1 value per channel``.
    """
    from featurestore.query import connect, run_query
    from featurestore.store import FeatureStore
    from flows.train import checked_prepare
    from training.select import cv_folds

    con = connect(FeatureStore(store))
    try:
        df = run_query(con, "SELECT track_id, count(*) AS n FROM segments "
                            "GROUP BY track_id").to_pandas()
    finally:
        con.close()
    per_track = dict(zip(df["track_id"], df["n"], strict=True))
    prep = checked_prepare(store, labels, seed=seed)
    ids = prep.labels.frame["track_id"].to_numpy(object)
    segs = np.array([per_track.get(t, 0) for t in ids])
    sides = [np.asarray(f.to_numpy(object)) for f in cv_folds(prep.labels.frame, prep.splits,
                                                               seed=seed)]
    sizes = {int(segs[s == "train"].sum()) for s in sides}
    refit = prep.splits.to_numpy(object)
    sizes.add(int(segs[(refit == "train") | (refit == "valid")].sum()))
    for bs in range(prefer, 1, -1):
        if all(n % bs != 1 for n in sizes):
            return bs
    return prefer


def _share(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def open_set(conf: dict[str, bool], ooc: list[dict[str, str]], uri_tid: dict[str, str],
             test_ids: set[str], unseen_ids: set[str]) -> dict[str, Any]:
    """Flagged shares of the out-of-class rows (all and per category) and kept-confident
    shares of the in-class test and unseen tracks.
    """
    flagged: dict[str, list[bool]] = defaultdict(list)
    for row in ooc:
        tid = uri_tid.get(row["path"])
        if tid in conf:
            flagged[row["category"]].append(not conf[tid])
    every = [v for vs in flagged.values() for v in vs]
    test = [conf[t] for t in test_ids if t in conf]
    unseen = [conf[t] for t in unseen_ids if t in conf]
    return {"ooc_flagged": _share(every), "ooc_n": len(every),
            "ooc_by_category": {k: _share(v) for k, v in sorted(flagged.items())},
            "ooc_n_by_category": {k: len(v) for k, v in sorted(flagged.items())},
            "test_confident": _share(test), "test_n": len(test),
            "unseen_confident": _share(unseen), "unseen_n": len(unseen)}


def run_protocol(key: str, inclass: list[tuple[str, str]], ooc: list[dict[str, str]],
                 args: argparse.Namespace, work: str, address: str,
                 record: dict[str, Any], save: Any, *, ingest_all: bool = False) -> None:
    """Ingest once (the repeats' draws, or with ``ingest_all`` the whole in-class pool, and
    the open set), then per repeat: labels file, ``auto``, register and score each model.
    """
    from featurestore.store import FeatureStore
    from flows.ingest import run_ingest
    from flows.score import run_score
    from flows.train import cv_candidates, run_train
    from training import tracking

    store = os.path.join(work, f"store-{key}")
    draws = [draw(inclass, args.seed + r) for r in range(args.repeats)]
    in_paths = sorted({p for p, _ in inclass} if ingest_all else
                      {row["path"] for d in draws for row in d})
    proto = record["protocols"][key]
    proto |= {"store": store, "in_class_tracks": len(in_paths), "ooc_tracks": len(ooc),
              "classes": sorted({lab for _, lab in inclass}), "repeats": []}
    manifest = write_manifest(in_paths + [r["path"] for r in ooc],
                              os.path.join(work, f"manifest-{key}.csv"))
    print(f"\n== protocol {key}: ingesting {len(in_paths)} in-class + {len(ooc)} "
          f"out-of-class files into {store} ...", flush=True)
    t0 = time.perf_counter()
    ing = run_ingest(manifest, store, dask_address=address, progress=False)
    proto["ingest"] = {"wall_s": time.perf_counter() - t0, "ok": ing.ok,
                       "failed": ing.failed}
    print(ing.render(), flush=True)
    uri_tid = track_ids(store)
    in_ids = {uri_tid[p] for p in in_paths if p in uri_tid}
    expected = cv_candidates(len(draws[0]))
    if set(expected) != set(SINGLES):
        print(f"note: flows.train.cv_candidates now gives {expected}", flush=True)
    fstore = FeatureStore(store)
    for r, rows in enumerate(draws):
        labels = write_labels(rows, os.path.join(work, f"labels-{key}-r{r}.csv"))
        name = f"sd-{key}-r{r}"
        batch = safe_batch_size(store, labels, args.seed + r)
        t0 = time.perf_counter()
        summary = run_train(store, labels, model="auto", registered_name=name,
                            train_config={"seed": args.seed + r, "epochs": args.epochs,
                                          "batch_size": batch},
                            workdir=os.path.join(work, f"train-{key}-r{r}"))
        train_s = time.perf_counter() - t0
        used = {uri_tid[row["path"]] for row in rows if row["path"] in uri_tid}
        test_ids = {uri_tid[row["path"]] for row in rows
                    if row["split"] == "test" and row["path"] in uri_tid}
        rep: dict[str, Any] = {
            "repeat": r, "seed": args.seed + r, "labels": labels, "train_wall_s": train_s,
            "batch_size": batch,
            "split": summary.split, "chosen": summary.best["model"],
            "selection": {k: v for k, v in summary.selection.items() if k != "rule"},
            "candidates": {}}
        tracking.configure(fstore)
        for res in summary.candidates:
            model = res["model"]
            cand = {"test_macro_f1": res["test"]["macro_f1"],
                    "test_accuracy": res["test"]["accuracy"],
                    "cv": {k: (res.get("cv") or {}).get(k) for k in ("mean", "std", "se")},
                    "train_seconds": res["train_seconds"],
                    "members": [m["model"] for m in res.get("members", [])]}
            reg = f"{name}-{model}"
            version = tracking.register(res["model_uri"], reg, {"model": model,
                                                                 "bench": "small_data"})
            t1 = time.perf_counter()
            run_score(store, f"models:/{reg}/{version}", dask_address=address,
                      progress=False)
            cand["score_wall_s"] = time.perf_counter() - t1
            cand["open_set"] = open_set(confident_of(store, reg, version), ooc, uri_tid,
                                        test_ids, in_ids - used)
            cand["registered"] = f"{reg}/{version}"
            rep["candidates"][model] = cand
        singles = {m: c for m, c in rep["candidates"].items() if m != ENSEMBLE}
        best = max(singles, key=lambda m: singles[m]["test_macro_f1"])
        rep["best_single"] = best
        rep["auto"] = {"model": rep["chosen"],
                       **{k: rep["candidates"][rep["chosen"]][k]
                          for k in ("test_macro_f1", "test_accuracy", "open_set")}}
        proto["repeats"].append(rep)
        print(repeat_line(key, rep), flush=True)
        save()


def repeat_line(key: str, rep: dict[str, Any]) -> str:
    c = rep["candidates"]
    cells = ", ".join(f"{m} {v['test_macro_f1']:.3f} (CV {v['cv']['mean']:.3f})"
                      for m, v in c.items())
    ens = c.get(ENSEMBLE, {}).get("open_set", {})
    auto = rep["auto"]["open_set"]
    return (f"  {key} repeat {rep['repeat']}: auto chose {rep['chosen']} "
            f"({rep['auto']['test_macro_f1']:.3f}); best in hindsight {rep['best_single']}; "
            f"{cells}; open set auto: flagged {auto['ooc_flagged']:.2f}, test confident "
            f"{auto['test_confident']:.2f}; ensemble: flagged {ens.get('ooc_flagged', 0):.2f}"
            f"; train {rep['train_wall_s']:.0f} s")


# ----------------------------------------------------------------------------------------
# aggregation
def mean_std(values: list[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def aggregate(proto: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std (ddof 1) over repeats of test macro-F1 and accuracy per column, the
    verdicts, and the open-set shares per model.
    """
    reps = proto["repeats"]
    if not reps:
        return {}
    models = list(reps[0]["candidates"])

    def col(fn: Any) -> dict[str, dict[str, Any]]:
        return {"macro_f1": mean_std([fn(r)["test_macro_f1"] for r in reps]),
                "accuracy": mean_std([fn(r)["test_accuracy"] for r in reps])}

    table = {"auto": col(lambda r: r["auto"]),
             "best_in_hindsight": col(lambda r: r["candidates"][r["best_single"]])}
    for m in models:
        table[m] = col(lambda r, m=m: r["candidates"][m])
    best, auto = table["best_in_hindsight"]["macro_f1"], table["auto"]["macro_f1"]
    out: dict[str, Any] = {"table": table,
                           "chosen": dict(sorted(_count(r["chosen"] for r in reps).items())),
                           "best_single": dict(sorted(_count(
                               r["best_single"] for r in reps).items()))}
    out["auto_within_spread"] = {
        "rule": "|mean(auto) - mean(best in hindsight)| <= std(best in hindsight), test "
                "macro-F1 over repeats, std with ddof 1",
        "gap": auto["mean"] - best["mean"], "std_best": best["std"],
        "met": abs(auto["mean"] - best["mean"]) <= best["std"] + 1e-12}
    if ENSEMBLE in table:
        ens = table[ENSEMBLE]["macro_f1"]
        out["ensemble_vs_best"] = {
            "rule": "met: mean(ensemble) >= mean(best in hindsight); within spread: "
                    "mean(ensemble) >= mean(best) - std(best)",
            "gap": ens["mean"] - best["mean"], "std_best": best["std"],
            "met": ens["mean"] >= best["mean"] - 1e-12,
            "within_spread": ens["mean"] >= best["mean"] - best["std"] - 1e-12}
    opens: dict[str, Any] = {}
    for m in [*models, "auto"]:
        get = (lambda r: r["auto"]["open_set"]) if m == "auto" else (
            lambda r, m=m: r["candidates"][m]["open_set"])
        o = {k: mean_std([get(r)[k] for r in reps])
             for k in ("ooc_flagged", "test_confident", "unseen_confident")}
        cats = sorted({c for r in reps for c in get(r)["ooc_by_category"]})
        o["by_category"] = {c: mean_std([get(r)["ooc_by_category"].get(c) for r in reps])
                            for c in cats}
        o["ooc_met"] = o["ooc_flagged"]["mean"] is not None and \
            o["ooc_flagged"]["mean"] >= OOC_TARGET
        o["test_met"] = o["test_confident"]["mean"] is not None and \
            o["test_confident"]["mean"] >= IN_TARGET
        opens[m] = o
    out["open_set"] = opens
    return out


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(out)


def _ms(d: dict[str, Any], digits: int = 3) -> str:
    if d.get("mean") is None:
        return "–"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def render(record: dict[str, Any]) -> str:
    lines = []
    for key, proto in record["protocols"].items():
        agg = proto.get("aggregate") or {}
        if not agg:
            continue
        n = len(proto["repeats"])
        lines.append(f"\n== protocol {key} ({proto['name']}): {len(proto['classes'])} classes, "
                     f"{PER_CLASS} per class, 6/2/2 split, {n} repeats; mean ± std (ddof 1)")
        lines.append(f"  {'column':20s} {'test macro-F1':>16s} {'test accuracy':>16s}")
        for col, v in agg["table"].items():
            lines.append(f"  {col:20s} {_ms(v['macro_f1']):>16s} {_ms(v['accuracy']):>16s}")
        lines.append(f"  auto chose: {agg['chosen']}; best in hindsight: {agg['best_single']}")
        w = agg["auto_within_spread"]
        lines.append(f"  auto within spread of best in hindsight: "
                     f"{'MET' if w['met'] else 'MISSED'} (gap {w['gap']:+.3f}, std of best "
                     f"{w['std_best']:.3f})")
        if "ensemble_vs_best" in agg:
            e = agg["ensemble_vs_best"]
            lines.append(f"  ensemble >= best in hindsight: {'MET' if e['met'] else 'MISSED'} "
                         f"(gap {e['gap']:+.3f}; within its spread: "
                         f"{'yes' if e['within_spread'] else 'no'})")
        lines.append(f"  open set ({proto['ooc_tracks']} out-of-class tracks; targets: "
                     f"flagged >= {OOC_TARGET:.2f}, test kept confident >= {IN_TARGET:.2f})")
        cats = sorted({c for o in agg["open_set"].values() for c in o["by_category"]})
        lines.append(f"  {'model':10s} {'OOC flagged':>14s} {'test conf.':>14s} "
                     f"{'unseen conf.':>14s}  " + "  ".join(f"{c:>12s}" for c in cats))
        for m, o in agg["open_set"].items():
            lines.append(
                f"  {m:10s} {_ms(o['ooc_flagged'], 2):>14s} {_ms(o['test_confident'], 2):>14s}"
                f" {_ms(o['unseen_confident'], 2):>14s}  "
                + "  ".join(f"{_ms(o['by_category'].get(c, {}), 2):>12s}" for c in cats)
                + f"  [{'met' if o['ooc_met'] else 'missed'}/"
                  f"{'met' if o['test_met'] else 'missed'}]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--protocols", nargs="+", default=["A", "B"], choices=["A", "B"])
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--quick", action="store_true",
                    help="2 repeats, a smaller demo pool, 15 epochs")
    ap.add_argument("--epochs", type=int, help="network epochs (default 30, quick 15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--philharmonia", default=PHILHARMONIA)
    ap.add_argument("--pool-per-style", type=int, help="demo tracks per style (default 40, "
                                                       "quick 20)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP/torch threads of this process (default 1)")
    ap.add_argument("--workers", type=int, default=1, help="Dask workers for ingest/score")
    ap.add_argument("--workdir", help="stores, labels, open set (default: a temp folder, "
                                      "removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="print the tables of results files (several: merged) and exit")
    args = ap.parse_args()
    if args.render:
        merged: dict[str, Any] = {"protocols": {}}
        for path in args.render:
            with open(path) as fh:
                merged["protocols"] |= json.load(fh)["protocols"]
        for proto in merged["protocols"].values():
            proto["aggregate"] = aggregate(proto)
        print(render(merged))
        return
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.epochs = args.epochs or (15 if args.quick else 30)
    args.pool_per_style = args.pool_per_style or (20 if args.quick else 40)

    import torch

    torch.set_num_threads(args.threads)
    from flows.cluster import dask_cluster

    started = time.perf_counter()
    work = args.workdir or tempfile.mkdtemp(prefix="mtag-small-data-")
    os.makedirs(work, exist_ok=True)
    record: dict[str, Any] = {
        "machine": benchenv.environment(VERSION_PACKAGES, code_paths=(
            *benchenv.PIPELINE_CODE, "training")),
        "started": benchenv.now(), "args": vars(args), "workdir": work,
        "targets": {"ooc_flagged": OOC_TARGET, "test_confident": IN_TARGET},
        "protocols": {}, "notes": []}
    out = args.out or benchenv.result_path("small-data")

    def save() -> None:
        for proto in record["protocols"].values():
            proto["aggregate"] = aggregate(proto)
        record["loadavg_now"] = os.getloadavg()
        record["wall_s"] = time.perf_counter() - started
        benchenv.write_json(record, "small-data", out)

    print(f"work folder {work}; {args.repeats} repeats; results -> {out}", flush=True)
    phil = philharmonia_pool(args.philharmonia)
    demo = demo_pool(os.path.join(work, "demo"), 3 * args.pool_per_style)
    games = game_excerpts(os.path.join(work, f"ooc-music-{''.join(args.protocols)}"), 4)
    rng = np.random.default_rng(args.seed + 1000)
    phil_classes = {lab for _, lab in phil}
    other_demo = [r["path"] for r in demo if r["instrument"] not in phil_classes]
    demo_music = [(other_demo[i], "demo music") for i in
                  rng.choice(len(other_demo), size=min(8, len(other_demo)), replace=False)]
    notes = [(phil[i][0], "philharmonia note") for i in
             rng.choice(len(phil), size=8, replace=False)]
    games_music = [(p, "singularity excerpt") for p in games]
    with dask_cluster(None, n_workers=args.workers) as cluster:
        for key in args.protocols:
            if key == "A":
                inclass = phil
                music = demo_music + games_music
                name = "philharmonia-dev instruments"
            else:
                inclass = [(r["path"], r["style"]) for r in demo]
                music = notes + games_music
                name = "demo rendered styles"
            ooc, ooc_notes = make_openset(os.path.join(work, f"ooc-{key}"), music,
                                          seed=args.seed + (1 if key == "A" else 2))
            record["notes"] += [n for n in ooc_notes if n not in record["notes"]]
            record["protocols"][key] = {"name": name, "ooc": ooc}
            run_protocol(key, inclass, ooc, args, work, cluster.address, record, save,
                         ingest_all=key == "B")  # the rendered pool is small: all of it
    record["finished"] = benchenv.now()
    save()
    print(render(record))
    print(f"\nwall {record['wall_s']:.0f} s; load at start "
          f"{record['machine']['loadavg_start'][0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"results written to {out}")
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
