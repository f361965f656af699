"""Features against librosa 0.11 with the same parameters, and analytic answers.

Tolerances: log-mel within 0.05 dB and MFCC within 0.6 (both float32 FFTs; the differences sit
in bins 70 dB or more below the peak, where float32 rounding of the power shows, and MFCC sums
128 such bands);
chroma, flatness, rms, zcr within 1e-5 absolute; centroid, bandwidth within 0.01 Hz-relative
(1e-5 relative); rolloff exact (same bins); contrast within 0.5 dB (a low band's valley is one bin).
Every signal has a noise floor (about -60 dB): in a noise-free synthetic signal, bandwidth and
contrast valleys are set by the float32 FFT's own rounding noise, where two FFT implementations
legitimately differ by several dB.
"""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from factories import music_like, tone

from tasks.config import FeatureConfig
from tasks.features import SCALAR_FEATURES, SpectralExtractor, contrast_db, max_db

SR = 22050


def ours(y: np.ndarray, config: FeatureConfig):
    """Whole-signal frame features with librosa's centring (zero padding)."""
    ex = SpectralExtractor(config)
    pad = config.n_fft // 2
    n_frames = 1 + y.size // config.hop_length
    buf = np.pad(y, (pad, pad + config.n_fft))
    zbuf = np.pad(y, (pad, pad + config.n_fft), mode="edge")
    return ex.frames(buf, n_frames, zcr_buf=zbuf)


def reference(y: np.ndarray, c: FeatureConfig) -> dict[str, np.ndarray]:
    S = np.abs(librosa.stft(y, n_fft=c.n_fft, hop_length=c.hop_length, window=c.window))
    mel_db = librosa.power_to_db(
        librosa.feature.melspectrogram(S=S**2, sr=c.sample_rate, n_mels=c.n_mels),
        ref=1.0, amin=c.amin, top_db=None)
    return {
        "logmel": mel_db,
        "mfcc": librosa.feature.mfcc(S=mel_db, n_mfcc=c.n_mfcc),
        "chroma": librosa.feature.chroma_stft(S=S**2, sr=c.sample_rate, tuning=c.tuning),
        "centroid": librosa.feature.spectral_centroid(S=S, sr=c.sample_rate)[0],
        "bandwidth": librosa.feature.spectral_bandwidth(S=S, sr=c.sample_rate)[0],
        "rolloff": librosa.feature.spectral_rolloff(S=S, sr=c.sample_rate,
                                                    roll_percent=c.rolloff_percent)[0],
        "flatness": librosa.feature.spectral_flatness(S=S)[0],
        "zcr": librosa.feature.zero_crossing_rate(y, frame_length=c.n_fft,
                                                  hop_length=c.hop_length)[0],
        "rms": librosa.feature.rms(y=y, frame_length=c.n_fft, hop_length=c.hop_length)[0],
        "contrast": librosa.feature.spectral_contrast(S=S, sr=c.sample_rate),
    }


def rendered(instrument: str, style: str) -> np.ndarray:
    """A General MIDI rendering (real instrument samples from the soundfont), mono."""
    from tasks.synth import render_track

    stereo = render_track(instrument, style, seconds=5.0, sample_rate=SR, seed=3)
    return (stereo.mean(axis=0) + tone(0, 5.0, SR, amp=0, noise=1e-4)).astype(np.float32)


SIGNALS = {
    "soundfont piano ballad": lambda: rendered("piano", "ballad"),
    "soundfont trumpet dance": lambda: rendered("trumpet", "dance"),
    "tone+noise": lambda: tone(440, 5.0, SR, noise=0.05),
    "music-like": lambda: music_like(6.0, SR, seed=4),
    "chirp": lambda: (librosa.chirp(fmin=100, fmax=8000, sr=SR, duration=4.0)
                      + tone(0, 4.0, SR, amp=0, noise=1e-3)).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_every_feature_matches_librosa(name):
    c = FeatureConfig()
    y = SIGNALS[name]()
    got, ref = ours(y, c), reference(y, c)
    n = ref["logmel"].shape[1]
    assert len(got) == n
    np.testing.assert_allclose(got.logmel.T, ref["logmel"], atol=0.05)
    np.testing.assert_allclose(got.mfcc.T, ref["mfcc"], atol=0.6)
    np.testing.assert_allclose(got.chroma.T, ref["chroma"], atol=1e-5)
    for i, feat in enumerate(SCALAR_FEATURES):
        if feat in ("centroid", "bandwidth"):
            np.testing.assert_allclose(got.scalars[:, i], ref[feat], rtol=1e-5, atol=1e-3,
                                       err_msg=feat)
        elif feat == "rolloff":
            np.testing.assert_array_equal(got.scalars[:, i], ref[feat].astype(np.float32))
        else:
            np.testing.assert_allclose(got.scalars[:, i], ref[feat], atol=1e-5, err_msg=feat)
    con = contrast_db(got.contrast_peak, got.contrast_valley,
                      peak_max_db=max_db(got.contrast_peak),
                      valley_max_db=max_db(got.contrast_valley))
    np.testing.assert_allclose(con.T, ref["contrast"], atol=0.5)


def test_silence_matches_librosa_floor():
    c = FeatureConfig()
    y = np.zeros(SR * 2, dtype=np.float32)
    got, ref = ours(y, c), reference(y, c)
    assert np.all(got.logmel == pytest.approx(-100.0))
    np.testing.assert_allclose(got.scalars[:, 0], ref["centroid"], atol=1e-6)
    np.testing.assert_allclose(got.scalars[:, 2], ref["rolloff"], atol=1e-6)


@pytest.mark.parametrize("freq", [220.0, 1000.0, 3000.0])
def test_sine_centroid_is_its_frequency(freq):
    got = ours(tone(freq, 2.0, SR), FeatureConfig())
    middle = got.scalars[5:-5, 0]
    assert np.median(middle) == pytest.approx(freq, rel=0.02)


def test_a440_chroma_peaks_at_a():
    got = ours(tone(440.0, 2.0, SR), FeatureConfig())
    # librosa chroma bins start at C: A is bin 9
    assert np.bincount(got.chroma[5:-5].argmax(axis=1)).argmax() == 9


def test_rms_of_sine_is_amplitude_over_sqrt2():
    got = ours(tone(1000.0, 2.0, SR, amp=0.5), FeatureConfig())
    assert np.median(got.scalars[5:-5, 5]) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_white_noise_is_flatter_than_a_tone(rng):
    noise = ours((0.1 * rng.standard_normal(SR * 2)).astype(np.float32), FeatureConfig())
    sine = ours(tone(440.0, 2.0, SR), FeatureConfig())
    assert np.median(noise.scalars[:, 3]) > 100 * np.median(sine.scalars[:, 3])


def test_frames_rejects_short_buffer():
    ex = SpectralExtractor(FeatureConfig())
    with pytest.raises(ValueError, match="need"):
        ex.frames(np.zeros(100, dtype=np.float32), 2)


def test_other_parameters_follow_config():
    c = FeatureConfig(n_mels=64, n_mfcc=13, n_fft=1024, hop_length=256, contrast_bands=5)
    y = music_like(3.0, SR, seed=9)
    got, ref = ours(y, c), reference(y, c)
    assert got.logmel.shape[1] == 64 and got.mfcc.shape[1] == 13
    assert got.contrast_peak.shape[1] == 6
    np.testing.assert_allclose(got.logmel.T, ref["logmel"], atol=0.05)
