#!/usr/bin/env python
"""Agreement of our track descriptors (tempo, key, loudness) with Essentia's, on real files.

    .venv/bin/python bench/descriptors_agreement.py --source DIR [--source DIR2] \
        [--essentia-python /tmp/essentia-env/bin/python] [--limit N] [--jobs 2]

For each source: ``mtag ingest DIR --store <temp> --no-progress --workers W`` (the CLI, as a
user runs it), then ``mtag query --format json`` for the ``tracks`` descriptors of the files
that ingested ``ok``; then a helper under a *separate* Python with Essentia computes, on the same
files, RhythmExtractor2013 (multifeature) BPM, KeyExtractor keys (profiles temperley, edma,
bgate) and EBU R128 loudness (LoudnessEBUR128 on the stereo native-rate signal from
AudioLoader: integrated, LRA; TruePeakDetector, BS.1770-4 flow, 4x, max over channels).

**Licence**: Essentia is AGPL-3.0. It is never a dependency of this project and never imported
here or by the package: the helper (:data:`REF_SOURCE`) is written next to the Essentia venv's
Python (``<venv>/ref.py``) and run as a subprocess; this script only parses its JSON lines.
Install it apart: ``python3 -m venv /tmp/essentia-env && /tmp/essentia-env/bin/pip install
essentia numpy``.

Reported per source (the reference is Essentia, or the known answer where there is one):

* tempo: share within 4 % (MIREX/Essentia "accuracy 1"), share within 4 % of 1, 2, 1/2, 3 or
  1/3 times the reference ("accuracy 2", octave errors allowed), median |% error|, and how
  the ratios fall (x1, x2, x1/2, x3, x1/3, x3/2, x2/3, x4/3, x3/4, other);
* key: exact (tonic and mode), MIREX categories (fifth above 0.5, relative 0.3, parallel 0.2;
  as ``mir_eval.key.weighted_score``, ascending fifths only; a fifth below is listed apart),
  "close" = any of them (score > 0), and the mean MIREX weighted score;
* loudness: median and max |Δ| of integrated loudness (LU), of LRA (LU) and of true peak (dB),
  with the median signed Δ (ours minus Essentia) to show systematic offsets.

Files of the demo catalogue (``flows.demo.make_catalogue``) carry ``<style> <instrument>
<seed>`` as title tag; their tonic, mode and tempo are recomputed from the seed (the first
draws of ``tasks.synth._compose``, as ``bench/descriptors_cost.py`` does), so both estimators
are also scored against the truth. Writes ``bench/results/descriptors-agreement-<time>.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # benchenv's `git status`: never write .git

import benchenv  # noqa: I001  (first: puts the repository on sys.path)

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = benchenv.REPO
PY = sys.executable
KEY_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLATS = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#", "Cb": "B", "Fb": "E",
         "E#": "F", "B#": "C"}
PROFILES = ("temperley", "edma", "bgate")
TEMPO_TOL = 0.04
OCTAVES = (1.0, 2.0, 0.5, 3.0, 1 / 3)
RATIO_CLASSES = (("x1", 1.0), ("x2", 2.0), ("x1/2", 0.5), ("x3", 3.0), ("x1/3", 1 / 3),
                 ("x3/2", 1.5), ("x2/3", 2 / 3), ("x4/3", 4 / 3), ("x3/4", 0.75))
QUERY = ("SELECT path, title, format, sample_rate, channels, duration_s, tempo_bpm, "
         "tempo_confidence, key, mode, key_strength, loudness_lufs, loudness_range_lu, "
         "true_peak_dbtp FROM tracks WHERE status='ok' ORDER BY path")

# The helper run under the Essentia venv (AGPL-3.0: it stays outside the package).
REF_SOURCE = r'''
"""Essentia reference descriptors, one JSON line per file (written by
bench/descriptors_agreement.py; run only under the separate Essentia venv)."""
import argparse, json, math, sys, time
from multiprocessing import Pool

PROFILES = ("temperley", "edma", "bgate")


def _db(x):
    return 20.0 * math.log10(x) if x > 0 else None


def analyse(path):
    import numpy as np
    import essentia.standard as es

    out, t = {"path": path}, {}
    try:
        t0 = time.process_time()
        audio, sr, channels, _, _, codec = es.AudioLoader(filename=path)()
        t["decode"] = time.process_time() - t0
        out.update(native_rate=float(sr), channels=int(channels), codec=codec,
                   duration_s=audio.shape[0] / float(sr))
        # EBU R128 on the stereo native-rate signal. AudioLoader always gives 2 channels (a
        # mono file twice); BS.1770 sums channel powers, so take 3.01 LU off for mono files.
        t0 = time.process_time()
        _, _, lufs, lra = es.LoudnessEBUR128(sampleRate=sr)(audio)
        if channels == 1:
            lufs -= 10.0 * math.log10(2.0)
        out.update(lufs=float(lufs), lra=float(lra))
        t["loudness"] = time.process_time() - t0
        # True peak: TruePeakDetector (BS.1770-4 flow, 4x) per channel; `output` is the
        # |oversampled signal|. quality=2 (libsamplerate's fastest sinc) is 2x cheaper than
        # the default 1 and agreed with it within 1e-5 dB on this material.
        t0 = time.process_time()
        tpd = es.TruePeakDetector(sampleRate=sr, version=4, oversamplingFactor=4, quality=2)
        used = [0] if channels == 1 else [0, 1]
        tp = max(float(np.max(tpd(np.ascontiguousarray(audio[:, c]))[1])) for c in used)
        out.update(true_peak_dbtp=_db(tp),
                   sample_peak_dbfs=_db(float(np.max(np.abs(audio[:, used])))))
        t["true_peak"] = time.process_time() - t0
        # Tempo and key on the mono mix at 44.1 kHz (RhythmExtractor2013 requires 44.1 kHz):
        # what MonoLoader does (mix, then Resample), without decoding the file twice.
        t0 = time.process_time()
        mono = np.ascontiguousarray(audio[:, used].mean(axis=1), dtype=np.float32)
        del audio
        if sr != 44100:
            mono = es.Resample(inputSampleRate=sr, outputSampleRate=44100, quality=1)(mono)
        t["resample"] = time.process_time() - t0
        t0 = time.process_time()
        bpm, ticks, conf, _, _ = es.RhythmExtractor2013(method="multifeature")(mono)
        out.update(bpm=float(bpm), bpm_confidence=float(conf), ticks=len(ticks))
        t["rhythm"] = time.process_time() - t0
        t0 = time.process_time()
        for prof in PROFILES:
            key, scale, strength = es.KeyExtractor(profileType=prof, sampleRate=44100)(mono)
            out["key_" + prof] = {"key": key, "mode": scale, "strength": float(strength)}
        t["key"] = time.process_time() - t0
    except Exception as exc:  # one bad file must not end the run
        out["error"] = type(exc).__name__ + ": " + str(exc)
    out["cpu_s"] = t
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    paths = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    import essentia
    import essentia.standard  # noqa: F401  (loaded once, before the pool forks)

    essentia.log.infoActive = False
    print(json.dumps({"meta": {"essentia": essentia.__version__, "files": len(paths),
                               "jobs": args.jobs}}), flush=True)
    if args.jobs > 1:
        with Pool(args.jobs) as pool:
            for row in pool.imap_unordered(analyse, paths):
                print(json.dumps(row), flush=True)
    else:
        for p in paths:
            print(json.dumps(analyse(p)), flush=True)


if __name__ == "__main__":
    main()
'''


# ----------------------------------------------------------------------------------------
# running the two sides
def run_ours(source: str, store: str, workers: int) -> tuple[list[dict], dict[str, float]]:
    """Ingest ``source`` with the CLI and read the ok tracks' descriptors back as JSON."""
    t0 = time.perf_counter()
    cmd = [PY, "-m", "flows.cli", "ingest", source, "--store", store, "--no-progress",
           "--workers", str(workers)]
    print("$ " + " ".join(_q(c) for c in cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    ingest_s = time.perf_counter() - t0
    summary = [ln for ln in done.stdout.splitlines() if ln.strip()][-2:]
    for ln in summary:
        print("  " + ln)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"ingest failed (rc {done.returncode})")
    t0 = time.perf_counter()
    cmd = [PY, "-m", "flows.cli", "query", "--store", store, "--format", "json", QUERY]
    print("$ " + " ".join(_q(c) for c in cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    return rows, {"ingest_wall_s": ingest_s, "query_wall_s": time.perf_counter() - t0,
                  "ingest_summary": summary}


def run_essentia(python: str, paths: list[str], jobs: int) -> tuple[dict[str, dict], dict]:
    """Run :data:`REF_SOURCE` under ``python`` on ``paths``; its rows by path, and meta."""
    ref = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(python))), "ref.py")
    with open(ref, "w") as fh:
        fh.write(REF_SOURCE)
    cmd = [python, ref, "--jobs", str(jobs)]
    print(f"$ {' '.join(_q(c) for c in cmd)} < ({len(paths)} paths)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("".join(p + "\n" for p in paths))
    proc.stdin.close()
    rows: dict[str, dict] = {}
    meta: dict[str, Any] = {}
    for line in proc.stdout:
        line = line.strip()
        if not line.startswith("{"):
            continue  # Essentia's own log lines
        row = json.loads(line)
        if "meta" in row:
            meta = row["meta"]
            continue
        rows[row["path"]] = row
        print(f"  essentia {len(rows):3d}/{len(paths)}  {time.perf_counter() - t0:6.0f} s  "
              f"{os.path.basename(row['path'])}" + (f"  ERROR {row['error']}"
                                                    if "error" in row else ""), flush=True)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"essentia helper failed (rc {proc.returncode})")
    cpu: dict[str, float] = {}
    for r in rows.values():
        for k, v in r.get("cpu_s", {}).items():
            cpu[k] = cpu.get(k, 0.0) + v
    meta.update(wall_s=time.perf_counter() - t0, cpu_s=cpu, helper=ref)
    return rows, meta


