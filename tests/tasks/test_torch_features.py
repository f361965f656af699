"""The torch feature path against the numpy one, batching, and how the device is chosen.

Everything runs here with torch on the CPU (``TorchSpectralExtractor(config, "cpu")``): the
same code as on a GPU, other FFT and BLAS kernels. ``test_cuda_*`` run only where torch sees a
CUDA device.

Tolerances, torch against numpy, are those ``tests/tasks/test_features.py`` (and
docs/features.md) allow against librosa: log-mel 0.05 dB, MFCC 0.6, chroma, flatness, rms and
zcr 1e-5 absolute, centroid and bandwidth 1e-5 relative (1e-3 Hz absolute), contrast 0.5 dB
(after ``contrast_db``); rolloff the same bin in at least 99 % of frames and never more than
one bin apart (exact on every signal here with torch on the CPU; a float32 running sum that
lands on the 85 % threshold can step one bin on other FFTs). Measured with torch on the CPU the
differences are far smaller (log-mel under 1e-4 dB, MFCC under 1e-4, centroid 2e-7 relative,
zcr and rms identical). As in test_features.py, every signal but silence has a noise floor:
without one, far-bin values are the FFT's own rounding noise.
"""

from __future__ import annotations

import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
from factories import music_like, tone

from tasks.columns import summary_columns
from tasks.config import FeatureConfig
from tasks.errors import ParameterError
from tasks.features import SCALAR_FEATURES, FrameFeatures, SpectralExtractor, contrast_db, max_db
from tasks.segment import SegmentStream
from tasks.torch_features import (
    FEATURE_DEVICE_ENV,
    TorchSpectralExtractor,
    gpu_possible,
    make_extractor,
    resolve_device,
)
from tasks.track import extract_track

torch = pytest.importorskip("torch")

SR = 22050
C = FeatureConfig()
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
no_cuda = pytest.mark.skipif(CUDA, reason="a CUDA device is present")
FIELDS = ("logmel", "mfcc", "chroma", "scalars", "contrast_peak", "contrast_valley")


def rendered() -> np.ndarray:
    from tasks.synth import render_track

    stereo = render_track("piano", "ballad", seconds=4.0, sample_rate=SR, seed=3)
    return (stereo.mean(axis=0) + tone(0, 4.0, SR, amp=0, noise=1e-4)).astype(np.float32)


SIGNALS = {
    "tone+noise": lambda: tone(440, 4.0, SR, noise=0.05),
    "music-like": lambda: music_like(6.0, SR, seed=4),
    "white noise": lambda: (0.1 * np.random.default_rng(5).standard_normal(SR * 3)
                            ).astype(np.float32),
    "silence": lambda: np.zeros(SR * 2, dtype=np.float32),
    "short, uneven end": lambda: music_like(1.37, SR, seed=6)[: SR + 777],
    "chirp": lambda: (librosa.chirp(fmin=100, fmax=8000, sr=SR, duration=3.0)
                      + tone(0, 3.0, SR, amp=0, noise=1e-3)).astype(np.float32),
    "soundfont piano": rendered,
}


def centred(y: np.ndarray, c: FeatureConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """librosa's centring: zero padding (edge padding for the zcr), exactly enough samples."""
    pad = c.n_fft // 2
    n_frames = 1 + y.size // c.hop_length
    need = (n_frames - 1) * c.hop_length + c.n_fft
    buf = np.pad(y, (pad, need - pad - y.size))
    zbuf = np.pad(y, (pad, need - pad - y.size), mode="edge")
    assert buf.size == need
    return buf, zbuf, n_frames


def assert_close(got: FrameFeatures, ref: FrameFeatures, c: FeatureConfig) -> None:
    """The documented tolerances (module docstring), field by field."""
    assert len(got) == len(ref)
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        assert a.dtype == b.dtype == np.float32, f
        assert a.shape == b.shape, f
        assert a.flags.c_contiguous, f
    np.testing.assert_allclose(got.logmel, ref.logmel, atol=0.05, rtol=0)
    np.testing.assert_allclose(got.mfcc, ref.mfcc, atol=0.6, rtol=0)
    np.testing.assert_allclose(got.chroma, ref.chroma, atol=1e-5, rtol=0)
    for i, feat in enumerate(SCALAR_FEATURES):
        a, b = got.scalars[:, i], ref.scalars[:, i]
        if feat in ("centroid", "bandwidth"):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3, err_msg=feat)
        elif feat == "rolloff":
            bin_hz = c.sample_rate / c.n_fft
            assert np.mean(a == b) >= 0.99, feat
            assert np.max(np.abs(a - b)) <= bin_hz * 1.001, feat
        else:
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=feat)

    def contrast(x: FrameFeatures) -> np.ndarray:
        return contrast_db(x.contrast_peak, x.contrast_valley,
                           peak_max_db=max_db(x.contrast_peak),
                           valley_max_db=max_db(x.contrast_valley))

    np.testing.assert_allclose(contrast(got), contrast(ref), atol=0.5, rtol=0)


