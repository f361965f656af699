"""Test audio made on the spot: tones, noise, catalogues with awkward files."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import soundfile as sf


def tone(freq: float, seconds: float, sr: int = 22050, *, amp: float = 0.5,
         noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A sine of ``freq`` Hz plus optional white noise, float32, shape (n,)."""
    t = np.arange(int(round(seconds * sr))) / sr
    y = amp * np.sin(2 * np.pi * freq * t)
    if noise:
        y = y + noise * np.random.default_rng(seed).standard_normal(t.size)
    return y.astype(np.float32)


def music_like(seconds: float, sr: int = 22050, *, seed: int = 0) -> np.ndarray:
    """Harmonic notes with decaying envelopes and a little noise: a broadband test signal."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    y = np.zeros(n, dtype=np.float64)
    pos = 0
    while pos < n:
        length = int(sr * rng.uniform(0.2, 0.6))
        f0 = 110.0 * 2 ** (rng.integers(0, 36) / 12)
        t = np.arange(min(length, n - pos)) / sr
        env = np.exp(-t * rng.uniform(2, 8))
        note = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6))
        y[pos:pos + t.size] += 0.3 * env * note
        pos += length
    y += 0.01 * rng.standard_normal(n)
    return y.astype(np.float32)


def write(path: str, y: np.ndarray, sr: int, **kwargs: object) -> str:
    """Write audio (``(n,)`` or ``(channels, n)``) with soundfile; create folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = y.T if y.ndim == 2 else y
    sf.write(path, data, sr, **kwargs)
    return path


def awkward_catalogue(root: str) -> dict[str, str]:
    """The bad-input cases of the ingest issue, with the expected status of each file.

    Returns
    -------
    dict
        File name (relative to ``root``) -> expected ``tracks.status``.
    """
    expected: dict[str, str] = {}
    sr = 22050

    def add(name: str, status: str) -> str:
        expected[name] = status
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    write(add("good/tone 440 é.wav", "ok"), tone(440, 4.0, sr, noise=0.01), sr)
    write(add("good/music.flac", "ok"), music_like(7.0, 44100, seed=1), 44100)
    write(add("good/voice.ogg", "ok"), music_like(5.0, 48000, seed=2), 48000)
    write(add("rates/8k.wav", "ok"), tone(300, 3.5, 8000), 8000)
    write(add("rates/96k.wav", "ok"), tone(1000, 3.5, 96000), 96000)
    six = np.stack([tone(200 * (c + 1), 3.2, 48000) for c in range(6)])
    write(add("rates/six channels.wav", "ok"), six, 48000)
    write(add("edge/silence.wav", "ok"), np.zeros(sr * 2, dtype=np.float32), sr)
    write(add("edge/one sample.wav", "ok"), np.array([0.25], dtype=np.float32), sr)
    write(add("edge/ünïcödé 曲.aiff", "ok"), tone(523.25, 3.0, sr), sr)
    bad = tone(440, 3.0, sr)
    bad[1000] = np.nan
    bad[2000] = np.inf
    write(add("bad/nan inf.wav", "failed"), bad, sr, subtype="FLOAT")
    open(add("bad/zero bytes.wav", "failed"), "wb").close()
    with open(add("bad/text.mp3", "failed"), "w") as fh:
        fh.write("this is not an mp3 file\n" * 50)
    full = write(os.path.join(root, "_tmp_full.flac"), music_like(6.0, sr, seed=3), sr)
    with open(full, "rb") as fh:
        data = fh.read()
    os.remove(full)
    with open(add("bad/truncated.flac", "ok|failed"), "wb") as fh:
        fh.write(data[: len(data) // 3])
    with open(add("other/cover.jpg", "unsupported"), "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    return expected


def write_labels(path: str | os.PathLike[str], rows: Iterable[Mapping[str, object]],
                 fields: tuple[str, ...] = ("path", "label")) -> str:
    """A labels CSV with ``fields`` of ``rows`` (other keys ignored); returns its path."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_shard(store, shard_id, tracks, *, spill_bytes=64 << 20, fail=(), staging=False,
                config=None):
    """Write a shard of (track_id, seconds) tracks into place, uncommitted; return
    (WrittenShard, scratch folder).

    ``staging``: use a scratch folder of the store's ``_staging/`` and keep it (as a worker
    that died would); otherwise a private one, removed afterwards, so ``recover()`` counts
    only what the test is about.
    """
    import shutil
    import tempfile

    from featurestore.writer import ShardWriter
    from tasks.config import FeatureConfig
    from tasks.features import SpectralExtractor
    from tasks.track import extract_track

    C = config or FeatureConfig()
    ex = SpectralExtractor(C)
    scratch = store.staging_dir(C.feature_set_id, shard_id) if staging else tempfile.mkdtemp()
    with ShardWriter(store, scratch, C, shard_id, spill_bytes=spill_bytes) as w:
        for i, (tid, seconds) in enumerate(tracks):
            row = {"track_id": tid, "path": f"/music/{tid}.wav", "status": "ok",
                   "content_hash": tid * 2, "format": "wav"}
            w.begin_track(tid)
            result = extract_track([music_like(seconds, 22050, seed=i)[None]], 22050, C, ex,
                                   w.add_batch)
            if tid in fail:
                w.fail_track(row | {"status": "failed", "stage": "features", "error": "boom"})
            else:
                w.end_track(row | {"duration_s": result.duration_s}, result)
    if not staging:
        shutil.rmtree(scratch)
    return w.written, scratch


def temp_entries(prefix: str) -> set[str]:
    """Names in the temporary folder that start with ``prefix``."""
    import tempfile

    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith(prefix)}


def model_downloads() -> set[str]:
    """Names of the model downloads and copies now in the temporary folder."""
    from training.local_registry import DOWNLOAD_PREFIX

    return temp_entries(DOWNLOAD_PREFIX)


def load_registered(model_uri: str, **kwargs: Any) -> Any:
    """The tagger of a registered model, loaded whole from a download that is then removed
    (``kwargs`` go to :func:`training.artifact.load`).
    """
    from training import tracking
    from training.artifact import load

    directory = tracking.load_artifact_dir(model_uri)
    try:
        return load(directory, **kwargs)
    finally:
        tracking.remove_artifact_dir(directory)