def _q(s: str) -> str:
    return f'"{s}"' if any(c in s for c in " '*") else s


# ----------------------------------------------------------------------------------------
# truth for the demo catalogue
def demo_truth(title: str | None) -> dict | None:
    """Tonic, mode and tempo of a demo file from its ``<style> <instrument> <seed>`` title.

    The draws mirror ``tasks.synth._compose``'s order (mode, tonic, progression, tempo), as
    ``bench/descriptors_cost.py``'s ``_synth_truth`` does.
    """
    import numpy as np

    from tasks.synth import _PROGRESSIONS, INSTRUMENTS, STYLES

    parts = (title or "").split()
    if len(parts) != 3 or parts[0] not in STYLES or parts[1] not in INSTRUMENTS \
            or not parts[2].isdigit():
        return None
    rng = np.random.default_rng(int(parts[2]))
    mode = "major" if rng.random() < 0.6 else "minor"
    tonic = int(rng.integers(0, 12))
    rng.integers(len(_PROGRESSIONS[mode]))
    bpm = float(rng.uniform(*STYLES[parts[0]].tempo))
    return {"style": parts[0], "instrument": parts[1], "key": KEY_NAMES[tonic], "mode": mode,
            "bpm": bpm}


# ----------------------------------------------------------------------------------------
# scores
def tempo_class(est: float, ref: float) -> str:
    r = est / ref
    for name, m in RATIO_CLASSES:
        if abs(r / m - 1) <= TEMPO_TOL:
            return name
    return "other"


