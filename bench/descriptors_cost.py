"""Cost of the track descriptors (tasks.descriptors) against the pipeline's own extraction.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/descriptors_cost.py [--seconds 60] [--reps 7]

One signal per kind, 44.1 kHz stereo, ``--seconds`` long: ``music`` (tasks.synth's dance style,
drums and all, rendered once), ``sine`` (a 1 kHz tone at -3 dBFS: every sample lies within
6.2 dB of the peak, the true peak's worst case) and ``noise``. For each, interleaved ``--reps``
times so that a busy machine slows both alike: ``tasks.track.extract_track`` on the signal
(in 6-s native blocks, as decode yields them), then each accumulator on what the pipeline
hands it (native blocks for the loudness meter; the segments' valid log-mel and chroma frames
for tempo and key), then ``TrackDescriptors`` fed the same way. Times are process CPU time
(``time.process_time``, which a loaded machine distorts less than wall time) per minute of
audio; the ratio is the descriptors' median over extract_track's median. Also prints the
tempo/key accuracy on rendered pieces of known tempo and key (tasks.synth, every style), as
a check on music rather than clicks. Writes ``bench/results/descriptors-<time>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchenv
import numpy as np

from tasks.config import FeatureConfig
from tasks.descriptors import (
    KEY_NAMES,
    KeyEstimator,
    LoudnessMeter,
    TempoEstimator,
    TrackDescriptors,
)
from tasks.features import SCALAR_FEATURES, SpectralExtractor
from tasks.segment import SegmentStream
from tasks.synth import STYLES, render_track
from tasks.track import extract_track

RATE = 44100
BLOCK = 1 << 18  # decode's DEFAULT_BLOCK_FRAMES


def signals(seconds: float) -> dict[str, np.ndarray]:
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    tone = (10 ** (-3 / 20) * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    rng = np.random.default_rng(7)
    return {
        "music": render_track("piano", "dance", seconds=seconds, sample_rate=RATE, seed=3),
        "sine": np.stack([tone, tone]),
        "noise": (0.1 * rng.standard_normal((2, n))).astype(np.float32),
    }


def segments_of(y: np.ndarray, config: FeatureConfig, ex: SpectralExtractor) -> list:
    """The segments extract_track's stream makes of the same signal (for tempo and key)."""
    from tasks.audio import StreamResampler, to_mono

    res = StreamResampler(RATE, config.sample_rate, quality=config.resample_quality)
    stream = SegmentStream(config, ex)
    segs = []
    for i in range(0, y.shape[1], BLOCK):
        segs += stream.push(res.push(to_mono(y[:, i:i + BLOCK])))
    segs += stream.push(res.finish())
    return segs + stream.finish()


def time_kind(y: np.ndarray, reps: int, config: FeatureConfig, ex: SpectralExtractor
              ) -> dict[str, float]:
    blocks = [np.ascontiguousarray(y[:, i:i + BLOCK]) for i in range(0, y.shape[1], BLOCK)]
    segs = segments_of(y, config, ex)
    rms = SCALAR_FEATURES.index("rms")
    fr = config.sample_rate / config.hop_length

    def extract() -> None:
        extract_track(blocks, RATE, config, ex, lambda batch: None)

    def loudness() -> None:
        m = LoudnessMeter(RATE, 2)
        for b in blocks:
            m.push(b)
        m.finish()

    def tempo() -> None:
        t = TempoEstimator(fr)
        for s in segs:
            t.push_logmel(s.frames.logmel[: s.span.valid_frames])
        t.finish()

    def key() -> None:
        k = KeyEstimator()
        for s in segs:
            n = s.span.valid_frames
            k.push(s.frames.chroma[:n], s.frames.scalars[:n, rms])
        k.finish()

    def bundle() -> None:
        d = TrackDescriptors.for_config(RATE, config, 2)
        for b in blocks:
            d.push_block(b)
        d.push_segments(segs)
        d.finish()

    parts = {"extract_track": extract, "loudness": loudness, "tempo": tempo, "key": key,
             "descriptors": bundle}
    for f in parts.values():  # compile and warm up
        f()
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(reps):
        for name, f in parts.items():
            t0 = time.process_time()  # CPU time: other load on the machine counts less
            f()
            times[name].append(time.process_time() - t0)
    minutes = y.shape[1] / RATE / 60
    out = {f"{k}_ms_per_min": 1e3 * statistics.median(v) / minutes for k, v in times.items()}
    out.update({f"{k}_min_ms_per_min": 1e3 * min(v) / minutes for k, v in times.items()})
    out["ratio"] = statistics.median(times["descriptors"]) / statistics.median(
        times["extract_track"])
    return out


