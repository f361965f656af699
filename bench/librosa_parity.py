"""Feature parity with librosa on real audio: max deviation per feature over many files.

    .venv/bin/python bench/librosa_parity.py --source DIR [--limit N] [--seconds S]

Each file is decoded, mixed to mono and resampled to 22,050 Hz (soxr HQ) once; our features
(one streaming STFT, tasks.segment.SegmentStream) and librosa's (the same parameters, whole
signal) are computed on that same signal and compared frame by frame.
"""

from __future__ import annotations

import argparse
import glob
import os

import benchenv  # noqa: F401  (before tasks.*: puts the repository on sys.path)
import librosa
import numpy as np
import soundfile as sf
import soxr

from tasks.config import FeatureConfig
from tasks.features import SCALAR_FEATURES, SpectralExtractor, contrast_db, max_db
from tasks.segment import SegmentStream


def ours(y: np.ndarray, c: FeatureConfig, ex: SpectralExtractor):
    stream = SegmentStream(c, ex, chunk_frames=1024)
    segs = []
    for i in range(0, y.size, 65536):
        segs += stream.push(y[i:i + 65536])
    segs += stream.finish()
    n_valid = 1 + y.size // c.hop_length
    cat = {k: np.concatenate([getattr(s.frames, k) for s in segs])[:n_valid]
           for k in ("logmel", "mfcc", "chroma", "scalars", "contrast_peak", "contrast_valley")}
    cat["contrast"] = contrast_db(cat["contrast_peak"], cat["contrast_valley"],
                                  peak_max_db=max_db(cat["contrast_peak"]),
                                  valley_max_db=max_db(cat["contrast_valley"]))
    return cat


def reference(y, c):
    S = np.abs(librosa.stft(y, n_fft=c.n_fft, hop_length=c.hop_length))
    mel = librosa.power_to_db(librosa.feature.melspectrogram(S=S**2, sr=c.sample_rate),
                              top_db=None)
    return {
        "logmel": mel.T, "mfcc": librosa.feature.mfcc(S=mel, n_mfcc=c.n_mfcc).T,
        "chroma": librosa.feature.chroma_stft(S=S**2, sr=c.sample_rate, tuning=0.0).T,
        "centroid": librosa.feature.spectral_centroid(S=S, sr=c.sample_rate)[0],
        "bandwidth": librosa.feature.spectral_bandwidth(S=S, sr=c.sample_rate)[0],
        "rolloff": librosa.feature.spectral_rolloff(S=S, sr=c.sample_rate)[0],
        "flatness": librosa.feature.spectral_flatness(S=S)[0],
        "zcr": librosa.feature.zero_crossing_rate(y)[0],
        "rms": librosa.feature.rms(y=y)[0],
        "contrast": librosa.feature.spectral_contrast(S=S, sr=c.sample_rate).T,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=60.0, help="first S seconds of each file")
    args = ap.parse_args()
    files = sorted(p for ext in ("ogg", "mp3", "wav", "flac")
                   for p in glob.glob(os.path.join(args.source, "**", f"*.{ext}"),
                                      recursive=True))
    step = max(1, len(files) // args.limit)
    files = files[::step][: args.limit]
    c = FeatureConfig(min_tail_s=0.0)  # keep every tail so segments cover every frame
    ex = SpectralExtractor(c)
    worst: dict[str, float] = {}
    rel: dict[str, float] = {}
    for path in files:
        info = sf.info(path)
        y, sr = sf.read(path, dtype="float32", always_2d=True,
                        frames=int(args.seconds * info.samplerate))
        y = soxr.resample(y.mean(axis=1), sr, c.sample_rate, "HQ").astype(np.float32)
        got, ref = ours(y, c, ex), reference(y, c)
        for name in ("logmel", "mfcc", "chroma", "contrast"):
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got[name] - ref[name]).max()))
        for i, name in enumerate(SCALAR_FEATURES):
            d = np.abs(got["scalars"][:, i] - ref[name])
            worst[name] = max(worst.get(name, 0.0), float(d.max()))
            scale = np.maximum(np.abs(ref[name]), 1e-9)
            rel[name] = max(rel.get(name, 0.0), float(np.median(d / scale)))
    print(f"{len(files)} files from {args.source} (first {args.seconds:.0f} s each)")
    print(f"{'feature':12s} {'max |ours - librosa|':>22s} {'median rel':>12s}")
    for name, value in worst.items():
        print(f"{name:12s} {value:22.3g} {rel.get(name, float('nan')):12.2g}")


if __name__ == "__main__":
    main()
