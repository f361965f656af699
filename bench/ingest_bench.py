#!/usr/bin/env python
"""Ingest throughput on real audio: the pipeline against single-process baselines.

Measures, on the same list of files:

* the pipeline: ``run_ingest`` with W Dask worker processes, twice, each on a fresh store (the
  first run pays worker warm-up; the second is the headline);
* three single-process, single-core baselines, each the median of R timed repeats after one
  warm-up call:

  (a) plain loop: ``librosa.load`` + per-3 s-segment ``librosa.feature.*`` calls with ``y=``
      (each call computes its own STFT), then mean/std summaries (the notebook way);
  (b) floor: soundfile decode, mono, ``soxr.resample`` HQ, one ``librosa.stft`` and the
      128-band mel power in dB, nothing else;
  (c) ours in-process: ``open_audio``/``read_blocks`` + ``extract_track`` with one
      ``SpectralExtractor`` and a no-op batch callback (the pipeline's per-file work without
      orchestration or writing);
  (d) the flow's task bodies in-process: ``probe_files`` then ``run_shard`` over the flow's
      shard plan, one after the other (decode, features and writing, without Dask/Prefect).

Prints a table and writes all figures to ``bench/results/ingest-<source>-<time>.json``.
``--profile`` instead runs (c) under cProfile on a few files and prints where time goes.

Usage::

    .venv/bin/python bench/ingest_bench.py --source /usr/share/games/singularity/music
    .venv/bin/python bench/ingest_bench.py --source ../shared/datasets/philharmonia-dev
    .venv/bin/python bench/ingest_bench.py --source DIR --profile
"""

from __future__ import annotations

import os
import sys

# First: the repository on sys.path, then the environment before numpy/Prefect/Dask are
# imported: the CLI's defaults (one BLAS/OpenMP thread per process, quiet logs; Dask workers
# inherit them), and a Prefect home of the bench's own so that concurrent work using
# ~/.prefect does not share its SQLite database.
import benchenv

benchenv.apply_cli_defaults()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

SR = 22050
SEGMENT_S = 3.0
N_FFT = 2048
HOP = 512
N_MELS = 128
LOOP_MAX_AUDIO_S = 600.0
TARGET_VS_LOOP = 3.5
TARGET_VS_FLOOR = 0.75

VERSION_PACKAGES = ("mtag", "numpy", "scipy", "librosa", "soxr", "soundfile", "numba",
                    "dask", "distributed", "prefect", "prefect-dask", "pyarrow", "threadpoolctl")


# ----------------------------------------------------------------------------------------
# helpers shared with orchestration_bench.py
def dir_size_mb(path: str) -> float:
    """Bytes under ``path`` in MiB."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total / 2**20


@contextlib.contextmanager
def one_thread():
    """Limit BLAS/OpenMP pools of this process to one thread (belt and braces with the env)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1):
        yield