@pytest.fixture(scope="module")
def extractors() -> tuple[SpectralExtractor, TorchSpectralExtractor]:
    return SpectralExtractor(C), TorchSpectralExtractor(C, "cpu")


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_every_field_matches_the_numpy_path(name, extractors):
    ex, tx = extractors
    buf, zbuf, n = centred(SIGNALS[name](), C)
    ref = ex.frames(buf, n, zcr_buf=zbuf)
    got = tx.frames(buf, n, zcr_buf=zbuf)
    assert_close(got, ref, C)
    # the time-domain features are exact sums either way
    np.testing.assert_array_equal(got.scalars[:, 4], ref.scalars[:, 4])  # zcr
    np.testing.assert_allclose(got.scalars[:, 5], ref.scalars[:, 5], rtol=1e-6, atol=1e-9)


def test_measured_differences_are_far_inside_the_tolerances(extractors):
    """Not just inside the tolerances: at float32 rounding (at least 3-50x below them)."""
    ex, tx = extractors
    buf, zbuf, n = centred(music_like(8.0, SR, seed=11), C)
    ref, got = ex.frames(buf, n, zcr_buf=zbuf), tx.frames(buf, n, zcr_buf=zbuf)
    assert np.abs(got.logmel - ref.logmel).max() < 1e-3
    assert np.abs(got.mfcc - ref.mfcc).max() < 1e-3
    assert np.abs(got.chroma - ref.chroma).max() < 3e-6
    np.testing.assert_allclose(got.scalars[:, :2], ref.scalars[:, :2], rtol=1e-6)
    np.testing.assert_array_equal(got.scalars[:, 2], ref.scalars[:, 2])


def test_silence_floor_and_the_silence_frame(extractors):
    ex, tx = extractors
    buf, _, n = centred(np.zeros(SR, dtype=np.float32), C)
    got = tx.frames(buf, n)
    assert np.all(got.logmel == pytest.approx(-100.0, abs=1e-4))
    assert np.all(got.scalars[:, [0, 1, 2, 4, 5]] == 0.0)
    assert_close(tx.silence(5), ex.silence(5), C)


@pytest.mark.parametrize("config", [
    FeatureConfig(n_mels=64, n_mfcc=13, n_fft=1024, hop_length=256, contrast_bands=5),
    FeatureConfig(hop_length=300),  # frames are not whole hops: the other rms path
    FeatureConfig(n_chroma=24, fmin=30.0, fmax=8000.0, rolloff_percent=0.5),
], ids=["small fft", "hop 300", "chroma 24, fmax"])
def test_other_parameters_follow_config(config):
    y = music_like(3.0, SR, seed=9)
    buf, zbuf, n = centred(y, config)
    ref = SpectralExtractor(config).frames(buf, n, zcr_buf=zbuf)
    got = TorchSpectralExtractor(config, "cpu").frames(buf, n, zcr_buf=zbuf)
    assert got.logmel.shape[1] == config.n_mels and got.chroma.shape[1] == config.n_chroma
    assert_close(got, ref, config)


