"""The cached window and filter banks are librosa's, and a bad cache never breaks extraction."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tasks.config import FeatureConfig
from tasks.features import SpectralExtractor
from tasks.filterbanks import bank_key, build_banks, filter_banks


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTAG_CACHE_DIR", str(tmp_path))
    return tmp_path / "filterbanks"


def _entries(cache):
    return sorted(p.name for p in cache.glob("*.npz")) if cache.exists() else []


@pytest.mark.parametrize("config", [
    FeatureConfig(),
    FeatureConfig(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=64, fmin=30.0,
                  fmax=7000.0, n_chroma=24, tuning=0.25, window="hamming"),
])
def test_cached_banks_equal_librosa(cache, config):
    import librosa

    first = filter_banks(config)  # built and written
    assert _entries(cache) == [f"{bank_key(config)}.npz"]
    second = filter_banks(config)  # read back
    c = config
    ref_mel = librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.fmin,
                                  fmax=c.fmax, dtype=np.float32)
    ref_chroma = librosa.filters.chroma(sr=c.sample_rate, n_fft=c.n_fft, n_chroma=c.n_chroma,
                                        tuning=c.tuning, dtype=np.float32)
    ref_window = librosa.filters.get_window(c.window, c.n_fft, fftbins=True).astype(np.float32)
    for banks in (first, second):
        np.testing.assert_array_equal(banks.mel, ref_mel)
        np.testing.assert_array_equal(banks.chroma, ref_chroma)
        np.testing.assert_array_equal(banks.window, ref_window)
    ext = SpectralExtractor(config)
    np.testing.assert_array_equal(
        ext.freqs, librosa.fft_frequencies(sr=c.sample_rate, n_fft=c.n_fft).astype(np.float32))


def test_key_follows_every_bank_parameter():
    base = FeatureConfig()
    keys = {bank_key(base)}
    for change in ({"n_mels": 64}, {"fmin": 20.0}, {"fmax": 8000.0}, {"n_chroma": 24},
                   {"tuning": 0.1}, {"window": "hamming"}, {"sample_rate": 16000},
                   {"n_fft": 1024, "hop_length": 256}):
        keys.add(bank_key(FeatureConfig(**change)))
    assert len(keys) == 9
    assert bank_key(FeatureConfig(n_mfcc=13)) == bank_key(base)  # not a bank parameter


def test_torn_or_foreign_cache_file_is_rebuilt(cache):
    config = FeatureConfig()
    filter_banks(config)
    path = cache / f"{bank_key(config)}.npz"
    path.write_bytes(b"not an npz file")
    banks = filter_banks(config)
    np.testing.assert_array_equal(banks.mel, build_banks(config).mel)
    with np.load(path) as npz:  # rewritten whole
        np.testing.assert_array_equal(npz["mel"], banks.mel)
    # an entry of the wrong shape (another config's banks under this name) is not used
    other = build_banks(FeatureConfig(n_mels=64))
    np.savez(path, window=other.window, mel=other.mel, chroma=other.chroma)
    assert filter_banks(config).mel.shape == (config.n_mels, 1 + config.n_fft // 2)


def test_unwritable_cache_still_gives_banks(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("MTAG_CACHE_DIR", str(blocker))
    banks = filter_banks(FeatureConfig())
    np.testing.assert_array_equal(banks.mel, build_banks(FeatureConfig()).mel)
    assert blocker.read_text().startswith("a file")


def test_cached_process_does_not_import_scipy_signal(cache):
    """What the cache is for: a worker with cached banks skips librosa.filters (~2 CPU-s)."""
    filter_banks(FeatureConfig())
    code = ("import sys; from tasks.config import FeatureConfig; "
            "from tasks.features import SpectralExtractor; SpectralExtractor(FeatureConfig()); "
            "print(sorted(m for m in ('scipy.signal', 'librosa.filters') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MTAG_CACHE_DIR": str(cache.parent)}, check=True)
    assert out.stdout.strip() == "[]"