def tempo_stats(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """``pairs`` of (estimate, reference) BPM, both present."""
    n = len(pairs)
    if not n:
        return {"n": 0}
    acc1 = sum(abs(e / r - 1) <= TEMPO_TOL for e, r in pairs)
    acc2 = sum(any(abs(e / (m * r) - 1) <= TEMPO_TOL for m in OCTAVES) for e, r in pairs)
    errs = [abs(e / r - 1) * 100 for e, r in pairs]
    classes: dict[str, int] = {}
    for e, r in pairs:
        c = tempo_class(e, r)
        classes[c] = classes.get(c, 0) + 1
    return {"n": n, "within_4pct": acc1 / n, "within_4pct_octave": acc2 / n,
            "median_abs_pct_err": statistics.median(errs), "ratio_classes": classes}


def norm_key(k: str | None) -> str | None:
    return None if k is None else FLATS.get(k, k)


def key_relation(est: tuple[str, str], ref: tuple[str, str]) -> str:
    """MIREX relation of an estimated (tonic, mode) to the reference (mir_eval's rules)."""
    e, r = KEY_NAMES.index(norm_key(est[0])), KEY_NAMES.index(norm_key(ref[0]))
    d = (e - r) % 12
    if est[1] == ref[1]:
        return "exact" if d == 0 else "fifth" if d == 7 else "fifth_below" if d == 5 \
            else "other"
    if d == 0:
        return "parallel"
    if (ref[1] == "major" and d == 9) or (ref[1] == "minor" and d == 3):
        return "relative"
    return "other"


MIREX = {"exact": 1.0, "fifth": 0.5, "relative": 0.3, "parallel": 0.2}


def key_stats(pairs: list[tuple[tuple[str, str], tuple[str, str]]]) -> dict[str, Any]:
    n = len(pairs)
    if not n:
        return {"n": 0}
    rel = [key_relation(e, r) for e, r in pairs]
    counts = {c: rel.count(c) for c in ("exact", "fifth", "relative", "parallel",
                                        "fifth_below", "other")}
    return {"n": n, "exact": counts["exact"] / n,
            "close": sum(c in MIREX for c in rel) / n,
            "mirex": sum(MIREX.get(c, 0.0) for c in rel) / n, "relations": counts}


def diff_stats(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    n = len(pairs)
    if not n:
        return {"n": 0}
    d = [a - b for a, b in pairs]
    ad = [abs(x) for x in d]
    return {"n": n, "median_abs": statistics.median(ad), "max_abs": max(ad),
            "median_signed": statistics.median(d), "mean_signed": statistics.fmean(d)}


def _ok(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def analyse_source(ours: list[dict], ess: dict[str, dict]) -> dict[str, Any]:
    rows = []
    for o in ours:
        e = ess.get(o["path"])
        if e is None:
            continue
        truth = demo_truth(o.get("title"))
        rows.append({"ours": o, "essentia": e, "truth": truth})
    good = [r for r in rows if "error" not in r["essentia"]]
    out: dict[str, Any] = {"files": len(rows), "essentia_errors": len(rows) - len(good)}

    def tpairs(get_e, get_r) -> list[tuple[float, float]]:
        ps = []
        for r in good:
            a, b = get_e(r), get_r(r)
            if _ok(a) and _ok(b) and a > 0 and b > 0:
                ps.append((a, b))
        return ps

    def ours_key(r):
        o = r["ours"]
        return (o["key"], o["mode"]) if o.get("key") and o.get("mode") else None

    def ess_key(prof):
        def get(r):
            k = r["essentia"].get(f"key_{prof}")
            return (k["key"], k["mode"]) if k else None
        return get

    def truth_key(r):
        t = r["truth"]
        return (t["key"], t["mode"]) if t else None

    def kpairs(get_e, get_r):
        ps = []
        for r in good:
            a, b = get_e(r), get_r(r)
            if a and b:
                ps.append((a, b))
        return ps

    out["tempo"] = {"ours_vs_essentia": tpairs(lambda r: r["ours"]["tempo_bpm"],
                                               lambda r: r["essentia"]["bpm"])}
    out["key"] = {f"ours_vs_essentia_{p}": kpairs(ours_key, ess_key(p)) for p in PROFILES}
    out["key"]["essentia_temperley_vs_edma"] = kpairs(ess_key("temperley"), ess_key("edma"))
    if any(r["truth"] for r in good):
        out["tempo"]["ours_vs_truth"] = tpairs(
            lambda r: r["ours"]["tempo_bpm"], lambda r: r["truth"] and r["truth"]["bpm"])
        out["tempo"]["essentia_vs_truth"] = tpairs(
            lambda r: r["essentia"]["bpm"], lambda r: r["truth"] and r["truth"]["bpm"])
        out["key"]["ours_vs_truth"] = kpairs(ours_key, truth_key)
        for p in PROFILES:
            out["key"][f"essentia_{p}_vs_truth"] = kpairs(ess_key(p), truth_key)
    out["tempo"] = {k: tempo_stats(v) for k, v in out["tempo"].items()}
    out["key"] = {k: key_stats(v) for k, v in out["key"].items()}
    lpairs = {
        "integrated_lufs": ("loudness_lufs", "lufs"),
        "lra_lu": ("loudness_range_lu", "lra"),
        "true_peak_db": ("true_peak_dbtp", "true_peak_dbtp"),
    }
    out["loudness"] = {}
    for name, (ok_, ek) in lpairs.items():
        ps = [(r["ours"][ok_], r["essentia"][ek]) for r in good
              if _ok(r["ours"].get(ok_)) and _ok(r["essentia"].get(ek))]
        out["loudness"][name] = diff_stats(ps)
    out["per_file"] = [_per_file(r) for r in rows]
    return out


def _per_file(r: dict) -> dict[str, Any]:
    o, e, t = r["ours"], r["essentia"], r["truth"]
    d = {"path": o["path"], "format": o.get("format"), "sample_rate": o.get("sample_rate"),
         "channels": o.get("channels"), "duration_s": o.get("duration_s"),
         "ours": {k: o.get(k) for k in ("tempo_bpm", "tempo_confidence", "key", "mode",
                                         "key_strength", "loudness_lufs", "loudness_range_lu",
                                         "true_peak_dbtp")},
         "essentia": {k: v for k, v in e.items() if k != "path"}, "truth": t}
    if "error" not in e:
        if _ok(o.get("tempo_bpm")) and _ok(e.get("bpm")) and e["bpm"] > 0:
            d["tempo_ratio_ours_over_essentia"] = o["tempo_bpm"] / e["bpm"]
        for k, ek in (("loudness_lufs", "lufs"), ("loudness_range_lu", "lra"),
                      ("true_peak_dbtp", "true_peak_dbtp")):
            if _ok(o.get(k)) and _ok(e.get(ek)):
                d[f"delta_{k}"] = o[k] - e[ek]
    return d


# ----------------------------------------------------------------------------------------
# printing
def _pct(x: float | None) -> str:
    return "    -" if x is None else f"{100 * x:4.0f}%"


def print_source(name: str, res: dict[str, Any]) -> None:
    print(f"\n=== {name}: {res['files']} files compared, essentia errors "
          f"{res['essentia_errors']}, {res['audio_min']:.1f} min of audio")
    print(f"{'tempo':28} {'n':>4} {'<=4%':>6} {'oct<=4%':>8} {'med|err|%':>10}  ratio classes")
    for k, s in res["tempo"].items():
        if not s["n"]:
            continue
        cls = " ".join(f"{c}:{v}" for c, v in sorted(s["ratio_classes"].items(),
                                                      key=lambda kv: -kv[1]))
        print(f"{k:28} {s['n']:4d} {_pct(s['within_4pct']):>6} "
              f"{_pct(s['within_4pct_octave']):>8} {s['median_abs_pct_err']:10.2f}  {cls}")
    print(f"{'key':28} {'n':>4} {'exact':>6} {'close':>6} {'MIREX':>6}  "
          "exact/fifth/relative/parallel/fifth-below/other")
    for k, s in res["key"].items():
        if not s["n"]:
            continue
        c = s["relations"]
        print(f"{k:28} {s['n']:4d} {_pct(s['exact']):>6} {_pct(s['close']):>6} "
              f"{s['mirex']:6.3f}  {c['exact']}/{c['fifth']}/{c['relative']}/{c['parallel']}/"
              f"{c['fifth_below']}/{c['other']}")
    print(f"{'loudness (ours - essentia)':28} {'n':>4} {'med|Δ|':>8} {'max|Δ|':>8} "
          f"{'med Δ':>8} {'mean Δ':>8}")
    for k, s in res["loudness"].items():
        if not s["n"]:
            continue
        print(f"{k:28} {s['n']:4d} {s['median_abs']:8.3f} {s['max_abs']:8.3f} "
              f"{s['median_signed']:+8.3f} {s['mean_signed']:+8.3f}")
    print(f"wall: ours ingest {res['timing']['ingest_wall_s']:.0f} s, essentia "
          f"{res['timing']['essentia_wall_s']:.0f} s (CPU "
          + ", ".join(f"{k} {v:.0f}" for k, v in res["timing"]["essentia_cpu_s"].items())
          + " s)")


def print_examples(name: str, res: dict[str, Any], n: int = 5) -> None:
    pf = [p for p in res["per_file"] if "error" not in p["essentia"]]
    print(f"--- {name}: largest disagreements")
    worst = sorted((p for p in pf if "tempo_ratio_ours_over_essentia" in p),
                   key=lambda p: -abs(math.log(p["tempo_ratio_ours_over_essentia"])))[:n]
    for p in worst:
        t = f" truth {p['truth']['bpm']:.1f}" if p["truth"] else ""
        print(f"  tempo {p['ours']['tempo_bpm']:7.2f} vs ess {p['essentia']['bpm']:7.2f}{t}"
              f"  (x{p['tempo_ratio_ours_over_essentia']:.3f})  {_short(p['path'])}")
    for k in ("delta_loudness_lufs", "delta_loudness_range_lu", "delta_true_peak_dbtp"):
        worst = sorted((p for p in pf if k in p), key=lambda p: -abs(p[k]))[:3]
        for p in worst:
            print(f"  {k[6:]:18} Δ {p[k]:+7.3f}  ({p['sample_rate']} Hz {p['format']}, "
                  f"{p['duration_s']:.1f} s)  {_short(p['path'])}")


def _short(path: str) -> str:
    return "/".join(path.split("/")[-2:])


# ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", action="append", required=True, help="folder (repeatable)")
    ap.add_argument("--essentia-python", default="/tmp/essentia-env/bin/python")
    ap.add_argument("--limit", type=int, default=None,
                    help="compare only N ok files per source (evenly spaced by path)")
    ap.add_argument("--jobs", type=int, default=2, help="Essentia helper processes")
    ap.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    ap.add_argument("--keep-stores", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    started = time.perf_counter()
    env = benchenv.environment(("mtag", "numpy", "numba", "scipy", "soundfile", "soxr"))
    ver = subprocess.run([args.essentia_python, "-c",
                          "import essentia; print(essentia.__version__)"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
    env["essentia"] = {"python": args.essentia_python, "version": ver[-1] if ver else None,
                       "licence": "AGPL-3.0 (separate venv, subprocess only)"}
    result: dict[str, Any] = {"machine": env, "started": benchenv.now(),
                              "limit": args.limit, "jobs": args.jobs,
                              "workers": args.workers, "sources": {}}
    tmp = tempfile.mkdtemp(prefix="descriptors-agreement-")
    try:
        for i, source in enumerate(args.source):
            source = os.path.abspath(source)
            name = os.path.basename(source.rstrip("/")) or source
            store = os.path.join(tmp, f"store-{i}")
            print(f"\n### {source}", flush=True)
            ours, timing = run_ours(source, store, args.workers)
            if args.limit is not None and len(ours) > args.limit:  # evenly spaced, by path
                ours = [ours[(j * len(ours)) // args.limit] for j in range(args.limit)]
            ess, meta = run_essentia(args.essentia_python, [o["path"] for o in ours],
                                     args.jobs)
            res = analyse_source(ours, ess)
            res["source"] = source
            res["audio_min"] = sum(o.get("duration_s") or 0 for o in ours) / 60
            res["timing"] = timing | {"essentia_wall_s": meta["wall_s"],
                                      "essentia_cpu_s": meta["cpu_s"], "essentia_meta": meta}
            result["sources"][name] = res
            print_source(name, res)
            print_examples(name, res)
    finally:
        if args.keep_stores:
            print(f"stores kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["finished"] = benchenv.now()
    result["wall_s"] = time.perf_counter() - started
    result["machine"]["loadavg_end"] = os.getloadavg()
    path = benchenv.write_json(result, "descriptors-agreement", args.out)
    print(f"\ntotal wall {result['wall_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
