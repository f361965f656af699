"""Track-level descriptors from streams: loudness, true peak, tempo, key.

Every accumulator here is pure (no I/O) and fed block by block, in order, so that a file of any
length is measured in memory that does not grow with its duration:

=====================  ========================================================================
accumulator            what it consumes (and where the pipeline has it)
=====================  ========================================================================
:class:`LoudnessMeter`  native-rate decoded blocks ``(channels, n)`` float32, *before* the mono
                        mix (``tasks.track.extract_track``'s ``block``, as ``LevelMeter`` gets)
:class:`TempoEstimator` log-mel frames ``(T, n_mels)`` in dB (``FrameFeatures.logmel`` of each
                        :class:`~tasks.segment.Segment`, valid frames only), or an onset envelope
:class:`KeyEstimator`   chroma frames ``(T, 12)`` (``FrameFeatures.chroma``), optionally weighted
                        by frame RMS (``FrameFeatures.scalars[:, SCALAR_FEATURES.index("rms")]``)
=====================  ========================================================================

:class:`TrackDescriptors` bundles the three with the frame bookkeeping (overlapping segments,
padded tail frames) so that the ingest path needs two calls: ``push_block`` for each decoded
block and ``push_segments`` for each list of segments a :class:`~tasks.segment.SegmentStream`
returns. :data:`DESCRIPTOR_COLUMNS` documents the output columns.

Why no ``librosa.beat``: ``librosa.beat.beat_track`` dies with SIGSEGV in this environment
(numba 0.68.1, llvmlite 0.50, numpy 2.4.6; see ``shared/STACK-NOTES.md``), so tempo comes from
our own autocorrelation of a spectral-flux envelope (the method of ``librosa.feature.tempo``,
accumulated over the stream) and the beat count is derived from tempo and detected onsets, not
from a tracked beat sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import scipy.fft

from tasks.columns import DESCRIPTOR_COLUMNS
from tasks.errors import ParameterError

if TYPE_CHECKING:
    from tasks.config import FeatureConfig

__all__ = [
    "DESCRIPTOR_COLUMNS",
    "KEY_NAMES",
    "KeyEstimator",
    "KeyResult",
    "LoudnessMeter",
    "LoudnessResult",
    "TempoEstimator",
    "TempoResult",
    "TrackDescriptors",
    "channel_weights",
    "k_weighting_sos",
    "true_peak_full",
]

KEY_NAMES: tuple[str, ...] = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
"""Pitch-class names, index 0 = C (the order of ``librosa.filters.chroma``)."""


# =========================================================================================
# Loudness: BS.1770-4 / EBU R 128
# =========================================================================================

_ABS_GATE_LUFS = -70.0
_REL_GATE_LU = -10.0
_LRA_REL_GATE_LU = -20.0
_HIST_LO = -70.0
_HIST_BIN = 0.01
_HIST_BINS = 11000  # -70 .. +40 LUFS in 0.01 LU bins; louder values fall into the last bin

# BS.1770-4 Annex 2: the 48-tap, 4-phase interpolation filter for 4x true-peak oversampling
# (phase p, tap k multiplies x[n - k]).
_TP_TAPS = np.array([
    [0.0017089843750, 0.0109863281250, -0.0196533203125, 0.0332031250000,
     -0.0594482421875, 0.1373291015625, 0.9721679687500, -0.1022949218750,
     0.0476074218750, -0.0266113281250, 0.0148925781250, -0.0083007812500],
    [-0.0291748046875, 0.0292968750000, -0.0517578125000, 0.0891113281250,
     -0.1665039062500, 0.4650878906250, 0.7797851562500, -0.2003173828125,
     0.1015625000000, -0.0582275390625, 0.0330810546875, -0.0189208984375],
    [-0.0189208984375, 0.0330810546875, -0.0582275390625, 0.1015625000000,
     -0.2003173828125, 0.7797851562500, 0.4650878906250, -0.1665039062500,
     0.0891113281250, -0.0517578125000, 0.0292968750000, -0.0291748046875],
    [-0.0083007812500, 0.0148925781250, -0.0266113281250, 0.0476074218750,
     -0.1022949218750, 0.9721679687500, 0.1373291015625, -0.0594482421875,
     0.0332031250000, -0.0196533203125, 0.0109863281250, 0.0017089843750],
])
_TP_HIST = _TP_TAPS.shape[1] - 1  # past samples an interpolated value needs
_TP_RTAPS = np.ascontiguousarray(_TP_TAPS[:, ::-1].T)  # (12, 4): taps reversed, phases last
_TP_CHUNK = 32  # samples per chunk maximum that lets the true peak skip quiet stretches


def k_weighting_sos(sample_rate: float) -> np.ndarray:
    """K-weighting of ITU-R BS.1770-4 at any sampling rate, as two biquad sections.

    The pre-filter (high shelf) and RLB high-pass are designed from their analogue parameters
    by the bilinear transform (the derivation of libebur128 and Brecht De Man), which
    reproduces the coefficients of BS.1770-4 Table 1 and 2 at 48 kHz.

    Parameters
    ----------
    sample_rate : float > 0

    Returns
    -------
    np.ndarray [shape=(2, 6), dtype=float64]
        ``scipy.signal.sosfilt`` layout: ``[b0, b1, b2, 1, a1, a2]`` per section.
    """
    fs = float(sample_rate)
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / fs)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh ** 0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf = [(vh + vb * k / q + k * k) / a0, 2.0 * (k * k - vh) / a0,
             (vh - vb * k / q + k * k) / a0, 1.0, 2.0 * (k * k - 1.0) / a0,
             (1.0 - k / q + k * k) / a0]
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / fs)
    a0 = 1.0 + k / q + k * k
    highpass = [1.0, -2.0, 1.0, 1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]
    return np.array([shelf, highpass])


def channel_weights(channels: int) -> np.ndarray:
    """BS.1770-4 channel weights ``G_i`` for a channel count (a simplification, see below).

    * 1-4 channels: 1.0 each (mono, stereo, L/R/C; quadraphonic rear channels are weighted
      1.0, not 1.41: their layout is not known from the count alone);
    * 5 channels: L, R, C, Ls, Rs -> 1, 1, 1, 1.41, 1.41 (as Tech 3341 case 6);
    * 6 or more: the WAVE/SMPTE order L, R, C, LFE, Ls, Rs, ... -> 1, 1, 1, 0 (LFE excluded),
      then 1.41 for every further channel.

    Files whose channel order differs (Vorbis puts 5.1 as L, C, R, Ls, Rs, LFE) are measured
    with these weights all the same; pass ``weights`` to :class:`LoudnessMeter` to override.
    """
    if channels < 1:
        raise ParameterError(f"channels must be >= 1, got {channels}")
    if channels <= 4:
        return np.ones(channels)
    if channels == 5:
        return np.array([1.0, 1.0, 1.0, 1.41, 1.41])
    return np.array([1.0, 1.0, 1.0, 0.0] + [1.41] * (channels - 4))


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _k_weighted_energy(x, b, a, state, acc, pos, sub_len, sub_out, chunk, cmax
                       ):  # pragma: no cover - compiled
    """K-weight every channel of a block, sum squares per 100 ms sub-block, chunk maxima.

    x (C, n) float32; b, a (5,) float64: the K-weighting as one 4th-order direct-form filter
    (libebur128's form); state (C, 8) float64: last 4 inputs and outputs per channel; acc (C,)
    float64: sum of squares of the unfinished sub-block, which holds ``pos`` samples;
    sub_out (C, m) float64 receives the sums of the sub-blocks completed here; cmax (C, k)
    float64 receives ``max |x|`` of each run of ``chunk`` samples (for the true peak). Returns
    the number of completed sub-blocks. One sequential pass, no temporaries.
    """
    n_ch, n = x.shape
    b0, b1, b2, b3, b4 = b[0], b[1], b[2], b[3], b[4]
    a1, a2, a3, a4 = a[1], a[2], a[3], a[4]
    n_chunks = (n + chunk - 1) // chunk
    done = 0
    for c in range(n_ch):
        x1, x2, x3, x4 = state[c, 0], state[c, 1], state[c, 2], state[c, 3]
        y1, y2, y3, y4 = state[c, 4], state[c, 5], state[c, 6], state[c, 7]
        s = acc[c]
        left = sub_len - pos
        done = 0
        for k in range(n_chunks):
            m = 0.0
            for i in range(k * chunk, min(n, (k + 1) * chunk)):
                v = np.float64(x[c, i])
                av = abs(v)
                if av > m:
                    m = av
                u = (b0 * v + b1 * x1 + b2 * x2 + b3 * x3 + b4 * x4
                     - a2 * y2 - a3 * y3 - a4 * y4)
                y = u - a1 * y1
                x4 = x3
                x3 = x2
                x2 = x1
                x1 = v
                y4 = y3
                y3 = y2
                y2 = y1
                y1 = y
                s += y * y
                left -= 1
                if left == 0:
                    sub_out[c, done] = s
                    done += 1
                    s = 0.0
                    left = sub_len
            cmax[c, k] = m
        state[c, 0], state[c, 1], state[c, 2], state[c, 3] = x1, x2, x3, x4
        state[c, 4], state[c, 5], state[c, 6], state[c, 7] = y1, y2, y3, y4
        acc[c] = s
    return done


@numba.njit(nogil=True, cache=True, fastmath=True)
def _true_peak_block(x, hist, rtaps, cmax, chunk, peaks, gain):  # pragma: no cover - compiled
    """Update [sample peak, true peak] with a block, interpolating near the running peak.

    x (C, n) float32; hist (C, 11) float32: the samples before the block (updated); rtaps
    (12, 4): the Annex 2 phases, taps reversed (``rtaps[m, q] = taps[q, 11 - m]``); cmax
    (C, k): ``max |x|`` per run of ``chunk`` (>= 11) samples. Output ``j`` of the block
    (4 phases) interpolates between samples ``j - 6`` and ``j - 5`` from samples
    ``j - 11 .. j``; it is computed only if one of those two samples reaches ``gain`` times
    the running peak (the larger of sample and true peak, with this block's sample peak
    counted first). Chunks whose samples are all below that are skipped whole.
    """
    n_ch, n = x.shape
    n_taps = rtaps.shape[0]
    n_hist = n_taps - 1
    n_chunks = (n + chunk - 1) // chunk
    sample_peak = peaks[0]
    true_peak = peaks[1]
    for c in range(n_ch):
        for k in range(n_chunks):
            if cmax[c, k] > sample_peak:
                sample_peak = cmax[c, k]
    win = np.empty(chunk + n_hist, dtype=np.float32)
    for c in range(n_ch):
        hmax = 0.0
        for i in range(n_hist):
            hmax = max(hmax, abs(np.float64(hist[c, i])))
        thr = max(sample_peak, true_peak) * gain
        for k in range(n_chunks):
            # outputs of chunk k read brackets from samples lo - 6 .. hi - 5
            prev = cmax[c, k - 1] if k > 0 else hmax
            wmax = max(cmax[c, k], prev)
            if wmax <= 0.0 or wmax < thr:
                continue
            lo = k * chunk
            hi = min(n, lo + chunk)
            if lo >= n_hist:  # win[i] = sample lo - 11 + i
                for i in range(hi - lo + n_hist):
                    win[i] = x[c, lo - n_hist + i]
            else:
                for i in range(hi - lo + n_hist):
                    g = lo - n_hist + i
                    win[i] = x[c, g] if g >= 0 else hist[c, n_hist + g]
            for j in range(hi - lo):
                left = abs(win[j + n_hist - 6])
                right = abs(win[j + n_hist - 5])
                if max(left, right) < thr:
                    continue
                # the 4 phases at once; rtaps[m] multiplies sample (lo + j) - 11 + m
                p0 = p1 = p2 = p3 = 0.0
                for m in range(n_taps):
                    w = np.float64(win[j + m])
                    p0 += rtaps[m, 0] * w
                    p1 += rtaps[m, 1] * w
                    p2 += rtaps[m, 2] * w
                    p3 += rtaps[m, 3] * w
                t = max(max(abs(p0), abs(p1)), max(abs(p2), abs(p3)))
                if t > true_peak:
                    true_peak = t
                    thr = max(sample_peak, true_peak) * gain
        if n >= n_hist:
            for i in range(n_hist):
                hist[c, i] = x[c, n - n_hist + i]
        else:
            keep = n_hist - n
            for i in range(keep):
                hist[c, i] = hist[c, i + n]
            for i in range(n):
                hist[c, keep + i] = x[c, i]
    peaks[0] = sample_peak
    peaks[1] = true_peak


def true_peak_full(x: np.ndarray) -> float:
    """Reference true peak: every sample oversampled 4x with the BS.1770-4 Annex 2 filter.

    The signal is taken as zero before its start and after its end (the filter's tail is
    flushed). This is what :class:`LoudnessMeter` computes on only the intervals near its
    running peak; the tests compare the two.

    Parameters
    ----------
    x : np.ndarray [shape=(n,) or (channels, n)]

    Returns
    -------
    float
        Linear true peak, ``max(|interpolated|, |samples|)`` over all channels (0.0 for an
        empty or silent signal).
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.size == 0:
        return 0.0
    n_hist = _TP_HIST
    padded = np.pad(x, ((0, 0), (n_hist, n_hist)))
    # windows[c, i, k] = padded[c, i + k]: output n' uses x[n' - 11 .. n']
    windows = np.lib.stride_tricks.sliding_window_view(padded, n_hist + 1, axis=-1)
    out = windows @ _TP_TAPS[:, ::-1].T  # (C, n + 11, 4)
    return float(max(np.abs(out).max(), np.abs(x).max()))


@dataclass(frozen=True)
class LoudnessResult:
    """Loudness descriptors of a stream.

    Attributes
    ----------
    integrated_lufs : float or None
        Gated integrated loudness (BS.1770-4); ``None`` if no 400 ms block passes the gates.
    loudness_range_lu : float or None
        EBU Tech 3342 loudness range; ``None`` if no 3 s short-term block passes the gates.
    true_peak_dbtp : float or None
        True peak in dBTP (4x oversampled, never below the sample peak); ``None`` for silence.
    sample_peak_dbfs : float or None
        Largest absolute sample in dBFS; ``None`` for silence.
    """

    integrated_lufs: float | None
    loudness_range_lu: float | None
    true_peak_dbtp: float | None
    sample_peak_dbfs: float | None


class _LoudnessHistogram:
    """Counts and exact power sums of block loudness values in 0.01 LU bins (bounded memory)."""

    def __init__(self) -> None:
        self.counts = np.zeros(_HIST_BINS, dtype=np.int64)
        self.power = np.zeros(_HIST_BINS, dtype=np.float64)

    def add(self, power: np.ndarray) -> None:
        """Add blocks of mean-square power ``sum_i G_i z_i``; those at or under -70 LUFS go."""
        with np.errstate(divide="ignore"):
            lufs = -0.691 + 10.0 * np.log10(power)
        keep = lufs > _ABS_GATE_LUFS
        if not keep.any():
            return
        idx = np.minimum(((lufs[keep] - _HIST_LO) / _HIST_BIN).astype(np.int64), _HIST_BINS - 1)
        self.counts += np.bincount(idx, minlength=_HIST_BINS)
        self.power += np.bincount(idx, weights=power[keep], minlength=_HIST_BINS)

    @staticmethod
    def centres() -> np.ndarray:
        return _HIST_LO + (np.arange(_HIST_BINS) + 0.5) * _HIST_BIN

    def gated(self, relative_lu: float) -> np.ndarray | None:
        """Mask of the bins above the relative gate, or ``None`` if nothing passes -70."""
        n = int(self.counts.sum())
        if n == 0:
            return None
        gate = -0.691 + 10.0 * math.log10(float(self.power.sum()) / n) + relative_lu
        return (self.centres() > gate) & (self.counts > 0)

    def integrated(self) -> float | None:
        mask = self.gated(_REL_GATE_LU)
        if mask is None or not mask.any():
            return None
        mean = float(self.power[mask].sum()) / int(self.counts[mask].sum())
        return -0.691 + 10.0 * math.log10(mean)

    def loudness_range(self) -> float | None:
        mask = self.gated(_LRA_REL_GATE_LU)
        if mask is None or not mask.any():
            return None
        counts = np.where(mask, self.counts, 0)
        return _hist_percentile(counts, 95.0) - _hist_percentile(counts, 10.0)


def _hist_percentile(counts: np.ndarray, q: float) -> float:
    """``np.percentile`` (linear) of the values whose histogram (0.01 LU bins) is ``counts``."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    pos = q / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    centres = _LoudnessHistogram.centres()
    v_lo = centres[int(np.searchsorted(cum, lo + 1))]
    v_hi = centres[int(np.searchsorted(cum, hi + 1))]
    return float(v_lo + (pos - lo) * (v_hi - v_lo))


class LoudnessMeter:
    """Integrated loudness, loudness range and true peak of a stream of multichannel blocks.

    Push native-rate float blocks shaped ``(channels, n)`` (or ``(n,)`` for mono) in order,
    then call :meth:`finish`. Per block, one compiled pass K-weights each channel (the
    4th-order filter of BS.1770-4 with its state carried across blocks, in float64) and sums
    squares per 100 ms sub-block; 400 ms blocks (75 % overlap) and 3 s short-term blocks
    (every 100 ms) are means of 4 and 30 sub-blocks. Memory is constant: gating works on
    histograms of block loudness in 0.01 LU bins that keep each bin's exact power sum, so the
    integrated loudness is exact except for blocks within 0.01 LU of the relative gate, and
    the LRA percentiles are quantised to 0.01 LU.

    True peak follows BS.1770-4 Annex 2 (its 48-tap polyphase filter, 4x oversampling, at any
    input rate), but interpolates only the inter-sample intervals with a bracketing sample
    within ``true_peak_margin_db`` of the running peak (the larger of sample and true peak so
    far, this block's sample peak included). The running peak never exceeds the final one,
    so the result equals full oversampling (:func:`true_peak_full`) whenever the largest
    inter-sample peak exceeds both its neighbouring samples by less than the margin. The
    default, 6.2 dB, is just over the filter's largest gain (the L1 norm of a phase, 2.023 or
    6.12 dB): no interpolated value exceeds 6.12 dB over the sample peak, so every interval
    next to a sample at the sample peak (clipped material) is always interpolated. A
    full-scale sine at fs/4 and 45 degrees, the classic test of meters, exceeds its samples
    by 3.01 dB; hard-clipped white noise, the worst case of the tests, by 6.1 dB. What can
    escape is an inter-sample peak between two samples more than 6.2 dB under it (energy
    near Nyquist between larger samples). Interpolating only where the rigorous bound (the
    L1 norm times the largest of the 12 samples used) allows a new peak would cost 3-4 times
    as much on loud music (about 30 % of chunks against a few % of samples).

    Parameters
    ----------
    sample_rate : float > 0
        Native sampling rate in Hz.
    channels : int, optional
        Number of channels; ``None`` takes it from the first block.
    weights : sequence of float, optional
        Per-channel weights ``G_i``; default :func:`channel_weights`.
    true_peak_margin_db : float >= 0
        See above (default 6.2 dB; ``math.inf`` oversamples everything).
    """

    def __init__(self, sample_rate: float, channels: int | None = None, *,
                 weights: Sequence[float] | None = None,
                 true_peak_margin_db: float = 6.2) -> None:
        if not sample_rate > 0:
            raise ParameterError(f"sample_rate must be > 0, got {sample_rate}")
        if not true_peak_margin_db >= 0:
            raise ParameterError("true_peak_margin_db must be >= 0")
        self._gain = 10.0 ** (-true_peak_margin_db / 20.0)
        self.sample_rate = float(sample_rate)
        self.sub_len = max(1, int(self.sample_rate / 10.0 + 0.5))  # 100 ms
        b, a = _sos_to_tf(k_weighting_sos(self.sample_rate))
        self._b, self._a = b, a
        self._weights_arg = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.channels: int | None = None
        self.weights = np.ones(0)
        self._peaks = np.zeros(2)
        self._momentary = _LoudnessHistogram()
        self._short_term = _LoudnessHistogram()
        self._recent = np.zeros(0)  # powers of the last (up to 29) 100 ms sub-blocks
        self.n_samples = 0
        self._finished: LoudnessResult | None = None
        if channels is not None:
            self._setup(channels)

    def _setup(self, channels: int) -> None:
        if channels < 1:
            raise ParameterError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        if self._weights_arg is not None:
            if self._weights_arg.shape != (channels,):
                raise ParameterError(f"weights must have {channels} values")
            self.weights = self._weights_arg
        else:
            self.weights = channel_weights(channels)
        self._state = np.zeros((channels, 8))
        self._hist = np.zeros((channels, _TP_HIST), dtype=np.float32)
        self._acc = np.zeros(channels)
        self._pos = 0

    def push(self, block: np.ndarray) -> None:
        """Add the next block, ``(channels, n)`` or ``(n,)``, at the meter's sampling rate."""
        if self._finished is not None:
            raise ParameterError("LoudnessMeter.push after finish")
        x = np.asarray(block)
        if x.ndim == 1:
            x = x[np.newaxis]
        if x.ndim != 2:
            raise ParameterError(f"block must have shape (channels, n), got {x.shape}")
        if self.channels is None:
            self._setup(x.shape[0])
        if x.shape[0] != self.channels:
            raise ParameterError(f"block has {x.shape[0]} channels, meter {self.channels}")
        n = x.shape[1]
        if n == 0:
            return
        x = np.ascontiguousarray(x, dtype=np.float32)
        sub_out = np.empty((x.shape[0], (self._pos + n) // self.sub_len + 1))
        cmax = np.empty((x.shape[0], -(-n // _TP_CHUNK)))
        done = _k_weighted_energy(x, self._b, self._a, self._state, self._acc, self._pos,
                                  self.sub_len, sub_out, _TP_CHUNK, cmax)
        _true_peak_block(x, self._hist, _TP_RTAPS, cmax, _TP_CHUNK, self._peaks, self._gain)
        self._pos = (self._pos + n) % self.sub_len
        self.n_samples += n
        if done:
            self._add_subblocks(self.weights @ (sub_out[:, :done] / self.sub_len))

    def _add_subblocks(self, power: np.ndarray) -> None:
        """Turn new 100 ms sub-block powers into 400 ms and 3 s block loudness values."""
        seq = np.concatenate([self._recent, power])
        cum = np.concatenate([[0.0], np.cumsum(seq)])
        first_new = self._recent.size  # index in seq of the first new sub-block
        for width, hist in ((4, self._momentary), (30, self._short_term)):
            ends = np.arange(max(first_new, width - 1), seq.size)  # last sub-block of a block
            if ends.size:
                hist.add((cum[ends + 1] - cum[ends + 1 - width]) / width)
        self._recent = seq[-29:]

    def finish(self) -> LoudnessResult:
        """Flush the true-peak filter and return the descriptors (idempotent)."""
        if self._finished is not None:
            return self._finished
        if self.channels is not None and self.n_samples:
            zeros = np.zeros((self.channels, _TP_HIST), dtype=np.float32)
            _true_peak_block(zeros, self._hist, _TP_RTAPS, np.zeros((self.channels, 1)),
                             _TP_CHUNK, self._peaks, self._gain)
        sample_peak, true_peak = float(self._peaks[0]), float(self._peaks[1])
        peak = max(sample_peak, true_peak)
        self._finished = LoudnessResult(
            integrated_lufs=self._momentary.integrated(),
            loudness_range_lu=self._short_term.loudness_range(),
            true_peak_dbtp=20.0 * math.log10(peak) if peak > 0 else None,
            sample_peak_dbfs=20.0 * math.log10(sample_peak) if sample_peak > 0 else None,
        )
        return self._finished


def _sos_to_tf(sos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two biquads as one 4th-order ``(b, a)`` (``a[0] == 1``)."""
    b = np.convolve(sos[0, :3], sos[1, :3])
    a = np.convolve(sos[0, 3:], sos[1, 3:])
    return b / a[0], a / a[0]


# =========================================================================================
# Tempo
# =========================================================================================

@dataclass(frozen=True)
class TempoResult:
    """Tempo descriptors of a stream.

    Attributes
    ----------
    tempo_bpm : float or None
        Global tempo; ``None`` for silence or input under ``min_seconds``.
    confidence : float or None
        Prominence of the autocorrelation peak at the tempo, in [0, 1]; ``None`` with the tempo.
    beat_count : int or None
        Estimated number of beats (see :class:`TempoEstimator`); ``None`` with the tempo.
    onset_rate : float or None
        Detected onsets per second; ``None`` if no frame was pushed.
    n_onsets : int
        Detected onsets.
    """

    tempo_bpm: float | None
    confidence: float | None
    beat_count: int | None
    onset_rate: float | None
    n_onsets: int


@numba.njit(nogil=True, cache=True)
def _pick_onsets(env, env_start, lo, hi, end, pre_max, post_max, pre_avg, post_avg, wait,
                 threshold, state, gap_hist):  # pragma: no cover - compiled
    """Decide frames ``[lo, hi)`` of an onset envelope (``env[0]`` is frame ``env_start``).

    A frame is an onset if it is the maximum of ``[f - pre_max, f + post_max]``, exceeds the
    mean of ``[f - pre_avg, f + post_avg]`` by ``threshold``, is positive, and comes at
    least ``wait`` frames after the previous onset. Frames before 0 or from ``end`` on do not
    exist (neither maxima nor in the mean). ``state`` = [last onset (-1: none), count];
    ``gap_hist[g]`` counts gaps of ``g`` frames between consecutive onsets (capped).
    """
    cap = gap_hist.size - 1
    for f in range(lo, hi):
        v = env[f - env_start]
        if v <= 0.0:
            continue
        is_max = True
        for g in range(max(0, f - pre_max), min(end, f + post_max + 1)):
            if env[g - env_start] > v:
                is_max = False
                break
        if not is_max:
            continue
        a, b = max(0, f - pre_avg), min(end, f + post_avg + 1)
        total = 0.0
        for g in range(a, b):
            total += env[g - env_start]
        if v < total / (b - a) + threshold:
            continue
        last = state[0]
        if last >= 0:
            if f - last < wait:
                continue
            gap_hist[min(f - last, cap)] += 1
        state[0] = f
        state[1] += 1


class TempoEstimator:
    """Global tempo, its confidence, a beat count and the onset rate, from a frame stream.

    Feed it the pipeline's log-mel frames (:meth:`push_logmel`, ``(T, n_mels)`` in dB, frames
    first as in ``FrameFeatures.logmel``; no second STFT is needed), or an onset envelope
    you computed (:meth:`push_onset`); use one of the two per stream. From log-mel it computes
    the spectral flux of ``librosa.onset.onset_strength`` (mean over bands of the positive
    first difference, lag 1; dB floored 80 dB under the running maximum, the streaming form of
    librosa's ``top_db=80``).

    Tempo: the method of ``librosa.feature.tempo`` accumulated over the stream. Every ``step``
    frames the last ``win_seconds`` (8.9 s: librosa's 384 frames at 22,050/512) of the
    envelope are Hann-windowed and autocorrelated, normalised by lag 0, and summed. At the end
    the mean autocorrelation is weighted with librosa's log-normal prior (120 BPM, one octave
    standard deviation) over ``min_bpm``-``max_bpm`` to pick a lag; the lag is then refined
    below one frame by maximising the comb mean of the autocorrelation at its multiples (a
    period's multiples all peak where it is exact), and an octave check halves the lag (doubles
    the tempo) when the autocorrelation mass (above the median, in the three lags around each
    multiple, so that a peak split between two lags counts whole) at the half lag's multiples
    is at least ``double_ratio`` of that at the lag's, that is when the in-between pulses are
    as strong, and the double tempo stays under ``max_double_bpm``. Without the check a click
    track at 180 BPM reads 90, as ``librosa.feature.tempo`` does here; without the refinement,
    tempi are quantised to whole lags (117.5 or 123.0 BPM for 120).

    Onsets: peaks of the envelope that are the maximum within +-30 ms, exceed the mean within
    +-100 ms by 0.07 of the running envelope maximum, and follow the previous onset by at least
    30 ms (``librosa.onset.onset_detect``'s rule, with a running instead of a global
    normalisation). ``beat_count`` is ``round(span / period) + 1``, where ``span`` adds the
    gaps between consecutive onsets, each capped at 8 beat periods (so long silences and
    sustained passages add few beats); it estimates the beats of the onset-active part, it is
    not a tracked beat sequence (``librosa.beat.beat_track`` crashes here).

    Frames are processed in batches of ``batch`` (bounded memory: one analysis window, one
    batch and a histogram of onset gaps).

    Parameters
    ----------
    frame_rate : float > 0
        Frames per second (``config.sample_rate / config.hop_length``).
    min_seconds : float
        Shorter input gives no tempo (default 3 s).
    """

    def __init__(self, frame_rate: float, *, win_seconds: float = 8.916, step: int = 32,
                 min_bpm: float = 30.0, max_bpm: float = 300.0, start_bpm: float = 120.0,
                 std_bpm: float = 1.0, double_ratio: float = 0.9,
                 max_double_bpm: float = 200.0, min_seconds: float = 3.0,
                 top_db: float = 80.0, batch: int = 1024) -> None:
        if not frame_rate > 0:
            raise ParameterError(f"frame_rate must be > 0, got {frame_rate}")
        self.frame_rate = fr = float(frame_rate)
        self.win = max(8, int(round(win_seconds * fr)))
        self.step = max(1, int(step))
        self.batch = max(1, int(batch))
        self.min_bpm, self.max_bpm = float(min_bpm), float(max_bpm)
        self.start_bpm, self.std_bpm = float(start_bpm), float(std_bpm)
        self.double_ratio, self.max_double_bpm = float(double_ratio), float(max_double_bpm)
        self.min_frames = int(math.ceil(min_seconds * fr))
        self.top_db = float(top_db)
        self._n_fft = int(scipy.fft.next_fast_len(2 * self.win))
        self._window = np.hanning(self.win + 2)[1:-1]
        self._ac_sum = np.zeros(self.win)
        self._ac_count = 0
        self._env = np.zeros(0)  # envelope from frame _env_start on: context + pending
        self._env_start = 0
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._next_window_end = self.win  # the next window ends (exclusive) at this frame
        self.n_frames = 0
        self._env_max = 0.0
        self._prev_logmel: np.ndarray | None = None
        self._logmel_max = -np.inf
        self._pre_max = max(1, int(round(0.03 * fr)))
        self._post_max = max(1, int(round(0.03 * fr)))
        self._pre_avg = max(1, int(round(0.10 * fr)))
        self._post_avg = max(1, int(round(0.10 * fr)))
        self._wait = max(1, int(round(0.03 * fr)))
        self._delta = 0.07
        self._onset_state = np.array([-1, 0], dtype=np.int64)  # last onset frame, count
        # gaps between consecutive onsets by length in frames, capped where the beat count
        # caps them anyway (8 periods at min_bpm)
        self._gap_hist = np.zeros(int(math.ceil(8 * 60.0 / self.min_bpm * fr)) + 1,
                                  dtype=np.int64)
        self._pick_next = 0  # next frame to decide on
        self._finished: TempoResult | None = None

    # --- feeding ----------------------------------------------------------------------------
    def push_logmel(self, logmel: np.ndarray) -> None:
        """Add log-mel frames ``(T, n_mels)`` in dB, frames first (``FrameFeatures.logmel``)."""
        s = np.asarray(logmel)
        if s.ndim != 2:
            raise ParameterError(f"logmel must have shape (frames, n_mels), got {s.shape}")
        if s.shape[0] == 0:
            return
        self._logmel_max = max(self._logmel_max, float(s.max()))
        floor = np.float32(self._logmel_max - self.top_db)
        s = np.maximum(s, floor)
        prev = s[:1] if self._prev_logmel is None else np.maximum(self._prev_logmel, floor)
        flux = np.diff(s, axis=0, prepend=prev)
        np.maximum(flux, 0.0, out=flux)
        self._prev_logmel = s[-1:].copy()
        self.push_onset(flux.mean(axis=1, dtype=np.float64))

    def push_onset(self, strength: np.ndarray) -> None:
        """Add onset-envelope values (one per frame, non-negative)."""
        if self._finished is not None:
            raise ParameterError("TempoEstimator.push after finish")
        e = np.asarray(strength, dtype=np.float64).ravel()
        if e.size == 0:
            return
        if not np.isfinite(e).all():
            e = np.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0)
        e = np.maximum(e, 0.0)
        self._pending.append(e)
        self._n_pending += e.size
        self.n_frames += e.size
        self._env_max = max(self._env_max, float(e.max()))
        if self._n_pending >= self.batch:
            self._process(final=False)

    # --- internals --------------------------------------------------------------------------
    def _process(self, final: bool) -> None:
        if self._pending:
            self._env = np.concatenate([self._env, *self._pending])
            self._pending, self._n_pending = [], 0
        end = self._env_start + self._env.size
        # autocorrelation windows ending at _next_window_end, + step, ... <= end
        ends = np.arange(self._next_window_end, end + 1, self.step)
        if ends.size:
            view = np.lib.stride_tricks.sliding_window_view(self._env, self.win)
            self._accumulate(view[ends - self.win - self._env_start])
            self._next_window_end = int(ends[-1]) + self.step
        if final and self._ac_count == 0 and self.n_frames >= 2:
            # shorter than one window: one window over all of it (its own Hann), zero-padded
            n = min(self.n_frames, self.win)
            frames = np.zeros((1, self.win))
            frames[0, :n] = self._env[:n] * np.hanning(n + 2)[1:-1]
            self._accumulate(frames, windowed=True)
        # onsets of the frames whose look-ahead is known
        post = max(self._post_max, self._post_avg)
        stop = end if final else end - post
        if stop > self._pick_next:
            _pick_onsets(self._env, self._env_start, self._pick_next, stop, end,
                         self._pre_max, self._post_max, self._pre_avg, self._post_avg,
                         self._wait, self._delta * self._env_max, self._onset_state,
                         self._gap_hist)
            self._pick_next = stop
        # keep what later windows and the onset picker still need
        keep_from = min(self._next_window_end - self.win,
                        self._pick_next - max(self._pre_max, self._pre_avg))
        drop = keep_from - self._env_start
        if drop > 0:
            self._env = self._env[drop:]
            self._env_start += drop

    def _accumulate(self, frames: np.ndarray, *, windowed: bool = False) -> None:
        """Add the lag-0-normalised autocorrelations of the rows of ``frames`` (k, win)."""
        spec = scipy.fft.rfft(frames if windowed else frames * self._window, n=self._n_fft,
                              axis=-1)
        ac = scipy.fft.irfft(spec.real ** 2 + spec.imag ** 2, n=self._n_fft, axis=-1)
        ac = ac[:, : self.win]
        lag0 = ac[:, 0]
        ok = lag0 > 0
        if ok.any():
            self._ac_sum += (ac[ok] / lag0[ok, np.newaxis]).sum(axis=0)
        self._ac_count += int(frames.shape[0])

    def finish(self) -> TempoResult:
        """Return the descriptors (idempotent); silence and short input give ``None`` values."""
        if self._finished is not None:
            return self._finished
        self._process(final=True)
        n_onsets = int(self._onset_state[1])
        onset_rate = n_onsets / (self.n_frames / self.frame_rate) if self.n_frames else None
        tempo = conf = None
        beats = None
        if self.n_frames >= self.min_frames and self._env_max > 0 and self._ac_count:
            found = self._tempo(self._ac_sum / self._ac_count)
            if found is not None:
                tempo, conf = found
                beats = self._beat_count(tempo, n_onsets)
        self._finished = TempoResult(tempo, conf, beats, onset_rate, n_onsets)
        return self._finished

    def _tempo(self, ac: np.ndarray) -> tuple[float, float] | None:
        fr = self.frame_rate
        lags = np.arange(ac.size, dtype=np.float64)
        with np.errstate(divide="ignore"):
            bpm = 60.0 * fr / lags
        in_range = (bpm >= self.min_bpm) & (bpm <= self.max_bpm) & (lags >= 1)
        if not in_range.any():
            return None
        logprior = -0.5 * ((np.log2(np.where(in_range, bpm, 1.0)) - math.log2(self.start_bpm))
                           / self.std_bpm) ** 2
        score = np.where(in_range, np.log1p(1e6 * np.maximum(ac, 0.0)) + logprior, -np.inf)
        lag = self._refine(ac, float(np.argmax(score)))
        # octave check: is the half lag as periodic? then the pulse is twice as fast
        base = float(np.median(ac[in_range]))
        if lag / 2 >= 1 and 60.0 * fr / (lag / 2) <= self.max_double_bpm:
            half = self._refine(ac, lag / 2)
            if (_comb_mass(ac, half, base)
                    >= self.double_ratio * _comb_mass(ac, lag, base)):
                lag = half
        near = ac[max(1, int(math.floor(lag)) - 1):int(math.ceil(lag)) + 2]
        peak = float(near.max())
        conf = (peak - base) / (1.0 - base) if base < 1.0 else 0.0
        return 60.0 * fr / lag, float(min(1.0, max(0.0, conf)))

    @staticmethod
    def _refine(ac: np.ndarray, lag: float) -> float:
        """Sub-frame lag within one frame of ``lag``: the best comb mean (see _comb)."""
        taus = np.arange(max(1.0, lag - 1.0), lag + 1.0 + 1e-9, 0.01)
        return float(taus[int(np.argmax(_comb(ac, taus)))])

    def _beat_count(self, tempo: float, n_onsets: int) -> int:
        if n_onsets == 0:
            return 0
        period = 60.0 * self.frame_rate / tempo
        gaps = np.arange(self._gap_hist.size, dtype=np.float64)
        span = float((np.minimum(gaps, 8.0 * period) * self._gap_hist).sum())
        return int(round(span / period)) + 1


def _comb_mass(ac: np.ndarray, tau: float, base: float) -> float:
    """Mean over the multiples ``k * tau <= len(ac) / 2`` of the autocorrelation mass above.

    The mass is taken above ``base`` in the three lags around each multiple: how periodic
    ``tau`` is, whether a peak sits on one lag or is split between two.
    """
    reach = ac.size / 2
    pos = tau * np.arange(1, max(1, int(reach // max(tau, 1.0))) + 1)
    centre = np.rint(pos).astype(np.int64)
    idx = np.clip(centre[:, None] + np.arange(-1, 2)[None, :], 0, ac.size - 1)
    return float((ac[idx] - base).sum(axis=1).mean())


def _comb(ac: np.ndarray, taus: Any) -> Any:
    """Mean of ``ac`` (linearly interpolated) at the multiples ``k * tau <= len(ac) / 2``.

    A period's multiples all peak where ``tau`` is exact, so the comb locates a period far
    more finely than the frame grid; it is also how strongly ``tau`` itself is periodic.
    """
    t = np.atleast_1d(np.asarray(taus, dtype=np.float64))
    reach = ac.size / 2
    k = np.arange(1, int(reach // max(float(t.min()), 1.0)) + 1, dtype=np.float64)
    pos = t[:, None] * k[None, :]
    mask = (pos <= reach) | (k[None, :] == 1)
    vals = np.interp(np.where(mask, pos, 0.0), np.arange(ac.size), ac, left=0.0, right=0.0)
    out = (vals * mask).sum(axis=1) / mask.sum(axis=1)
    return out if np.ndim(taus) else float(out[0])


# =========================================================================================
# Key
# =========================================================================================

# Krumhansl & Kessler (1982) probe-tone ratings, as tabulated in Krumhansl (1990), Table 2.1;
# index 0 = tonic.
_KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
# Temperley (1999), "What's key for key?", Music Perception 17(1), the Kostka-Payne profiles.
_TEMPERLEY_MAJOR = np.array([5.0, 2.0, 3.5, 2.0, 4.5, 4.0, 2.0, 4.5, 2.0, 3.5, 1.5, 4.0])
_TEMPERLEY_MINOR = np.array([5.0, 2.0, 3.5, 4.5, 2.0, 4.0, 2.0, 4.5, 3.5, 2.0, 1.5, 4.0])
_PROFILES = {
    "krumhansl": (_KK_MAJOR, _KK_MINOR),
    "temperley": (_TEMPERLEY_MAJOR, _TEMPERLEY_MINOR),
}


@dataclass(frozen=True)
class KeyResult:
    """Key descriptors of a stream.

    Attributes
    ----------
    key : str or None
        Tonic, one of :data:`KEY_NAMES`; ``None`` when no chroma energy was seen.
    mode : str or None
        ``"major"`` or ``"minor"``.
    strength : float or None
        Pearson correlation of the mean chroma with the chosen profile, in [-1, 1].
    """

    key: str | None
    mode: str | None
    strength: float | None


class KeyEstimator:
    """Key and mode by the Krumhansl-Schmuckler method on the track's mean chroma.

    Chroma frames are summed (optionally weighted, e.g. by frame RMS, so that near-silent
    frames, whose per-frame max-normalised chroma is noise, count little); at the end the
    12-bin mean is correlated (Pearson) with the 24 rotations of a major and a minor key
    profile, and the best one wins.

    Profiles: ``"temperley"`` (default), D. Temperley's profiles from the Kostka-Payne corpus
    ("What's key for key? The Krumhansl-Schmuckler key-finding algorithm reconsidered",
    Music Perception 17(1), 65-100, 1999); or ``"krumhansl"``, the Krumhansl-Kessler
    probe-tone profiles
    (C. L. Krumhansl and E. J. Kessler, "Tracing the dynamic changes in perceived tonal
    organization in a spatial representation of musical keys", Psychological Review 89(4),
    334-368, 1982; values as in C. L. Krumhansl, *Cognitive Foundations of Musical Pitch*,
    Oxford University Press, 1990, Table 2.1). On this pipeline's chroma (``chroma_stft`` of
    the power spectrum, whose harmonics lend every note its fifth) Temperley's profiles were
    right more often: all 24 keys of rendered I-IV-V-I / i-iv-V-i progressions against 19 of
    24 for Krumhansl-Kessler (which read five minor keys as their dominant's major), and 27
    against 20 of 36 pieces rendered by :mod:`tasks.synth`.

    Parameters
    ----------
    profile : str
        ``"temperley"`` or ``"krumhansl"``.
    """

    def __init__(self, profile: str = "temperley") -> None:
        if profile not in _PROFILES:
            raise ParameterError(f"profile must be one of {sorted(_PROFILES)}, got {profile!r}")
        self.profile = profile
        self._sum = np.zeros(12)
        self._weight = 0.0
        self._finished: KeyResult | None = None

    def push(self, chroma: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add chroma frames ``(T, 12)``, frames first (``FrameFeatures.chroma``).

        Parameters
        ----------
        chroma : np.ndarray [shape=(T, 12)]
            Chroma of ``T`` frames; bin 0 = C.
        weights : np.ndarray [shape=(T,)], optional
            Non-negative weight of each frame (default 1).
        """
        if self._finished is not None:
            raise ParameterError("KeyEstimator.push after finish")
        c = np.asarray(chroma)
        if c.ndim != 2 or c.shape[1] != 12:
            raise ParameterError(f"chroma must have shape (frames, 12), got {c.shape}")
        if c.shape[0] == 0:
            return
        if weights is None:
            self._sum += c.sum(axis=0, dtype=np.float64)
            self._weight += c.shape[0]
        else:
            w = np.asarray(weights, dtype=np.float64).ravel()
            if w.shape != (c.shape[0],):
                raise ParameterError("weights must have one value per chroma frame")
            w = np.maximum(w, 0.0)
            self._sum += w @ c
            self._weight += float(w.sum())

    def finish(self) -> KeyResult:
        """Return key, mode and strength (idempotent); no chroma energy gives ``None`` values."""
        if self._finished is not None:
            return self._finished
        mean = self._sum / self._weight if self._weight > 0 else self._sum
        if not np.isfinite(mean).all() or not np.any(mean > 0) or float(np.ptp(mean)) <= 1e-12:
            self._finished = KeyResult(None, None, None)
            return self._finished
        # Pearson correlation with all 24 rotated profiles in one product (the first best
        # wins: major before minor, tonic C upwards)
        z = (mean - mean.mean()) / mean.std()
        r = _key_templates(self.profile) @ z / 12.0
        best = int(np.argmax(r))
        self._finished = KeyResult(KEY_NAMES[best % 12], "major" if best < 12 else "minor",
                                   float(r[best]))
        return self._finished


@functools.cache
def _key_templates(profile: str) -> np.ndarray:
    """The 24 key profiles (12 major tonics, then 12 minor), each rotated to its tonic and
    standardised (zero mean, unit population std): ``templates @ z / 12`` is Pearson's r.
    """
    rows = [np.roll(np.asarray(prof, dtype=np.float64), tonic)
            for prof in _PROFILES[profile] for tonic in range(12)]
    t = np.array(rows)
    return (t - t.mean(axis=1, keepdims=True)) / t.std(axis=1, keepdims=True)


# =========================================================================================
# The bundle the ingest path uses
# =========================================================================================

class TrackDescriptors:
    """All descriptors of one track, fed from what ``extract_track`` already has.

    Call :meth:`push_block` with every decoded native-rate block (beside ``LevelMeter.push``)
    and :meth:`push_segments` with every list of segments ``SegmentStream.push``/``finish``
    return (before or after they are summarised); :meth:`finish` returns a dict keyed by the
    names of :data:`DESCRIPTOR_COLUMNS`. Overlapping segments (``segment_hop_s < segment_s``)
    feed each frame once, the zero-padded frames past a tail segment's valid frames are not
    fed, and a gap between segments (hop longer than the window) is filled with a zero
    envelope (no onsets) and no chroma.

    Parameters
    ----------
    native_rate : float
        Sampling rate of the decoded blocks.
    frame_rate : float
        Frames per second of the segments' frames (``sample_rate / hop_length``).
    channels : int, optional
        Channels of the decoded blocks (default: from the first block).
    rms_column : int, optional
        Column of ``FrameFeatures.scalars`` holding frame RMS, to weight the chroma; ``None``
        weights frames equally. ``TrackDescriptors.for_config`` sets it.
    """

    def __init__(self, native_rate: float, frame_rate: float, channels: int | None = None, *,
                 rms_column: int | None = None) -> None:
        self.loudness = LoudnessMeter(native_rate, channels)
        self.tempo = TempoEstimator(frame_rate)
        self.key = KeyEstimator()
        self.rms_column = rms_column
        self._next_frame = 0

    @classmethod
    def for_config(cls, native_rate: float, config: FeatureConfig, channels: int | None = None
                   ) -> TrackDescriptors:
        """Build from a :class:`~tasks.config.FeatureConfig` (frame rate, RMS column)."""
        from tasks.features import SCALAR_FEATURES

        return cls(native_rate, config.sample_rate / config.hop_length, channels,
                   rms_column=SCALAR_FEATURES.index("rms"))

    def push_block(self, block: np.ndarray) -> None:
        """Add a decoded native-rate block ``(channels, n)``."""
        self.loudness.push(block)

    def push_segments(self, segments: Iterable[Any]) -> None:
        """Add segments (``tasks.segment.Segment``: ``.span`` and ``.frames``), in order."""
        for seg in segments:
            span = seg.span
            start, stop = span.start_frame, span.start_frame + span.valid_frames
            if stop <= self._next_frame:
                continue
            if start > self._next_frame:  # a gap between segments
                self.tempo.push_onset(np.zeros(start - self._next_frame))
                self._next_frame = start
            lo = self._next_frame - start
            frames = seg.frames
            hi = span.valid_frames
            self.tempo.push_logmel(frames.logmel[lo:hi])
            weights = None if self.rms_column is None else frames.scalars[lo:hi, self.rms_column]
            self.key.push(frames.chroma[lo:hi], weights)
            self._next_frame = stop

    def finish(self) -> dict[str, Any]:
        """Return ``{column name: value or None}`` for :data:`DESCRIPTOR_COLUMNS`."""
        loud = self.loudness.finish()
        tempo = self.tempo.finish()
        key = self.key.finish()
        return {
            "loudness_lufs": loud.integrated_lufs,
            "loudness_range_lu": loud.loudness_range_lu,
            "true_peak_dbtp": loud.true_peak_dbtp,
            "tempo_bpm": tempo.tempo_bpm,
            "tempo_confidence": tempo.confidence,
            "beat_count": tempo.beat_count,
            "onset_rate": tempo.onset_rate,
            "key": key.key,
            "mode": key.mode,
            "key_strength": key.strength,
        }
