#!/usr/bin/env python
"""The GPU path against the CPU one, in one run: features, ingest, training, scoring.

    .venv/bin/python bench/gpu_bench.py --out bench/results/gpu.json [--source FOLDER]

Self-contained: unless ``--source`` names a folder of audio (with ``--labels``), it renders a
labelled demo catalogue (``flows.demo.make_catalogue``: General MIDI music, 6 instruments,
mixed formats and rates) into a temporary folder. Then:

(a) **Feature extraction in process**, on the same buffers: every catalogue track decoded,
    mixed to mono and resampled (CPU), cut into 3-s segment buffers as the segmenter frames
    them. Segments/s and x realtime of the numpy ``SpectralExtractor`` (one thread, a call per
    segment: one worker core) against ``TorchSpectralExtractor`` on CUDA (a call per segment,
    and ``frames_batch`` of 64 and 512 segments; host-device copies included), and the
    largest differences per field (absolute, and relative to the field's largest value;
    rolloff: share of frames on another bin). Then the whole per-track path
    (``extract_track``: decode, resample, stream, summaries) with each extractor.
(b) **Whole ``mtag ingest``** of the catalogue as a subprocess on a fresh store with
    ``MTAG_FEATURE_DEVICE=cpu`` and ``=auto`` (CUDA here), alternating, median of
    ``--repeats`` (default 3); wall time of the command, the flow's own wall time.
(c) **Training step time** of the ``cnn`` (default size) on CUDA and on the CPU (all cores):
    ``fit_candidate`` with ``max_steps``; from the training loop's clock (training/loop.py):
    segments/s, ms per step of ``--batch-size`` segments and ``data_wait_share``.
(d) **Scoring throughput**: the trained model loaded on each device, ``Predictor.predict``
    (probabilities and embeddings) over every stored segment tensor: segments/s (the
    in-process floor of ``bench/score_bench.py``).

Without a CUDA device it says "no CUDA device", runs the CPU parts at a tiny size (24 tracks,
one repeat, torch on the CPU in (a), labelled as such: it is not the GPU path) and skips the
GPU rows, so the script is checked end to end anywhere. Every part fails soft: an error is
recorded in the JSON and the next part runs. JSON: ``--out`` or
``bench/results/gpu-<time>.json``; a table is printed at the end.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# a busy machine can take more than the CLI's 120 s to start the temporary Prefect API
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

import argparse
import contextlib
import functools
import glob
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import benchenv
import ingest_bench as ib  # before numpy/Prefect/Dask: sets their environment
import numpy as np

VERSION_PACKAGES = (*ib.VERSION_PACKAGES, "torch", "mlflow")
FIELDS = ("logmel", "mfcc", "chroma", "scalars", "contrast_peak", "contrast_valley")
SCALARS = ("centroid", "bandwidth", "rolloff", "flatness", "zcr", "rms")
AUDIO_EXT = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


# ----------------------------------------------------------------------------------------
def cuda_info() -> dict[str, Any]:
    """Whether torch sees a CUDA device, and which."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "available": torch.cuda.is_available()}
    if info["available"]:
        p = torch.cuda.get_device_properties(0)
        info |= {"devices": torch.cuda.device_count(), "name": p.name,
                 "memory_gib": round(p.total_memory / 2**30, 1)}
    return info


@contextlib.contextmanager
def part(res: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """A part's result dict; an exception is recorded, printed, and the run goes on."""
    out: dict[str, Any] = {}
    res[name] = out
    t0 = time.perf_counter()
    print(f"\n== {name} ...", flush=True)
    try:
        yield out
    except Exception as exc:  # fail soft: record and go on
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=6)
        print(f"   {name} failed: {out['error']}", flush=True)
    out["part_s"] = time.perf_counter() - t0
    print(f"   {name}: {out['part_s']:.1f} s", flush=True)


def audio_files(root: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                  if p.lower().endswith(AUDIO_EXT))


def decoded_tracks(files: list[str], sample_rate: int) -> list[np.ndarray]:
    """Each file as the pipeline sees it: decoded, mono, resampled (all on the CPU)."""
    from tasks.audio import StreamResampler, to_mono
    from tasks.decode import open_audio, read_blocks

    out = []
    for path in files:
        with open_audio(path) as snd:
            rs = StreamResampler(snd.samplerate, sample_rate, quality="HQ")
            parts = [rs.push(to_mono(b)) for b in read_blocks(snd)]
            parts.append(rs.finish())
        out.append(np.concatenate(parts).astype(np.float32))
    return out