class CpuMonitor:
    """CPU seconds of this process and its descendants while a pipeline run is in progress.

    Exact totals come from ``getrusage`` (self, and reaped children: the Dask worker processes
    and the temporary Prefect API, which all exit before ``run_ingest`` returns); a thread
    samples the live descendants with psutil to split the children's CPU into Dask workers,
    the Prefect API server and the rest (approximate: the last ``interval`` of each is missed).
    CPU time is what the work costs whatever else runs on the machine.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._seen: dict[int, tuple[str, float]] = {}
        self._stop = False

    @staticmethod
    def _kind(cmdline: list[str]) -> str:
        text = " ".join(cmdline)
        if "uvicorn" in text or "prefect.server" in text:
            return "prefect_api"
        if "spawn_main" in text:
            return "dask_worker"
        return "other"

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop:
            try:
                kids = me.children(recursive=True)
            except psutil.Error:
                kids = []
            for k in kids:
                try:
                    with k.oneshot():
                        t = k.cpu_times()
                        cpu = t.user + t.system
                        kind = self._seen.get(k.pid, (None, 0.0))[0] or self._kind(k.cmdline())
                except psutil.Error:
                    continue
                self._seen[k.pid] = (kind, cpu - self._base.get(k.pid, 0.0))
            time.sleep(self.interval)

    def __enter__(self) -> CpuMonitor:
        import resource
        import threading

        import psutil

        self._base: dict[int, float] = {}  # processes that already ran (a kept cluster)
        for k in psutil.Process().children(recursive=True):
            try:
                t = k.cpu_times()
                self._base[k.pid] = t.user + t.system
            except psutil.Error:
                continue
        self._self0 = resource.getrusage(resource.RUSAGE_SELF)
        self._kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import resource

        self._stop = True
        self._thread.join()
        s1 = resource.getrusage(resource.RUSAGE_SELF)
        k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.self_s = (s1.ru_utime + s1.ru_stime) - (self._self0.ru_utime + self._self0.ru_stime)
        self.children_s = (k1.ru_utime + k1.ru_stime) - (self._kids0.ru_utime
                                                         + self._kids0.ru_stime)
        # children still alive (a kept cluster) are not in RUSAGE_CHILDREN: add their share
        self.children_s += sum(cpu for pid, (_, cpu) in self._seen.items()
                               if pid in self._base)
        self.by_kind: dict[str, float] = {}
        for kind, cpu in self._seen.values():
            self.by_kind[kind] = self.by_kind.get(kind, 0.0) + cpu

    def figures(self) -> dict[str, float]:
        """CPU seconds: main process, children (exact), and children by kind (sampled)."""
        return {"main_s": self.self_s, "children_s": self.children_s,
                "total_s": self.self_s + self.children_s,
                **{f"{k}_s": v for k, v in sorted(self.by_kind.items())}}


# ----------------------------------------------------------------------------------------
# pipeline
def run_pipeline(source: str, workers: int, *, keep_store: bool = False,
                 store: str | None = None, dask_address: str | None = None) -> dict[str, Any]:
    """One ``run_ingest`` on a fresh temporary store (or ``store``); return its figures.

    Without ``dask_address`` the run starts (and stops) its own LocalCluster and Prefect API
    as ``mtag ingest`` does; with it, the run uses that (kept, warm) cluster.
    """
    from flows.ingest import run_ingest

    fresh = store is None
    store = store or tempfile.mkdtemp(prefix="mtag-bench-store-")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with CpuMonitor() as mon:
        summary = run_ingest(source, store, n_workers=workers, progress=False,
                             dask_address=dask_address)
    outer = time.perf_counter() - t0
    w = max(1, summary.workers)
    cpu = mon.figures()
    worker_cpu = cpu.get("dask_worker_s", 0.0)
    fig = {
        "store": store,
        "feature_set": summary.feature_set,
        "files": summary.files,
        "ok": summary.ok,
        "failed": summary.failed,
        "unsupported": summary.unsupported,
        "unchanged": summary.unchanged,
        "duplicates": summary.duplicates,
        "segments": summary.segments,
        "shards": summary.shards,
        "shards_failed": summary.shards_failed,
        "workers": summary.workers,
        "audio_s": summary.audio_s,
        "audio_h": summary.audio_s / 3600.0,
        "wall_s": summary.wall_s,
        "outer_wall_s": outer,
        "compute_s": summary.compute_s,
        "realtime_x": summary.audio_s / summary.wall_s if summary.wall_s else 0.0,
        "per_core_x": summary.audio_s / summary.wall_s / w if summary.wall_s else 0.0,
        "per_core_x_outer": summary.audio_s / outer / w,
        "compute_x_per_worker": summary.audio_s / summary.compute_s if summary.compute_s
        else 0.0,
        "peak_rss_mb": dict(summary.peak_rss_mb),
        "errors": [list(e) for e in summary.errors],
        "cpu_s": cpu,
        "audio_per_worker_cpu_x": summary.audio_s / worker_cpu if worker_cpu else None,
        "audio_per_total_cpu_x": summary.audio_s / cpu["total_s"] if cpu["total_s"] else None,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
    }
    fig["store_mb"] = dir_size_mb(store)
    if fresh and not keep_store:
        shutil.rmtree(store, ignore_errors=True)
    return fig


# ----------------------------------------------------------------------------------------
# single-process baselines; each returns the audio seconds it processed
@dataclass
class Baselines:
    """Filter banks and objects built once, outside the timed loops."""

    mel_basis: np.ndarray
    config: Any
    extractor: Any
    batches: list[int] = field(default_factory=lambda: [0])


def make_baselines() -> Baselines:
    """Build the floor's mel basis and the project's extractor."""
    import librosa

    from tasks.config import FeatureConfig
    from tasks.features import SpectralExtractor

    cfg = FeatureConfig()
    mel = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, dtype=np.float32)
    return Baselines(mel_basis=mel, config=cfg, extractor=SpectralExtractor(cfg))


def _summ(f: np.ndarray) -> np.ndarray:
    return np.concatenate([f.mean(axis=1), f.std(axis=1)])


def plain_loop_file(path: str, _b: Baselines) -> float:
    """(a) The notebook way: load, 3 s segments, one librosa call (and STFT) per feature."""
    import librosa

    y, _ = librosa.load(path, sr=SR, mono=True)  # res_type soxr_hq (librosa's default)
    seg_n = int(round(SEGMENT_S * SR))
    n_seg = max(1, math.ceil(len(y) / seg_n))
    rows = []
    for k in range(n_seg):
        seg = y[k * seg_n:(k + 1) * seg_n]
        if seg.size < seg_n:
            seg = np.pad(seg, (0, seg_n - seg.size))
        logmel = librosa.power_to_db(librosa.feature.melspectrogram(y=seg, sr=SR, n_mels=N_MELS))
        feats = [
            logmel,
            librosa.feature.mfcc(y=seg, sr=SR, n_mfcc=20),
            librosa.feature.chroma_stft(y=seg, sr=SR),
            librosa.feature.spectral_centroid(y=seg, sr=SR),
            librosa.feature.spectral_bandwidth(y=seg, sr=SR),
            librosa.feature.spectral_rolloff(y=seg, sr=SR),
            librosa.feature.spectral_contrast(y=seg, sr=SR),
            librosa.feature.spectral_flatness(y=seg),
            librosa.feature.zero_crossing_rate(seg),
            librosa.feature.rms(y=seg),
        ]
        rows.append(np.concatenate([_summ(f) for f in feats]))
    np.stack(rows)
    return len(y) / SR


def floor_file(path: str, b: Baselines) -> float:
    """(b) Minimal work: decode, mono, resample HQ, one STFT, 128-band mel power in dB."""
    import librosa
    import soundfile as sf
    import soxr

    data, sr = sf.read(path, dtype="float32", always_2d=True)
    y = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sr != SR:
        y = soxr.resample(y, sr, SR, quality="HQ")
    spec = librosa.stft(y, n_fft=N_FFT, hop_length=HOP)
    power = np.abs(spec) ** 2
    librosa.power_to_db(b.mel_basis @ power)
    return len(y) / SR


def ours_file(path: str, b: Baselines) -> float:
    """(c) The project's per-file path without orchestration or writing."""
    from tasks.decode import open_audio, read_blocks
    from tasks.track import extract_track

    def on_batch(_batch: Any) -> None:
        return None

    with open_audio(path) as snd:
        result = extract_track(read_blocks(snd), snd.samplerate, b.config, b.extractor,
                               on_batch)
    return result.duration_s


