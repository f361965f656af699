"""The STFT window and the mel and chroma filter banks of a :class:`~tasks.config.FeatureConfig`,
built by librosa once per machine and then read from a small cache file.

Building them costs about 2 CPU-seconds in every process that extracts features: importing
``librosa.filters`` pulls in ``scipy.signal`` and ``scipy.stats`` (1.4 s) and the first
``librosa.filters.chroma`` call 0.7 s more. An ingest pays that in the command's process (its
head start) and in every worker, on every run. The arrays themselves are a few hundred KB, so
they are written once to ``<cache>/filterbanks/<key>.npz`` and loaded in milliseconds after
that; the key hashes every parameter the banks depend on and librosa's version, so a changed
config or library builds new ones. The cache folder is ``MTAG_CACHE_DIR``, else
``$XDG_CACHE_HOME/mtag``, else ``~/.cache/mtag``. A cache that cannot be read or written is
skipped (the banks are built in memory, as before), never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import FeatureConfig

log = logging.getLogger("mtag")

CACHE_ENV = "MTAG_CACHE_DIR"


@dataclass(frozen=True)
class FilterBanks:
    """What :class:`~tasks.features.SpectralExtractor` needs from librosa (all float32).

    Attributes
    ----------
    window : np.ndarray [shape=(n_fft,)]
        ``librosa.filters.get_window(window, n_fft, fftbins=True)``.
    mel : np.ndarray [shape=(n_mels, 1 + n_fft // 2)]
        ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)``.
    chroma : np.ndarray [shape=(n_chroma, 1 + n_fft // 2)]
        ``librosa.filters.chroma(sr, n_fft, n_chroma, tuning)``.
    """

    window: np.ndarray
    mel: np.ndarray
    chroma: np.ndarray


def cache_dir() -> Path:
    """The project's cache folder on this machine (see the module's docstring)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtag"


def bank_key(config: FeatureConfig) -> str:
    """Name of the cache entry of ``config``'s banks: its parameters and librosa's version."""
    from librosa.version import version as librosa_version  # no submodule import

    params = {"librosa": librosa_version, "window": config.window,
              "sample_rate": config.sample_rate, "n_fft": config.n_fft,
              "n_mels": config.n_mels, "fmin": config.fmin, "fmax": config.fmax,
              "n_chroma": config.n_chroma, "tuning": config.tuning}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]


def build_banks(config: FeatureConfig) -> FilterBanks:
    """Build the banks with librosa (the reference, and what the cache holds)."""
    import librosa.filters

    c = config
    return FilterBanks(
        window=librosa.filters.get_window(c.window, c.n_fft, fftbins=True).astype(np.float32),
        mel=librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.fmin,
                                fmax=c.fmax, dtype=np.float32),
        chroma=librosa.filters.chroma(sr=c.sample_rate, n_fft=c.n_fft, n_chroma=c.n_chroma,
                                      tuning=c.tuning, dtype=np.float32),
    )


def _valid(banks: FilterBanks, config: FeatureConfig) -> bool:
    bins = 1 + config.n_fft // 2
    return (banks.window.shape == (config.n_fft,)
            and banks.mel.shape == (config.n_mels, bins)
            and banks.chroma.shape == (config.n_chroma, bins)
            and all(a.dtype == np.float32 and np.isfinite(a).all()
                    for a in (banks.window, banks.mel, banks.chroma)))


def filter_banks(config: FeatureConfig) -> FilterBanks:
    """``config``'s banks: from the cache if it holds them, else built and cached."""
    path = cache_dir() / "filterbanks" / f"{bank_key(config)}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            cached = FilterBanks(npz["window"], npz["mel"], npz["chroma"])
        if _valid(cached, config):
            return cached
        log.debug("filter bank cache %s does not fit its config: rebuilt", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError) as exc:  # unreadable or torn: rebuild, rewrite
        log.debug("filter bank cache %s unreadable (%s): rebuilt", path, exc)
    banks = build_banks(config)
    _store(path, banks)
    return banks


def _store(path: Path, banks: FilterBanks) -> None:
    """Write ``banks`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".banks-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, window=banks.window, mel=banks.mel, chroma=banks.chroma)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:  # a read-only home, a full disk: the banks still work
        log.debug("filter bank cache not written to %s: %s", path, exc)