def segments_of(y: np.ndarray, c: FeatureConfig) -> list[np.ndarray]:
    frames, hop = c.segment_frames, c.hop_length
    need = (frames - 1) * hop + c.n_fft
    buf = np.pad(y, (c.n_fft // 2, need))
    return [buf[k * frames * hop:k * frames * hop + need]
            for k in range(y.size // (frames * hop) + 1)]


def test_batch_equals_one_by_one(extractors):
    _, tx = extractors
    y = music_like(14.0, SR, seed=2)
    segs = segments_of(y, C)
    # different lengths in one batch too, with and without an edge-padded zcr buffer
    bufs = [*segs, y[:9000], y[:C.n_fft]]
    counts = [C.segment_frames] * len(segs) + [1 + (9000 - C.n_fft) // C.hop_length, 1]
    zcr = [None] * len(segs) + [np.maximum(y[:9000], 0.0), None]
    batched = tx.frames_batch(bufs, counts, zcr_bufs=zcr)
    assert [len(b) for b in batched] == counts
    for b, buf, n, z in zip(batched, bufs, counts, zcr, strict=True):
        one = tx.frames(buf, n, zcr_buf=z)
        for f in FIELDS:
            np.testing.assert_allclose(getattr(b, f), getattr(one, f), rtol=1e-6, atol=1e-5,
                                       err_msg=f)
        np.testing.assert_array_equal(b.scalars[:, 2:], one.scalars[:, 2:])  # bins, counts
    # each item's fields own their memory: keeping one segment does not keep the batch
    assert all(getattr(b, f).base is None for b in batched for f in FIELDS)


def test_batches_split_at_max_batch_frames_give_the_same_answer():
    y = music_like(12.0, SR, seed=8)
    segs = segments_of(y, C)
    counts = [C.segment_frames] * len(segs)
    whole = TorchSpectralExtractor(C, "cpu").frames_batch(segs, counts)
    split = TorchSpectralExtractor(C, "cpu", max_batch_frames=200).frames_batch(segs, counts)
    for a, b in zip(whole, split, strict=True):
        for f in FIELDS:
            np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-6, atol=1e-5)


def test_a_buffer_longer_than_a_batch_is_cut_into_pieces(extractors):
    _, tx = extractors
    buf, zbuf, n = centred(music_like(7.0, SR, seed=12), C)
    small = TorchSpectralExtractor(C, "cpu", max_batch_frames=50)
    whole, pieces = tx.frames(buf, n, zcr_buf=zbuf), small.frames(buf, n, zcr_buf=zbuf)
    assert len(pieces) == n > 50 * 6
    for f in FIELDS:
        np.testing.assert_allclose(getattr(pieces, f), getattr(whole, f), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(pieces.scalars[:, 2:], whole.scalars[:, 2:])


def test_frames_rejects_short_buffers(extractors):
    _, tx = extractors
    with pytest.raises(ValueError, match="need"):
        tx.frames(np.zeros(100, dtype=np.float32), 2)
    with pytest.raises(ValueError, match="zcr"):
        tx.frames(np.zeros(4096, dtype=np.float32), 2, zcr_buf=np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="frame counts"):
        tx.frames_batch([np.zeros(4096, np.float32)], [1, 2])


def test_segment_stream_and_extract_track_use_it_unchanged(extractors):
    """The streaming path (chunks, edge-padded zcr, silence tail) and the per-segment
    statistics: the same segments, values within the tolerances."""
    ex, tx = extractors
    y = np.stack([music_like(11.3, 44100, seed=1), music_like(11.3, 44100, seed=2)])

    def run(extractor: SpectralExtractor):
        batches: list = []
        blocks = [y[:, i:i + 30_000] for i in range(0, y.shape[1], 30_000)]
        return extract_track(blocks, 44100, C, extractor, batches.append), batches

    (ref, ref_b), (got, got_b) = run(ex), run(tx)
    np.testing.assert_array_equal(got.segment_index, ref.segment_index)
    np.testing.assert_array_equal(got.valid_frames, ref.valid_frames)
    assert got.stats.shape == ref.stats.shape
    # the per-segment statistics within the features' own tolerances: contrast is 0.5 dB
    # (a contrast std differed by 0.003 dB on one machine's CPU), the rest 1e-3
    names = summary_columns(C)
    con = np.array([n.startswith("contrast_") for n in names])
    np.testing.assert_allclose(got.stats[:, ~con], ref.stats[:, ~con], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got.stats[:, con], ref.stats[:, con], rtol=0, atol=0.5)
    for a, b in zip(got_b, ref_b, strict=True):
        np.testing.assert_allclose(a.logmel, b.logmel, atol=0.05, rtol=0)
        np.testing.assert_allclose(a.mfcc, b.mfcc, atol=0.6, rtol=0)
    assert got.descriptors["key"] == ref.descriptors["key"]
    assert got.descriptors["tempo_bpm"] == pytest.approx(ref.descriptors["tempo_bpm"], rel=1e-3)

    stream = SegmentStream(C, tx, chunk_frames=300)
    segs = stream.push(y[0, : 5 * SR]) + stream.finish()
    assert [s.span.index for s in segs] == [0, 1]


# ----------------------------------------------------------------------------------------
# choosing the device
def test_cpu_setting_gives_the_numpy_extractor(monkeypatch):
    monkeypatch.setenv(FEATURE_DEVICE_ENV, "cpu")
    assert resolve_device() == "cpu"
    assert type(make_extractor(C)) is SpectralExtractor
    monkeypatch.setenv(FEATURE_DEVICE_ENV, " CPU ")
    assert resolve_device() == "cpu"


def test_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(FEATURE_DEVICE_ENV, "cuda:7")
    assert type(make_extractor(C, "cpu")) is SpectralExtractor


@pytest.mark.parametrize("name", ["tpu", "cuda0", "cuda:x", "gpu"])
def test_unknown_device_names_are_refused(monkeypatch, name):
    monkeypatch.setenv(FEATURE_DEVICE_ENV, name)
    with pytest.raises(ParameterError, match=f"{FEATURE_DEVICE_ENV}.*auto, cpu, cuda"):
        resolve_device()
    with pytest.raises(ParameterError, match="argument"):
        resolve_device(name)


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_device_is_a_clear_error(monkeypatch, name):
    monkeypatch.setenv(FEATURE_DEVICE_ENV, name)
    with pytest.raises(ParameterError, match=r"sees no CUDA device.*MTAG_FEATURE_DEVICE=auto"):
        make_extractor(C)
    with pytest.raises(ParameterError):
        TorchSpectralExtractor(C, "cuda")


@no_cuda
@pytest.mark.parametrize("value", [None, "", "auto"])
def test_auto_without_a_device_is_numpy(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(FEATURE_DEVICE_ENV, raising=False)
    else:
        monkeypatch.setenv(FEATURE_DEVICE_ENV, value)
    assert resolve_device() == "cpu"
    assert type(make_extractor(C)) is SpectralExtractor


def test_hidden_devices_mean_no_gpu(monkeypatch):
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not gpu_possible()
        assert resolve_device("auto") == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_possible()  # torch is imported in this process: ask it


def test_auto_does_not_import_torch_without_a_gpu():
    """A CPU worker does not pay torch's import (2-3 s) to find out there is no GPU."""
    code = ("import sys; from tasks.config import FeatureConfig; "
            "from tasks.torch_features import make_extractor, gpu_possible; "
            "e = make_extractor(FeatureConfig()); "
            "print(type(e).__name__, 'torch' in sys.modules, gpu_possible())")
    env = {k: v for k, v in os.environ.items() if k != FEATURE_DEVICE_ENV}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=root, check=True, timeout=120).stdout.split()
    possible = out[2] == "True"
    if not possible:
        assert out[:2] == ["SpectralExtractor", "False"]
    elif not CUDA:  # a GPU driver but no CUDA for this torch: asked torch, got numpy
        assert out[:2] == ["SpectralExtractor", "True"]
    else:
        assert out[:2] == ["TorchSpectralExtractor", "True"]


def test_the_device_is_not_part_of_the_feature_set(monkeypatch):
    assert not any("device" in k for k in FeatureConfig().to_dict())
    ids = set()
    for value in ("cpu", "auto", "cuda", "cuda:3"):
        monkeypatch.setenv(FEATURE_DEVICE_ENV, value)
        ids.add(FeatureConfig().feature_set_id)
    assert ids == {C.feature_set_id}
    tx = TorchSpectralExtractor(C, "cpu")
    assert tx.config.feature_set_id == SpectralExtractor(C).config.feature_set_id


def test_the_ingest_worker_follows_the_setting(monkeypatch):
    from flows.ingest_worker import _extractor

    monkeypatch.setenv(FEATURE_DEVICE_ENV, "cpu")
    _extractor.cache_clear()
    try:
        assert type(_extractor(C.to_json())) is SpectralExtractor
        if not CUDA:
            _extractor.cache_clear()
            monkeypatch.setenv(FEATURE_DEVICE_ENV, "cuda")
            with pytest.raises(ParameterError, match="no CUDA device"):
                _extractor(C.to_json())
    finally:
        _extractor.cache_clear()


# ----------------------------------------------------------------------------------------
# on a GPU
@needs_cuda
@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_cuda_matches_the_numpy_path(name, extractors):
    ex, _ = extractors
    gx = TorchSpectralExtractor(C, "cuda")
    buf, zbuf, n = centred(SIGNALS[name](), C)
    assert_close(gx.frames(buf, n, zcr_buf=zbuf), ex.frames(buf, n, zcr_buf=zbuf), C)
    segs = segments_of(music_like(20.0, SR, seed=3), C)
    counts = [C.segment_frames] * len(segs)
    for a, s in zip(gx.frames_batch(segs, counts), segs, strict=True):
        assert_close(a, ex.frames(s, C.segment_frames), C)


@needs_cuda
def test_cuda_auto_and_tf32_setting(monkeypatch, extractors):
    ex, _ = extractors
    monkeypatch.setenv(FEATURE_DEVICE_ENV, "auto")
    gx = make_extractor(C)
    assert isinstance(gx, TorchSpectralExtractor) and gx.device.type == "cuda"
    buf, zbuf, n = centred(music_like(6.0, SR, seed=4), C)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed in the process
    try:
        got = gx.frames(buf, n, zcr_buf=zbuf)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert_close(got, ex.frames(buf, n, zcr_buf=zbuf), C)
    assert np.abs(got.logmel - ex.frames(buf, n, zcr_buf=zbuf).logmel).max() < 5e-3
