from __future__ import annotations

import numpy as np
import pytest
from factories import music_like

from tasks.config import FeatureConfig
from tasks.features import SpectralExtractor
from tasks.segment import SegmentStream, plan_segments, valid_frames
from tasks.track import extract_track

C = FeatureConfig()
F = C.segment_frames  # 129


def spans(n_valid, config=C):
    return [(s.index, s.start_frame, s.valid_frames) for s in plan_segments(n_valid, config)]


def test_short_track_gives_one_padded_segment():
    assert spans(1) == [(0, 0, 1)]
    assert spans(50) == [(0, 0, 50)]


def test_exact_multiple_has_no_tail():
    assert spans(2 * F) == [(0, 0, F), (1, F, F)]


def test_tail_kept_only_above_min_tail():
    min_tail = C.min_tail_frames  # 43 frames ~ 1 s
    assert spans(F + min_tail) == [(0, 0, F), (1, F, min_tail)]
    assert spans(F + min_tail - 1) == [(0, 0, F)]


def test_overlapping_segments_stop_when_covered():
    c = FeatureConfig(segment_hop_s=1.5)
    hop = c.segment_hop_frames
    got = spans(F + hop, c)
    assert [s[1] for s in got] == [0, hop]
    assert got[-1][2] == F


def test_valid_frames_follows_librosa_centering():
    assert valid_frames(0, 512) == 1
    assert valid_frames(22050, 512) == 44
    assert valid_frames(1024, 512) == 3


@pytest.mark.parametrize("block", [1000, 4096, 100_000])
def test_block_size_does_not_change_features(block):
    y = music_like(20.0, 22050, seed=3)
    ex = SpectralExtractor(C)

    def run(step, chunk):
        stream = SegmentStream(C, ex, chunk_frames=chunk)
        out = []
        for i in range(0, y.size, step):
            out += stream.push(y[i:i + step])
        return out + stream.finish()

    whole = run(y.size, 4096)
    parts = run(block, F)  # smallest chunk: a segment's worth of frames
    assert [s.span for s in whole] == [s.span for s in parts]
    for a, b in zip(whole, parts, strict=True):
        # identical up to float32 rounding (BLAS blocking depends on the chunk size)
        np.testing.assert_allclose(a.frames.logmel, b.frames.logmel, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(a.frames.scalars, b.frames.scalars, rtol=1e-6, atol=1e-6)


def test_extract_track_batches_and_stats():
    sr = 44100
    stereo = np.stack([music_like(10.0, sr, seed=1), music_like(10.0, sr, seed=2)])
    batches = []
    result = extract_track([stereo[:, i:i + 30000] for i in range(0, stereo.shape[1], 30000)],
                           sr, C, SpectralExtractor(C), batches.append)
    n = sum(len(b) for b in batches)
    assert n == result.stats.shape[0] == len(result.segment_index) == 4  # 3 full + 1 s tail
    assert result.duration_s == pytest.approx(10.0, abs=1 / 22050)
    assert batches[0].logmel.shape[1:] == (C.n_mels, F)
    assert np.isfinite(result.stats).all()
    assert list(result.valid_frames[:3]) == [F, F, F] and result.valid_frames[3] < F


@pytest.mark.parametrize("seconds", [0.3, 2.0, 4.1])
def test_padding_frames_equal_full_computation(seconds):
    """Frames over pure zero padding are filled from one silent frame: same values."""
    y = music_like(seconds, 22050, seed=8)
    ex = SpectralExtractor(C)
    stream = SegmentStream(C, ex)
    segs = stream.push(y) + stream.finish()
    last = segs[-1].span.start_frame + F
    pad = C.n_fft // 2
    buf = np.pad(y, (pad, (last - 1) * C.hop_length + C.n_fft - pad - y.size))
    zbuf = np.pad(y, (pad, buf.size - pad - y.size), mode="edge")
    full = ex.frames(buf, last, zcr_buf=zbuf)
    for seg in segs:
        lo = seg.span.start_frame
        np.testing.assert_allclose(seg.frames.logmel, full.logmel[lo:lo + F], atol=1e-4)
        np.testing.assert_allclose(seg.frames.scalars, full.scalars[lo:lo + F], atol=1e-4)
        np.testing.assert_allclose(seg.frames.contrast_valley, full.contrast_valley[lo:lo + F],
                                   atol=1e-6)
