from __future__ import annotations

import numpy as np
import pytest
import soxr
from factories import tone

from tasks.audio import LevelMeter, StreamResampler, to_mono, valid_audio
from tasks.errors import DecodeError, ParameterError
from tasks.units import seconds_to_frames, seconds_to_samples


def test_to_mono_averages_channels():
    y = np.stack([np.ones(10), -np.ones(10), 3 * np.ones(10)]).astype(np.float32)
    np.testing.assert_allclose(to_mono(y), np.ones(10))
    assert to_mono(y).dtype == np.float32


def test_same_rate_resample_is_a_no_op():
    y = tone(440, 1.0)
    r = StreamResampler(22050, 22050)
    np.testing.assert_array_equal(np.concatenate([r.push(y), r.finish()]), y)


@pytest.mark.parametrize("rate", [8000, 44100, 48000, 96000])
def test_stream_resample_matches_one_shot_and_length(rate):
    y = tone(330, 3.0, rate, noise=0.01)
    r = StreamResampler(rate, 22050)
    out = np.concatenate([r.push(y[i:i + 7777]) for i in range(0, y.size, 7777)] + [r.finish()])
    expected_len = y.size * 22050 / rate
    assert abs(out.size - expected_len) <= 1
    ref = soxr.resample(y, rate, 22050, "HQ")
    np.testing.assert_allclose(out[: ref.size], ref, atol=1e-5)


def test_level_meter_sine():
    m = LevelMeter()
    m.push(tone(1000, 1.0, amp=0.5))
    assert m.peak_dbfs == pytest.approx(20 * np.log10(0.5), abs=0.01)
    assert m.rms_dbfs == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.01)
    assert LevelMeter().peak_dbfs == -np.inf


def test_valid_audio_rejects_bad_input():
    with pytest.raises(DecodeError, match="non-finite"):
        valid_audio(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ParameterError, match="floating"):
        valid_audio(np.zeros(4, dtype=np.int16))
    with pytest.raises(ParameterError, match="ndarray"):
        valid_audio([0.0, 1.0])  # type: ignore[arg-type]


def test_one_rounding_rule():
    assert seconds_to_samples(3.0, 22050) == 66150
    assert seconds_to_samples(0.5 / 22050, 22050) == 1
    assert seconds_to_frames(3.0, 22050, 512) == 129
