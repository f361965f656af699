"""Frame-level features from one STFT: log-mel, MFCC, chroma and spectral statistics.

:class:`SpectralExtractor` builds the window and filter banks once, then turns a buffer of
(already padded) mono samples into every frame-level feature through a single STFT. The
arithmetic follows librosa 0.11 with the same parameters (the tests compare against it):

===================  ==========================================================================
feature              librosa reference
===================  ==========================================================================
``logmel``           ``power_to_db(melspectrogram(S=|X|**2), ref=1, amin=amin, top_db=None)``
``mfcc``             ``mfcc(S=logmel, n_mfcc=n_mfcc)`` (DCT-II, ortho)
``chroma``           ``chroma_stft(S=|X|**2, tuning=tuning)`` (inf-norm per frame)
``centroid``         ``spectral_centroid(S=|X|)``
``bandwidth``        ``spectral_bandwidth(S=|X|)`` (p=2, normalised)
``rolloff``          ``spectral_rolloff(S=|X|, roll_percent=rolloff_percent)``
``flatness``         ``spectral_flatness(S=|X|)`` (power 2, amin 1e-10)
``rms``              ``rms(y, frame_length=n_fft, hop_length=hop_length)`` (time domain)
``zcr``              ``zero_crossing_rate(y, frame_length=n_fft, hop_length=hop_length)``
``contrast``         ``spectral_contrast(S=|X|)``: finished per track by :func:`contrast_db`
===================  ==========================================================================

Internally frames are rows (``(frames, freqs)``), which keeps every reduction contiguous.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import scipy.fft

from tasks import kernels
from tasks.columns import SCALAR_FEATURES
from tasks.config import FeatureConfig
from tasks.filterbanks import filter_banks

_TINY32 = float(np.finfo(np.float32).tiny)

MEL_GROUP = 16
"""Mel bands multiplied together: each group only over the bins its filters cover (measured
on 1,024 frames: 0.5 ms against 2.8 ms for the dense product; groups of 8, 32 and 64 were
slower)."""


@dataclass
class FrameFeatures:
    """Frame-level features of ``T`` consecutive frames (frames on the first axis).

    Attributes
    ----------
    logmel : np.ndarray [shape=(T, n_mels), dtype=float32]
    mfcc : np.ndarray [shape=(T, n_mfcc), dtype=float32]
    chroma : np.ndarray [shape=(T, n_chroma), dtype=float32]
    scalars : np.ndarray [shape=(T, len(SCALAR_FEATURES)), dtype=float32]
    contrast_peak : np.ndarray [shape=(T, contrast_bands + 1), dtype=float32]
        Mean of the top quantile of each band's magnitudes (linear); see :func:`contrast_db`.
    contrast_valley : np.ndarray [shape=(T, contrast_bands + 1), dtype=float32]
        Mean of the bottom quantile of each band's magnitudes (linear).
    """

    logmel: np.ndarray
    mfcc: np.ndarray
    chroma: np.ndarray
    scalars: np.ndarray
    contrast_peak: np.ndarray
    contrast_valley: np.ndarray

    def __len__(self) -> int:
        return int(self.logmel.shape[0])

    def slice(self, start: int, stop: int) -> FrameFeatures:
        """Return frames ``[start, stop)`` as views."""
        return FrameFeatures(
            *(getattr(self, f)[start:stop] for f in _FRAME_FIELDS),
        )

    @staticmethod
    def concat(parts: list[FrameFeatures]) -> FrameFeatures:
        """Concatenate consecutive frame blocks."""
        if len(parts) == 1:
            return parts[0]
        return FrameFeatures(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in _FRAME_FIELDS),
        )


_FRAME_FIELDS = ("logmel", "mfcc", "chroma", "scalars", "contrast_peak", "contrast_valley")


class SpectralExtractor:
    """Compute every frame-level feature of a padded sample buffer with one STFT.

    Parameters
    ----------
    config : FeatureConfig
        Feature parameters; filter banks are built once here.
    """

    def __init__(self, config: FeatureConfig) -> None:
        self.config = c = config
        banks = filter_banks(c)  # built by librosa once per machine, then cached
        self.window = banks.window
        self.freqs = np.fft.rfftfreq(c.n_fft, 1.0 / c.sample_rate).astype(np.float32)
        self.mel_basis_t = np.ascontiguousarray(banks.mel.T)
        self.chroma_basis_t = np.ascontiguousarray(banks.chroma.T)
        dct = scipy.fft.dct(np.eye(c.n_mels), type=2, norm="ortho", axis=0)[: c.n_mfcc]
        self.dct_t = np.ascontiguousarray(dct.T.astype(np.float32))
        self.bands = _contrast_bands(self.freqs, c)
        self.mel_groups = _bank_groups(self.mel_basis_t, MEL_GROUP)
        self._silence = self.frames(np.zeros(c.n_fft, dtype=np.float32), 1)

    def silence(self, n_frames: int) -> FrameFeatures:
        """Features of ``n_frames`` frames of digital silence (all-zero windows)."""
        return FrameFeatures(*(np.repeat(getattr(self._silence, f), n_frames, axis=0)
                               for f in _FRAME_FIELDS))

    # ------------------------------------------------------------------------------------
    def frames(self, buf: np.ndarray, n_frames: int, *, zcr_buf: np.ndarray | None = None
               ) -> FrameFeatures:
        """Features of frames ``j = 0 .. n_frames-1`` covering ``buf[j*hop : j*hop + n_fft]``.

        Parameters
        ----------
        buf : np.ndarray [shape=(n,), dtype=float32]
            Samples with any centring padding already applied; ``n`` must be at least
            ``(n_frames - 1) * hop_length + n_fft``.
        n_frames : int > 0
            Number of frames to compute.
        zcr_buf : np.ndarray [shape=(n,)], optional
            The same samples with padding by edge values instead of zeros (librosa's
            zero-crossing rate pads that way); defaults to ``buf``.

        Returns
        -------
        FrameFeatures
        """
        c = self.config
        need = (n_frames - 1) * c.hop_length + c.n_fft
        if n_frames <= 0 or buf.shape[-1] < need:
            raise ValueError(f"need {need} samples for {n_frames} frames, got {buf.shape[-1]}")
        framed = np.lib.stride_tricks.sliding_window_view(buf[:need], c.n_fft)[:: c.hop_length]
        spec = scipy.fft.rfft(framed * self.window, axis=-1, overwrite_x=True)
        mag = np.abs(spec)
        power = mag * mag
        del spec

        mel = np.empty((n_frames, c.n_mels), dtype=np.float32)
        for g0, g1, lo, hi, weights in self.mel_groups:  # banded: 5x fewer products
            mel[:, g0:g1] = power[:, lo:hi] @ weights
        logmel = 10.0 * np.log10(np.maximum(mel, np.float32(c.amin)))
        mfcc = logmel @ self.dct_t

        chroma = power @ self.chroma_basis_t
        cmax = chroma.max(axis=-1, keepdims=True)
        chroma /= np.where(cmax < _TINY32, np.float32(1.0), cmax)

        scalars = np.empty((n_frames, len(SCALAR_FEATURES)), dtype=np.float32)
        # centroid, bandwidth, rolloff: one compiled pass per frame
        kernels.spectral_shape(mag, self.freqs, c.rolloff_percent, scalars)
        floor = np.maximum(power, np.float32(1e-10))
        gmean = np.exp(np.log(floor).mean(axis=-1))
        scalars[:, 3] = gmean / floor.mean(axis=-1)
        del floor
        scalars[:, 4] = _zero_crossing_rate(
            buf if zcr_buf is None else zcr_buf, n_frames, c.n_fft, c.hop_length,
            c.zcr_threshold,
        )
        scalars[:, 5] = _frame_rms(buf, n_frames, c.n_fft, c.hop_length)

        peak, valley = _contrast_peak_valley(mag, self.bands, c.contrast_quantile)
        return FrameFeatures(logmel, mfcc, chroma, scalars, peak, valley)


def contrast_db(
    peak: np.ndarray, valley: np.ndarray, *, peak_max_db: float, valley_max_db: float,
    amin: float = 1e-10, top_db: float = 80.0,
) -> np.ndarray:
    """Finish spectral contrast as librosa does: ``power_to_db(peak) - power_to_db(valley)``.

    librosa clips each dB array at ``top_db`` below *its own maximum over the whole call*;
    the streaming pipeline therefore keeps peaks and valleys until the track ends and passes
    the track-wide maxima here.

    Parameters
    ----------
    peak, valley : np.ndarray [shape=(T, bands)]
        Linear band peaks and valleys from :class:`SpectralExtractor`.
    peak_max_db, valley_max_db : float
        Maximum of ``10*log10(max(amin, x))`` over the whole track, for each array.
    amin, top_db : float
        As in ``librosa.power_to_db``.

    Returns
    -------
    np.ndarray [shape=(T, bands), dtype=float32]
    """
    p = np.maximum(10.0 * np.log10(np.maximum(peak, amin)), peak_max_db - top_db)
    v = np.maximum(10.0 * np.log10(np.maximum(valley, amin)), valley_max_db - top_db)
    return (p - v).astype(np.float32)


def max_db(x: np.ndarray, amin: float = 1e-10) -> float:
    """Return ``max(10*log10(max(amin, x)))`` (``-inf`` for an empty array)."""
    if x.size == 0:
        return -np.inf
    return float(10.0 * np.log10(max(float(x.max()), amin)))


# ----------------------------------------------------------------------------------------
def _zero_crossing_rate(
    y: np.ndarray, n_frames: int, frame_length: int, hop: int, threshold: float
) -> np.ndarray:
    """Fraction of sign changes between neighbours within each frame (librosa's rule)."""
    need = (n_frames - 1) * hop + frame_length
    negative = y[:need] < -threshold  # |x| <= threshold counts as zero, zero as positive
    changes = np.empty(need, dtype=np.int32)
    changes[0] = 0
    np.not_equal(negative[1:], negative[:-1], out=changes[1:])
    cumulative = np.cumsum(changes)
    starts = np.arange(n_frames) * hop
    # pairs (i-1, i) for i in start+1 .. start+frame_length-1
    counts = cumulative[starts + frame_length - 1] - cumulative[starts]
    return (counts / frame_length).astype(np.float32)


def _frame_rms(y: np.ndarray, n_frames: int, frame_length: int, hop: int) -> np.ndarray:
    """Root mean square of each frame of ``y`` (librosa's time-domain rms)."""
    need = (n_frames - 1) * hop + frame_length
    if frame_length % hop == 0:  # a frame is whole hops: sum each hop once, then add up
        per = frame_length // hop
        blocks = np.square(y[:need].reshape(-1, hop), dtype=np.float64).sum(axis=1)
        window = np.lib.stride_tricks.sliding_window_view(blocks, per)
        energy = window.sum(axis=1)[:n_frames]
    else:
        cumulative = np.zeros(need + 1)
        np.cumsum(np.square(y[:need], dtype=np.float64), out=cumulative[1:])
        starts = np.arange(n_frames) * hop
        energy = np.maximum(cumulative[starts + frame_length] - cumulative[starts], 0.0)
    return np.sqrt(energy / frame_length).astype(np.float32)


def _bank_groups(bank_t: np.ndarray, size: int
                 ) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Split a ``(F, bands)`` filter bank into groups of ``size`` bands, each with the bin
    range ``[lo, hi)`` where any of its filters is non-zero and that block of weights.
    """
    groups = []
    for g0 in range(0, bank_t.shape[1], size):
        g1 = min(bank_t.shape[1], g0 + size)
        nz = np.flatnonzero(np.any(bank_t[:, g0:g1] != 0, axis=1))
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 1)
        groups.append((g0, g1, lo, hi, np.ascontiguousarray(bank_t[lo:hi, g0:g1])))
    return groups


def _contrast_bands(freqs: np.ndarray, c: FeatureConfig) -> list[tuple[int, int, int]]:
    """Bin ranges ``[lo, hi)`` and quantile counts of librosa's octave bands."""
    n_bands = c.contrast_bands
    octa = np.zeros(n_bands + 2)
    octa[1:] = c.contrast_fmin * (2.0 ** np.arange(0, n_bands + 1))
    bands = []
    for k, (f_low, f_high) in enumerate(itertools.pairwise(octa)):
        current = np.logical_and(freqs >= f_low, freqs <= f_high)
        idx = np.flatnonzero(current)
        if k > 0:
            current[idx[0] - 1] = True
        if k == n_bands:
            current[idx[-1] + 1:] = True
        chosen = np.flatnonzero(current)
        lo, hi = int(chosen[0]), int(chosen[-1]) + 1
        count = max(int(np.rint(c.contrast_quantile * np.sum(current))), 1)
        if k < n_bands:
            hi -= 1
        bands.append((lo, hi, count))
    return bands


def _contrast_peak_valley(
    mag: np.ndarray, bands: list[tuple[int, int, int]], quantile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per band, mean of the ``count`` smallest and largest magnitudes of each frame."""
    del quantile  # counts were fixed per band in _contrast_bands
    n = mag.shape[0]
    peak = np.empty((n, len(bands)), dtype=np.float32)
    valley = np.empty((n, len(bands)), dtype=np.float32)
    for b, (lo, hi, count) in enumerate(bands):
        sub = mag[:, lo:hi]
        if count == 1:
            valley[:, b] = sub.min(axis=-1)
            peak[:, b] = sub.max(axis=-1)
            continue
        # a full SIMD sort along the contiguous axis beats np.partition by 4-5x here (and a
        # compiled running selection of the extremes by 1.7x)
        ordered = np.sort(sub, axis=-1)
        valley[:, b] = ordered[:, :count].mean(axis=-1)
        peak[:, b] = ordered[:, -count:].mean(axis=-1)
    return peak, valley