METHODS: dict[str, Callable[[str, Baselines], float]] = {
    "plain_loop": plain_loop_file,
    "floor": floor_file,
    "ours": ours_file,
}


def time_method(fn: Callable[[str, Baselines], float], files: Sequence[str], b: Baselines,
                repeats: int) -> dict[str, Any]:
    """Run ``fn`` over ``files`` ``repeats`` times; median wall and CPU seconds."""
    walls, cpus, audio = [], [], 0.0
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        audio = 0.0
        for path in files:
            audio += fn(path, b)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return _timings(len(files), audio, walls, cpus)


def _timings(files: int, audio: float, walls: list[float], cpus: list[float]
             ) -> dict[str, Any]:
    """The figures of ``audio`` seconds processed in each of the timed passes."""
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"files": files, "audio_s": audio, "walls_s": walls, "cpus_s": cpus,
            "wall_s": wall, "cpu_s": cpu, "realtime_x": audio / wall,
            "cpu_realtime_x": audio / cpu if cpu > 0 else None}


def _parallel_part(args: tuple[str, list[str], Any]) -> tuple[float, float]:
    """One of W processes: warm up, wait for the others, time ``key`` over its files."""
    key, part, barrier = args
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    b = make_baselines()
    fn = METHODS[key]
    with one_thread():
        fn(part[0], b)
        barrier.wait()
        t0 = time.perf_counter()
        audio = sum(fn(path, b) for path in part)
        return audio, time.perf_counter() - t0