def _synth_truth(style: str, seed: int) -> tuple[int, str, float]:
    """Tonic, mode and tempo that tasks.synth draws first from ``seed`` (its _compose order)."""
    from tasks.synth import _PROGRESSIONS

    rng = np.random.default_rng(seed)
    mode = "major" if rng.random() < 0.6 else "minor"
    tonic = int(rng.integers(0, 12))
    rng.integers(len(_PROGRESSIONS[mode]))
    return tonic, mode, float(rng.uniform(*STYLES[style].tempo))


def accuracy(n_per_style: int, seconds: float, config: FeatureConfig,
             ex: SpectralExtractor) -> dict[str, object]:
    rows = []
    for style in STYLES:
        for seed in range(n_per_style):
            tonic, mode, bpm = _synth_truth(style, seed)
            y = render_track("piano", style, seconds=seconds, sample_rate=22050, seed=seed)
            stream = SegmentStream(config, ex)
            d = TrackDescriptors.for_config(22050, config, 2)
            d.push_block(y)
            d.push_segments(stream.push(y.mean(axis=0)))
            d.push_segments(stream.finish())
            r = d.finish()
            ratio = r["tempo_bpm"] / bpm if r["tempo_bpm"] else float("nan")
            rows.append({"style": style, "seed": seed, "bpm": bpm, "tempo": r["tempo_bpm"],
                         "ratio": ratio, "key": f"{KEY_NAMES[tonic]} {mode}",
                         "est_key": f"{r['key']} {r['mode']}"})
    within = sum(abs(r["ratio"] - 1) <= 0.02 for r in rows)
    octave = sum(min(abs(r["ratio"] - m) for m in (0.5, 2.0, 1 / 3, 3.0)) <= 0.04
                 for r in rows)
    keys = sum(r["key"] == r["est_key"] for r in rows)
    return {"pieces": len(rows), "tempo_within_2pct": within, "tempo_octave_errors": octave,
            "key_exact": keys, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pieces", type=int, default=8, help="rendered pieces per style")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = benchenv.environment(("mtag", "numpy", "numba", "scipy", "soxr", "librosa"))
    config = FeatureConfig()
    ex = SpectralExtractor(config)
    result: dict[str, object] = {"machine": env, "seconds": args.seconds, "reps": args.reps}
    print(f"{'signal':8} {'extract':>8} {'loudness':>9} {'tempo':>6} {'key':>6} "
          f"{'all':>6} {'ratio':>6}   (ms per minute of 44.1 kHz stereo, medians)")
    for kind, y in signals(args.seconds).items():
        r = time_kind(y, args.reps, config, ex)
        result[kind] = r
        print(f"{kind:8} {r['extract_track_ms_per_min']:8.1f} {r['loudness_ms_per_min']:9.1f} "
              f"{r['tempo_ms_per_min']:6.1f} {r['key_ms_per_min']:6.1f} "
              f"{r['descriptors_ms_per_min']:6.1f} {r['ratio']:6.1%}")
    acc = accuracy(args.pieces, 30.0, config, ex)
    result["synth_accuracy"] = acc
    print(f"rendered pieces: {acc['pieces']}; tempo within 2 %: {acc['tempo_within_2pct']}, "
          f"octave errors: {acc['tempo_octave_errors']}; key exact: {acc['key_exact']}")
    env["loadavg_end"] = __import__("os").getloadavg()
    path = benchenv.write_json(result, "descriptors", args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