def segment_buffers(tracks: list[np.ndarray], config: Any) -> list[np.ndarray]:
    """The padded sample buffer of every segment the tail rule keeps (3-s windows)."""
    from tasks.segment import plan_segments, valid_frames

    c = config
    need = (c.segment_frames - 1) * c.hop_length + c.n_fft
    bufs = []
    for y in tracks:
        padded = np.pad(y, (c.n_fft // 2, need))
        for span in plan_segments(valid_frames(y.size, c.hop_length), c):
            start = span.start_frame * c.hop_length
            bufs.append(np.ascontiguousarray(padded[start:start + need]))
    return bufs


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls (after the caller's warm-up)."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def differences(ref: list[Any], got: list[Any], config: Any) -> dict[str, Any]:
    """Largest differences per field between two lists of FrameFeatures."""
    from tasks.features import FrameFeatures, contrast_db, max_db

    a, b = FrameFeatures.concat(ref), FrameFeatures.concat(got)
    out: dict[str, Any] = {}
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        names = SCALARS if f == "scalars" else (f,)
        for i, name in enumerate(names):
            xi, yi = (x[:, i], y[:, i]) if f == "scalars" else (x, y)
            d = np.abs(xi.astype(np.float64) - yi)
            out[name] = {"max_abs": float(d.max()),
                         "max_rel": float(d.max() / max(float(np.abs(xi).max()), 1e-30))}
    rolloff = a.scalars[:, 2] != b.scalars[:, 2]
    out["rolloff"]["share_other_bin"] = float(rolloff.mean())
    out["rolloff"]["max_bins"] = float(np.abs(a.scalars[:, 2] - b.scalars[:, 2]).max()
                                       / (config.sample_rate / config.n_fft))
    cons = [contrast_db(x.contrast_peak, x.contrast_valley, peak_max_db=max_db(x.contrast_peak),
                        valley_max_db=max_db(x.contrast_valley)) for x in (a, b)]
    out["contrast_db"] = {"max_abs": float(np.abs(cons[0] - cons[1]).max())}
    return out


# ----------------------------------------------------------------------------------------
# (a)
def bench_features(files: list[str], device: str, repeats: int) -> dict[str, Any]:
    from tasks.config import FeatureConfig
    from tasks.features import SpectralExtractor
    from tasks.torch_features import TorchSpectralExtractor
    from tasks.track import extract_track

    c = FeatureConfig()
    tracks = decoded_tracks(files, c.sample_rate)
    bufs = segment_buffers(tracks, c)
    n_seg, frames = len(bufs), c.segment_frames
    seg_audio_s = n_seg * frames * c.frame_seconds
    out: dict[str, Any] = {"device": device, "segments": n_seg, "tracks": len(tracks),
                           "audio_s": sum(y.size for y in tracks) / c.sample_rate,
                           "segment_audio_s": seg_audio_s, "rows": {}}
    ex = SpectralExtractor(c)
    tx = TorchSpectralExtractor(c, device)

    def row(key: str, wall: float, note: str = "") -> None:
        out["rows"][key] = {"wall_s": wall, "segments_per_s": n_seg / wall,
                            "x_realtime": seg_audio_s / wall, "note": note}
        print(f"   {key:40s} {n_seg / wall:10.0f} segments/s {seg_audio_s / wall:10.0f}x "
              f"realtime  {note}", flush=True)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch on the CPU: the same one core as numpy
    with ib.one_thread():
        ex.frames(bufs[0], frames)
        row("numpy, per segment", timed(lambda: [ex.frames(b, frames) for b in bufs], repeats),
            "1 thread (one worker core)")
        label = "cuda" if device.startswith("cuda") else "torch-cpu (not the GPU path)"
        note = "" if device.startswith("cuda") else "1 thread"
        tx.frames_batch(bufs[:64], [frames] * min(64, n_seg))  # warm-up: plans, kernels
        row(f"{label}, per segment",
            timed(lambda: [tx.frames(b, frames) for b in bufs], repeats), note)
        for batch in (64, 512):
            def run(batch: int = batch) -> list[Any]:
                got: list[Any] = []
                for i in range(0, n_seg, batch):
                    got += tx.frames_batch(bufs[i:i + batch], [frames] * len(bufs[i:i + batch]))
                return got
            row(f"{label}, batches of {batch}", timed(run, repeats), note)
    ref = [ex.frames(b, frames) for b in bufs]
    got = tx.frames_batch(bufs, [frames] * n_seg)
    out["differences"] = differences(ref, got, c)

    # the per-track path of an ingest worker (decode and resample on the CPU), in process
    def per_track(extractor: Any, paths: list[str]) -> Callable[[], float]:
        def go() -> float:
            from tasks.decode import open_audio, read_blocks

            total = 0.0
            for path in paths:
                with open_audio(path) as snd:
                    total += extract_track(read_blocks(snd), snd.samplerate, c, extractor,
                                           lambda _b: None).duration_s
            return total
        return go

    track = {}
    with ib.one_thread():
        for key, extractor in (("numpy", ex), (label, tx)):
            per_track(extractor, files[:3])()  # warm-up
            wall = timed(per_track(extractor, files), repeats)
            track[key] = {"wall_s": wall, "x_realtime": out["audio_s"] / wall}
            print(f"   extract_track, {key:28s} {out['audio_s'] / wall:10.0f}x realtime "
                  "(decode + resample + features, 1 CPU thread)", flush=True)
    torch.set_num_threads(threads)
    out["extract_track"] = track
    return out


# ----------------------------------------------------------------------------------------
# (b)
def ingest_once(catalogue: str, device: str, workers: int | None) -> dict[str, Any]:
    store = tempfile.mkdtemp(prefix="mtag-gpu-bench-store-")
    cmd = [sys.executable, "-m", "flows.cli", "ingest", catalogue, "--store", store,
           "--no-progress", "--json"] + (["--workers", str(workers)] if workers else [])
    env = os.environ | {"MTAG_FEATURE_DEVICE": device,
                        "PYTHONPATH": os.pathsep.join([benchenv.REPO,
                                                       os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=benchenv.REPO,
                          timeout=900)
    wall = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mtag ingest ({device}) exited {proc.returncode}: "
                           f"{proc.stderr[-1500:]}")
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    return {"command_wall_s": wall, "flow_wall_s": summary["wall_s"],
            "audio_s": summary["audio_s"], "ok": summary["ok"], "failed": summary["failed"],
            "workers": summary["workers"], "compute_s": summary["compute_s"]}


def bench_ingest(catalogue: str, devices: list[str], repeats: int, workers: int | None,
                 deadline: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
    for i in range(repeats):
        if i and time.perf_counter() > deadline:
            print(f"   time budget spent: {i} of {repeats} repeats", flush=True)
            break
        for device in (devices if i % 2 == 0 else devices[::-1]):
            r = ingest_once(catalogue, device, workers)
            runs[device].append(r)
            print(f"   MTAG_FEATURE_DEVICE={device:5s} run {i + 1}: command "
                  f"{r['command_wall_s']:.1f} s, flow {r['flow_wall_s']:.1f} s, "
                  f"{r['ok']} ok, {r['failed']} failed, W={r['workers']}", flush=True)
    out: dict[str, Any] = {"runs": runs}
    for device, rs in runs.items():
        audio = rs[0]["audio_s"]
        cmd = statistics.median(r["command_wall_s"] for r in rs)
        flow = statistics.median(r["flow_wall_s"] for r in rs)
        out[device] = {"command_wall_s": cmd, "flow_wall_s": flow, "audio_s": audio,
                       "x_realtime_command": audio / cmd, "x_realtime_flow": audio / flow,
                       "workers": rs[0]["workers"]}
    return out


# ----------------------------------------------------------------------------------------
# (c) and (d)
def bench_train(store: str, labels: str, devices: list[str], steps: dict[str, int],
                batch: int, workdir: str) -> dict[str, Any]:
    import torch

    from training.loop import TrainConfig
    from training.trainer import fit_candidate, prepare

    prep = prepare(store, labels, valid_size=0.1, test_size=0.2, seed=0)
    out: dict[str, Any] = {"split": prep.split_counts(), "model": "cnn",
                           "batch_size": batch, "threads": torch.get_num_threads()}
    for device in devices:
        tc = TrainConfig(epochs=1000, patience=1000, batch_size=batch, seed=0, device=device,
                         max_steps=steps[device])
        t0 = time.perf_counter()
        fit = fit_candidate(prep, "cnn", os.path.join(workdir, f"train-{device}"),
                            train_config=tc, resume=False)
        wall = time.perf_counter() - t0
        sps = fit.segments_per_s
        out[device] = {"steps": steps[device], "segments_per_s": sps,
                       "step_ms": 1000.0 * batch / sps if sps else None,
                       "data_wait_share": fit.data_wait_share, "fit_wall_s": wall,
                       "epochs": len(fit.history), "test_accuracy": fit.test_track["accuracy"],
                       "artifact_dir": fit.artifact_dir}
        print(f"   cnn on {device:5s}: {sps:8.1f} segments/s, "
              f"{out[device]['step_ms'] or 0:8.1f} ms per step of {batch}, data_wait_share "
              f"{fit.data_wait_share:.3f} ({steps[device]} steps)", flush=True)
    return out


def bench_score(store: str, artifact_dir: str, devices: list[str], repeats: int
                ) -> dict[str, Any]:
    from featurestore.reader import TensorReader
    from featurestore.store import FeatureStore
    from training import artifact

    reader = TensorReader(FeatureStore(store))
    out: dict[str, Any] = {"segments": len(reader),
                           "tracks": len(set(reader.index.track_id.tolist()))}
    for device in devices:
        predictor = artifact.load(artifact_dir, device=device)
        x = np.stack([reader.matrix(predictor.input, i) for i in range(len(reader))])
        predictor.predict(x[:512], embeddings=True)  # warm-up
        wall = timed(functools.partial(predictor.predict, x, embeddings=True, batch_size=512),
                     repeats)
        out[device] = {"wall_s": wall, "segments_per_s": len(x) / wall,
                       "tracks_per_s": out["tracks"] / wall}
        print(f"   score on {device:5s}: {len(x) / wall:10.0f} segments/s", flush=True)
    return out


def keep_store(catalogue: str, workers: int | None) -> str:
    """One ingested store (numpy features) for training and scoring."""
    from flows.ingest import run_ingest

    store = tempfile.mkdtemp(prefix="mtag-gpu-bench-train-")
    os.environ["MTAG_FEATURE_DEVICE"] = "cpu"  # the workers inherit it
    try:
        run_ingest(catalogue, store, n_workers=workers, progress=False)
    except BaseException:
        shutil.rmtree(store, ignore_errors=True)
        raise
    finally:
        del os.environ["MTAG_FEATURE_DEVICE"]
    return store


# ----------------------------------------------------------------------------------------
def render(res: dict[str, Any]) -> str:
    lines = [f"\n== GPU bench: {res['cuda'].get('name') or 'no CUDA device'}; "
             f"torch {res['cuda']['torch']} (CUDA {res['cuda']['torch_cuda']}); "
             f"{res['machine']['cpu_count']} CPUs; total {res.get('total_s', 0):.0f} s"]
    if not res["cuda"]["available"]:
        lines.append("   no CUDA device: GPU rows skipped; torch-cpu rows are NOT the GPU path")
    f = res.get("features", {})
    if "rows" in f:
        lines.append(f"(a) features, {f['segments']} segments of 3 s ({f['tracks']} tracks):")
        lines.append(f"    {'':44s} {'segments/s':>11s} {'x realtime':>11s}")
        for key, r in f["rows"].items():
            lines.append(f"    {key:44s} {r['segments_per_s']:11.0f} {r['x_realtime']:11.0f}")
        for key, r in f.get("extract_track", {}).items():
            lines.append(f"    extract_track, {key:29s} {'':11s} {r['x_realtime']:11.0f}")
        d = f.get("differences", {})
        if d:
            lines.append("    max |diff| (relative to the field's max): " + ", ".join(
                f"{k} {v['max_abs']:.2g} ({v.get('max_rel', 0):.1g})" for k, v in d.items()
                if k not in ("rolloff", "contrast_db")))
            lines.append(f"    rolloff on another bin: {100 * d['rolloff']['share_other_bin']:.3f}"
                         f" % of frames (max {d['rolloff']['max_bins']:.0f} bins); contrast "
                         f"{d['contrast_db']['max_abs']:.3g} dB")
    i = res.get("ingest", {})
    for dev in ("cpu", "auto"):
        if dev in i:
            r = i[dev]
            lines.append(f"(b) mtag ingest, MTAG_FEATURE_DEVICE={dev:4s}: command "
                         f"{r['command_wall_s']:6.1f} s ({r['x_realtime_command']:5.0f}x), flow "
                         f"{r['flow_wall_s']:6.1f} s ({r['x_realtime_flow']:5.0f}x), "
                         f"W={r['workers']}")
    t = res.get("train", {})
    for dev in ("cuda", "cpu"):
        if dev in t:
            r = t[dev]
            lines.append(f"(c) cnn training on {dev:4s}: {r['step_ms'] or 0:8.1f} ms/step of "
                         f"{t['batch_size']}, {r['segments_per_s']:8.0f} segments/s, "
                         f"data_wait_share {r['data_wait_share']:.3f}")
    s = res.get("score", {})
    for dev in ("cuda", "cpu"):
        if dev in s:
            lines.append(f"(d) scoring on {dev:4s}: {s[dev]['segments_per_s']:10.0f} "
                         f"segments/s ({s['segments']} segments)")
    for name in ("catalogue", "features", "ingest", "train", "score"):
        if "error" in res.get(name, {}):
            lines.append(f"    {name} failed: {res[name]['error']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="a folder of audio instead of the generated catalogue")
    ap.add_argument("--labels", help="labels CSV for --source (path,label); else no training")
    ap.add_argument("--tracks", type=int, help="generated tracks (default 240; 24 w/o CUDA)")
    ap.add_argument("--repeats", type=int, help="repeats per figure (default 3; 1 w/o CUDA)")
    ap.add_argument("--workers", type=int, help="ingest workers (default: mtag's, one a core)")
    ap.add_argument("--train-steps", type=int, default=60, help="steps on CUDA (CPU: a third)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="no further ingest repeat starts after this many seconds of the run")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["features", "ingest", "train", "score"])
    ap.add_argument("--out")
    args = ap.parse_args()
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": benchenv.environment(VERSION_PACKAGES),
                           "started": benchenv.now(), "cuda": cuda_info()}
    gpu = bool(res["cuda"]["available"])
    if not gpu:
        print("no CUDA device: running the CPU parts at a tiny size; torch-cpu figures are "
              "not the GPU path", flush=True)
    tracks = args.tracks or (240 if gpu else 24)
    repeats = args.repeats or (3 if gpu else 1)
    res["settings"] = {"tracks": tracks, "repeats": repeats, "workers": args.workers,
                       "train_steps": args.train_steps, "batch_size": args.batch_size}
    work = tempfile.mkdtemp(prefix="mtag-gpu-bench-")
    catalogue, labels = args.source, args.labels
    with part(res, "catalogue") as out:
        if catalogue is None:
            from flows.demo import make_catalogue

            catalogue = os.path.join(work, "catalogue")
            labels = make_catalogue(catalogue, tracks, workers=benchenv.cpus())
        files = audio_files(catalogue)
        out |= {"source": catalogue, "files": len(files), "generated": args.source is None}
    if "features" not in args.skip:
        with part(res, "features") as out:
            out |= bench_features(files, "cuda" if gpu else "cpu", repeats)
    if "ingest" not in args.skip:
        with part(res, "ingest") as out:
            out |= bench_ingest(catalogue, ["cpu", "auto"] if gpu else ["cpu"], repeats,
                                args.workers, started + args.budget_s)
    devices = ["cuda", "cpu"] if gpu else ["cpu"]
    artifact_dir = None
    if labels and not {"train", "score"} <= set(args.skip):
        with part(res, "train") as out:
            store = keep_store(catalogue, args.workers)
            out["store"] = store
            steps = {"cuda": args.train_steps, "cpu": max(3, args.train_steps // 3)} if gpu \
                else {"cpu": 3}
            out |= bench_train(store, labels, devices, steps, args.batch_size, work)
            artifact_dir = out[devices[0]]["artifact_dir"]
        if "score" not in args.skip and artifact_dir:
            with part(res, "score") as out:
                out |= bench_score(res["train"]["store"], artifact_dir, devices, repeats)
    res["finished"] = benchenv.now()
    res["total_s"] = time.perf_counter() - started
    res["machine"]["loadavg_end"] = os.getloadavg()
    print(render(res))
    path = benchenv.write_json(res, "gpu", args.out)
    print(f"results written to {path}")
    shutil.rmtree(work, ignore_errors=True)
    if "store" in res.get("train", {}):
        shutil.rmtree(res["train"]["store"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