def time_parallel(key: str, files: Sequence[str], workers: int) -> dict[str, Any]:
    """``key`` in ``workers`` processes at once, files dealt round-robin: the same cores the
    pipeline uses, so the per-core figure carries the same contention (memory, caches)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        parts = [list(files[i::workers]) for i in range(workers)]
        with ctx.Pool(workers) as pool:
            got = pool.map(_parallel_part, [(key, part, barrier) for part in parts])
    audio = sum(a for a, _ in got)
    wall = max(w for _, w in got)
    # mean of the processes' own rates: with few files one process can end early, and a
    # total / slowest-wall figure would blame the baseline for that imbalance
    rate = sum(a / w for a, w in got if w > 0) / workers
    return {"files": len(files), "audio_s": audio, "wall_s": wall, "workers": workers,
            "per_core_x": rate, "per_process": got}


def shard_inprocess(files: Sequence[str], workers: int, repeats: int) -> dict[str, Any]:
    """(d) The pipeline's task bodies without Dask or Prefect: probe, then every shard.

    ``probe_files`` once over all files, then the same shard plan as the flow
    (``plan_shards`` for ``workers`` slots, shard_minutes 60) through ``run_shard`` one after the
    other in this process, on a fresh store per repeat: decode, features *and* writing.
    """
    from featurestore.sources import SourceFile
    from featurestore.store import FeatureStore
    from flows.ingest_worker import probe_files, run_shard
    from flows.plan import dedupe, plan_shards
    from tasks.config import FeatureConfig

    cfg = FeatureConfig()
    sources = [SourceFile(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    w0, c0 = time.perf_counter(), time.process_time()
    records = probe_files(sources)
    probe_wall, probe_cpu = time.perf_counter() - w0, time.process_time() - c0
    pending, _dups = dedupe(records, set())
    walls, cpus, computes, audio, n_shards, failed = [], [], [], 0.0, 0, 0
    for _ in range(repeats):
        root = tempfile.mkdtemp(prefix="mtag-bench-shards-")
        try:
            store = FeatureStore(root, create=True)
            fs_id = store.register_feature_set(cfg)
            shards = plan_shards(pending, fs_id, shard_minutes=60.0, workers=workers)
            w0, c0 = time.perf_counter(), time.process_time()
            results = [run_shard(store.url, cfg.to_json(), plan) for plan in shards]
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        computes.append(sum(r.compute_s for r in results))
        audio = sum(r.counts.audio_s for r in results)
        n_shards = len(results)
        failed = sum(r.counts.n_failed for r in results)
    return {**_timings(len(files), audio, walls, cpus),
            "compute_s": statistics.median(computes), "shards": n_shards, "failed": failed,
            "probe_wall_s": probe_wall, "probe_cpu_s": probe_cpu}


# ----------------------------------------------------------------------------------------
def list_audio(source: str) -> list[str]:
    """Audio files of ``source`` the pipeline would decode, sorted like discover() does."""
    from featurestore.sources import discover
    from tasks.decode import audio_format

    files = [f.uri for f in discover(source)]
    return [u for u in files if audio_format(u) is not None]


def header_durations(files: Sequence[str]) -> dict[str, float]:
    """Duration of each file from its header (estimates for mp3)."""
    import soundfile as sf

    out = {}
    for path in files:
        try:
            out[path] = float(sf.info(path).duration)
        except Exception:
            out[path] = 0.0
    return out


def shuffled(files: Sequence[str], seed: int = 0) -> list[str]:
    """A deterministic shuffle, so subsets mix folders (instruments, albums)."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    return order


def loop_subset(files: Sequence[str], durations: dict[str, float], limit: int | None,
                max_audio_s: float) -> tuple[list[str], str]:
    """Files for the plain loop: all, the first ``limit`` of a fixed shuffle, or ~10 min."""
    total = sum(durations[f] for f in files)
    if limit is not None:
        if limit >= len(files):
            return list(files), "all files"
        return sorted(shuffled(files)[:limit]), f"--loop-limit {limit} (fixed shuffle)"
    if total <= max_audio_s:
        return list(files), "all files"
    picked, acc = [], 0.0
    for f in shuffled(files):
        if acc >= max_audio_s:
            break
        picked.append(f)
        acc += durations[f]
    return sorted(picked), (f"subset of {len(picked)}/{len(files)} files, "
                            f"{acc / 60:.1f} of {total / 60:.1f} min (fixed shuffle)")


def write_manifest(files: Sequence[str]) -> str:
    """A CSV manifest of ``files`` for run_ingest (used with --limit)."""
    folder = tempfile.mkdtemp(prefix="mtag-bench-manifest-")
    path = os.path.join(folder, "manifest.csv")
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri"])
        for f in files:
            w.writerow([os.path.abspath(f)])
    return path


# ----------------------------------------------------------------------------------------
def profile_ours(files: Sequence[str], n_files: int, top: int = 25) -> str:
    """Run (c) under cProfile on ``n_files`` files; return the printed statistics."""
    b = make_baselines()
    ours_file(files[0], b)  # warm-up outside the profile
    chosen = sorted(shuffled(files)[:n_files])
    prof = cProfile.Profile()
    audio = 0.0
    t0 = time.perf_counter()
    with one_thread():
        prof.enable()
        for path in chosen:
            audio += ours_file(path, b)
        prof.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    buf.write(f"(c) ours in-process under cProfile: {len(chosen)} files, {audio:.1f} s audio, "
              f"{wall:.2f} s wall (profiled) = {audio / wall:.1f}x realtime\n")
    for p in chosen:
        buf.write(f"  {p}\n")
    stats = pstats.Stats(prof, stream=buf)
    stats.strip_dirs().sort_stats("cumulative").print_stats(top)
    buf.write("\n--- by own time (tottime) ---\n")
    stats.sort_stats("tottime").print_stats(15)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------
def _fx(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def fmt_rss(rss: dict[str, float]) -> str:
    return ", ".join(f"{v:.0f}" for _, v in sorted(rss.items())) or "-"


def render(res: dict[str, Any]) -> str:
    """The compact table."""
    lines = []
    src = res["source"]
    m = res["machine"]
    lines.append(f"== ingest bench: {src['path']}")
    lines.append(f"   {src['files']} audio files, {src['audio_header_s'] / 3600:.3f} h audio "
                 f"(headers); {m['cpu_count']} cores ({m['cpu_model']}); "
                 f"load at start {m['loadavg_start'][0]:.2f}")
    lines.append(f"   {benchenv.git_line(m['git'])}")
    runs = res["pipeline"]
    if runs:
        lines.append("")
        lines.append(f"pipeline: run_ingest, W={res['workers']} workers, fresh store each run; "
                     "cold = own cluster and API (as `mtag ingest`), warm = a kept cluster; "
                     "* = headline (median warm run)")
        hdr = f"  {'':28s}" + "".join(f"{r['label']:>18s}" for r in runs)
        lines.append(hdr)
        rows: list[tuple[str, Callable[[dict], str]]] = [
            ("audio h", lambda r: f"{r['audio_h']:.3f}"),
            ("files ok/failed/unsup", lambda r: f"{r['ok']}/{r['failed']}/{r['unsupported']}"),
            ("segments / shards", lambda r: f"{r['segments']}/{r['shards']}"),
            ("wall s (flow)", lambda r: f"{r['wall_s']:.1f}"),
            ("wall s (incl. cluster)", lambda r: f"{r['outer_wall_s']:.1f}"),
            ("x realtime", lambda r: f"{r['realtime_x']:.1f}"),
            ("x realtime per core", lambda r: f"{r['per_core_x']:.1f}"),
            ("compute_s sum", lambda r: f"{r['compute_s']:.1f}"),
            ("audio_s/compute_s (worker)", lambda r: f"{r['compute_x_per_worker']:.1f}"),
            ("CPU s: workers (sampled)", lambda r: f"{r['cpu_s'].get('dask_worker_s', 0):.1f}"),
            ("CPU s: Prefect API (sampled)",
             lambda r: f"{r['cpu_s'].get('prefect_api_s', 0):.1f}"),
            ("CPU s: flow process", lambda r: f"{r['cpu_s']['main_s']:.1f}"),
            ("CPU s: all (exact)", lambda r: f"{r['cpu_s']['total_s']:.1f}"),
            ("audio s / worker CPU s", lambda r: _fx(r["audio_per_worker_cpu_x"])),
            ("audio s / all CPU s", lambda r: _fx(r["audio_per_total_cpu_x"])),
            ("peak RSS MB per worker", lambda r: fmt_rss(r["peak_rss_mb"])),
            ("store MB", lambda r: f"{r['store_mb']:.0f}"),
            ("load avg before/after", lambda r: f"{r['loadavg_before'][0]:.1f}/"
                                                 f"{r['loadavg_after'][0]:.1f}"),
        ]
        for name, get in rows:
            lines.append(f"  {name:28s}" + "".join(f"{get(r):>18s}" for r in runs))
        for r in runs:
            for e in r["errors"][:5]:
                lines.append(f"  ! {r['label']}: {e[1]} {e[0]}: {e[2]}")
    single = res["single"]
    if single:
        lines.append("")
        lines.append(f"single process, 1 thread, median of {res['repeats']} "
                     f"(plain loop on: {res['loop_files_note']})")
        lines.append(f"  {'':30s}{'files':>7s}{'audio s':>10s}{'wall s':>9s}"
                     f"{'x realtime':>12s}{'x rt (CPU)':>12s}")
        names = {"plain_loop": "(a) plain loop", "floor": "(b) floor",
                 "ours": "(c) ours in-process",
                 "floor_subset": "(b) floor, loop files", "ours_subset": "(c) ours, loop files"}
        names["shard"] = "(d) run_shard in-process"
        for key, label in names.items():
            if key not in single:
                continue
            s = single[key]
            cpu_x = f"{s['cpu_realtime_x']:.1f}" if s["cpu_realtime_x"] else "-"
            lines.append(f"  {label:30s}{s['files']:>7d}{s['audio_s']:>10.1f}"
                         f"{s['wall_s']:>9.2f}{s['realtime_x']:>12.1f}{cpu_x:>12s}")
        if "shard" in single:
            d = single["shard"]
            lines.append(f"  (d) = flow's task bodies in this process: {d['shards']} shards, "
                         f"{d['failed']} failed; probe_files took {d['probe_wall_s']:.3f} s "
                         f"wall ({d['probe_cpu_s']:.3f} s CPU) before them")
    ratios = res["ratios"]
    if ratios:
        lines.append("")
        lines.append("ratios (throughput per core)")
        for key, (value, target) in ratios.items():
            if value is None:
                continue
            mark = "" if target is None else (
                f"   target >= {target}: {'PASS' if value >= target else 'FAIL'}")
            lines.append(f"  {key:44s}{value:7.2f}{mark}")
    return "\n".join(lines)


def compute_ratios(res: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """Throughput ratios; pipeline per core uses the headline run (the median warm run)."""
    single = res["single"]
    heads = [r for r in res["pipeline"] if r.get("headline")]
    head = heads[0] if heads else (res["pipeline"][-1] if res["pipeline"] else None)
    out: dict[str, tuple[float | None, float | None]] = {}

    def x(key: str) -> float | None:
        return single[key]["realtime_x"] if key in single else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    pc = head["per_core_x"] if head else None
    out["pipeline per-core / (a) plain loop"] = (div(pc, x("plain_loop")), TARGET_VS_LOOP)
    out["pipeline per-core / (b) floor"] = (div(pc, x("floor")), TARGET_VS_FLOOR)
    out["(c) ours / (a) plain loop"] = (div(x("ours"), x("plain_loop")), None)
    out["(c) ours / (b) floor"] = (div(x("ours"), x("floor")), None)
    if "ours_subset" in single:
        out["(c)/(a), same loop files"] = (div(x("ours_subset"), x("plain_loop")), None)
        out["(c)/(b), same loop files"] = (div(x("ours_subset"), x("floor_subset")), None)
    out["pipeline per-core / (c) ours"] = (div(pc, x("ours")), None)

    def xc(key: str) -> float | None:
        return single[key]["cpu_realtime_x"] if key in single else None

    if head and head.get("audio_per_total_cpu_x"):
        out["pipeline audio/all-CPU / (c) CPU (no contention)"] = (
            div(head["audio_per_total_cpu_x"], xc("ours")), None)
        out["pipeline audio/all-CPU / (a) CPU"] = (
            div(head["audio_per_total_cpu_x"], xc("plain_loop")), None)
        out["pipeline audio/all-CPU / (b) CPU"] = (
            div(head["audio_per_total_cpu_x"], xc("floor")), None)
    if "shard" in single:
        out["(d) run_shard / (c) ours (writing, per-shard cost)"] = (
            div(x("shard"), x("ours")), None)
        out["pipeline per-core / (d) run_shard"] = (div(pc, x("shard")), None)
        if head and head["compute_s"]:
            out["pipeline in-task (audio/compute_s) / (d)"] = (
                div(head["compute_x_per_worker"], x("shard")), None)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder of audio (searched recursively)")
    p.add_argument("--limit", type=int, help="use only N files (a fixed shuffle; the pipeline "
                   "then reads a CSV manifest of them)")
    p.add_argument("--workers", type=int, default=2, help="pipeline worker processes (2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats of each single-process baseline (3; median taken)")
    p.add_argument("--loop-limit", type=int,
                   help="plain loop on N files (default: all, or ~10 min of audio if more)")
    p.add_argument("--loop-max-audio-s", type=float, default=LOOP_MAX_AUDIO_S,
                   help="audio above which the plain loop uses a subset (600)")
    p.add_argument("--pipeline-runs", type=int, default=3,
                   help="pipeline runs on a kept, warm cluster, each on a fresh store; the "
                        "median is the headline (3); a cold run comes first")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-single", action="store_true")
    p.add_argument("--skip-shard", action="store_true",
                   help="skip (d), the flow's task bodies (probe_files, run_shard) in-process")
    p.add_argument("--keep-stores", action="store_true", help="do not delete the temp stores")
    p.add_argument("--profile", action="store_true",
                   help="only profile (c) under cProfile on a few files and exit")
    p.add_argument("--profile-files", type=int, default=3)
    p.add_argument("--out", help="JSON path (default bench/results/ingest-<source>-<time>.json)")
    args = p.parse_args(argv)

    source = os.path.abspath(args.source)
    files = list_audio(source)
    if not files:
        print(f"no audio files under {source}", file=sys.stderr)
        return 2
    if args.limit is not None:
        files = sorted(shuffled(files)[: args.limit])
    name = os.path.basename(source.rstrip("/")) or "source"

    if args.profile:
        text = profile_ours(files, args.profile_files)
        print(text)
        path = benchenv.result_path(f"profile-{name}", ".txt")
        with open(path, "w") as fh:
            fh.write(text)
        print(f"profile written to {path}")
        return 0

    durations = header_durations(files)
    res: dict[str, Any] = {
        "bench": "ingest",
        "started": benchenv.now(),
        "machine": benchenv.environment(VERSION_PACKAGES),
        "source": {"path": source, "files": len(files), "limit": args.limit,
                   "audio_header_s": sum(durations.values())},
        "workers": args.workers,
        "repeats": args.repeats,
        "pipeline": [],
        "single": {},
        "ratios": {},
    }
    print(f"{len(files)} audio files, {res['source']['audio_header_s'] / 60:.1f} min "
          f"(headers) under {source}", flush=True)

    if not args.skip_pipeline:
        ingest_source = write_manifest(files) if args.limit is not None else source
        print("pipeline, cold (own cluster and Prefect API, as `mtag ingest`) ...", flush=True)
        fig = run_pipeline(ingest_source, args.workers, keep_store=args.keep_stores)
        fig["label"] = "cold"
        res["pipeline"].append(fig)
        print(f"  wall {fig['wall_s']:.1f} s, {fig['per_core_x']:.1f}x realtime per core",
              flush=True)
        from flows.cluster import dask_cluster

        with dask_cluster(None, n_workers=args.workers) as cluster:
            run_pipeline(ingest_source, args.workers, dask_address=cluster.address)  # warm-up
            warm = []
            for i in range(args.pipeline_runs):
                print(f"pipeline, warm cluster, run {i + 1} ...", flush=True)
                fig = run_pipeline(ingest_source, args.workers, keep_store=args.keep_stores,
                                   dask_address=cluster.address)
                fig["label"] = f"warm {i + 1}"
                warm.append(fig)
                print(f"  wall {fig['wall_s']:.1f} s, {fig['per_core_x']:.1f}x realtime per "
                      f"core, {fig['ok']} ok, {fig['failed']} failed", flush=True)
        median = sorted(warm, key=lambda r: r["per_core_x"])[len(warm) // 2]
        median["label"] += "*"
        median["headline"] = True
        res["pipeline"] += warm

    if not args.skip_single:
        loop_files, note = loop_subset(files, durations, args.loop_limit, args.loop_max_audio_s)
        res["loop_files_note"] = note
        res["loop_files"] = loop_files if len(loop_files) < len(files) else "all"
        b = make_baselines()
        warm = min(files, key=lambda f: durations[f] or math.inf)
        with one_thread():
            for fn in METHODS.values():  # warm librosa/numba/soxr once before timing
                fn(warm, b)
            plan = [("floor", files), ("ours", files), ("plain_loop", loop_files)]
            if len(loop_files) < len(files):
                plan += [("floor_subset", loop_files), ("ours_subset", loop_files)]
            for key, subset in plan:
                fn = METHODS[key.removesuffix("_subset")]
                print(f"single process: {key} on {len(subset)} files x {args.repeats} ...",
                      flush=True)
                res["single"][key] = time_method(fn, subset, b, args.repeats)
                s = res["single"][key]
                print(f"  {s['realtime_x']:.1f}x realtime (median wall {s['wall_s']:.2f} s)",
                      flush=True)
        res["parallel"] = {}
        for key, subset in (("floor", files), ("ours", files), ("plain_loop", loop_files)):
            print(f"{args.workers} processes at once: {key} on {len(subset)} files ...",
                  flush=True)
            par = res["parallel"][key] = time_parallel(key, subset, args.workers)
            print(f"  {par['per_core_x']:.1f}x realtime per core (wall {par['wall_s']:.2f} s)",
                  flush=True)
    else:
        res["loop_files_note"] = "-"
    if not args.skip_shard:
        print(f"single process: (d) run_shard on {len(files)} files x {args.repeats} ...",
              flush=True)
        with one_thread():
            if args.skip_single:  # warm up (d) once, as the baselines do
                shard_inprocess(files[:1], args.workers, 1)
            s = res["single"]["shard"] = shard_inprocess(files, args.workers, args.repeats)
        print(f"  {s['realtime_x']:.1f}x realtime (median wall {s['wall_s']:.2f} s)",
              flush=True)

    res["ratios"] = compute_ratios(res)
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["finished"] = benchenv.now()
    table = render(res)
    if res.get("parallel") and res["pipeline"]:
        heads = [r for r in res["pipeline"] if r.get("headline")] or res["pipeline"][-1:]
        head = heads[0]["per_core_x"]
        cold = res["pipeline"][0]["per_core_x"]
        par = res["parallel"]
        lines = [f"\nsame cores, same contention: {args.workers} processes at once, per core",
                 f"  {'floor':24s} {par['floor']['per_core_x']:8.1f}x",
                 f"  {'ours in-process':24s} {par['ours']['per_core_x']:8.1f}x",
                 f"  {'plain loop':24s} {par['plain_loop']['per_core_x']:8.1f}x",
                 f"  {'pipeline (headline)':24s} {head:8.1f}x",
                 f"  {'pipeline, cold':24s} {cold:8.1f}x",
                 f"  pipeline / plain loop    {head / par['plain_loop']['per_core_x']:8.2f}"
                 "   target >= 3.5",
                 f"  pipeline / floor         {head / par['floor']['per_core_x']:8.2f}"
                 "   target >= 0.75",
                 f"  cold / plain loop, floor {cold / par['plain_loop']['per_core_x']:8.2f}"
                 f" {cold / par['floor']['per_core_x']:5.2f}",
                 f"  ours / plain loop        "
                 f"{par['ours']['per_core_x'] / par['plain_loop']['per_core_x']:8.2f}",
                 f"  ours / floor             "
                 f"{par['ours']['per_core_x'] / par['floor']['per_core_x']:8.2f}"]
        table += "\n".join(lines)
    res["table"] = table
    print()
    print(table)
    path = benchenv.write_json(res, f"ingest-{name.replace(' ', '_')}", args.out)
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
