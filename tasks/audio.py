"""Sample-level operations: validation, mono mix-down, streaming resampling, level metering.

All functions take ``float32`` arrays with time on the last axis. Streaming classes consume
blocks in order and produce output identical (resampling: up to float rounding) to processing
the whole signal at once, so long files never need to be held whole.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

from tasks.errors import DecodeError, ParameterError
from tasks.units import Hz


def valid_audio(y: np.ndarray, *, mono: bool = False) -> None:
    """Check that ``y`` is finite floating-point audio with time on the last axis.

    Parameters
    ----------
    y : np.ndarray [shape=(n,) or (channels, n)]
        Audio samples.
    mono : bool
        Require a one-dimensional signal.

    Raises
    ------
    ParameterError
        If ``y`` is not a floating-point ndarray of the expected rank.
    DecodeError
        If ``y`` holds NaN or infinite values.
    """
    if not isinstance(y, np.ndarray):
        raise ParameterError(f"audio must be an np.ndarray, got {type(y).__name__}")
    if not np.issubdtype(y.dtype, np.floating):
        raise ParameterError(f"audio must be floating-point, got {y.dtype}")
    if mono and y.ndim != 1:
        raise ParameterError(f"mono audio must be one-dimensional, got shape {y.shape}")
    if y.ndim not in (1, 2):
        raise ParameterError(f"audio must have shape (n,) or (channels, n), got {y.shape}")
    if not np.isfinite(y).all():
        bad = int(np.size(y) - np.count_nonzero(np.isfinite(y)))
        raise DecodeError(f"audio holds {bad} non-finite (NaN/Inf) samples")


def to_mono(y: np.ndarray) -> np.ndarray:
    """Mix down to mono by averaging channels.

    Parameters
    ----------
    y : np.ndarray [shape=(n,) or (channels, n)]
        Audio samples.

    Returns
    -------
    np.ndarray [shape=(n,), dtype=float32]
        The channel mean (a 1-D input is returned as ``float32``, unchanged).
    """
    if y.ndim == 1:
        return y.astype(np.float32, copy=False)
    if y.ndim != 2:
        raise ParameterError(f"audio must have shape (n,) or (channels, n), got {y.shape}")
    return y.mean(axis=0, dtype=np.float32)


class StreamResampler:
    """Resample a mono stream block by block with soxr.

    Same-rate input passes through untouched. Feeding blocks of any size in order and calling
    :meth:`finish` once gives the same samples as resampling the whole signal in one call.

    Parameters
    ----------
    in_rate, out_rate : int > 0
        Input and output sampling rates in Hz.
    quality : str
        soxr quality recipe (``"HQ"`` by default).
    """

    def __init__(self, in_rate: Hz, out_rate: Hz, *, quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ParameterError(f"sample rates must be > 0, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
        )

    def push(self, block: np.ndarray) -> np.ndarray:
        """Resample the next block.

        Parameters
        ----------
        block : np.ndarray [shape=(n,), dtype=float32]

        Returns
        -------
        np.ndarray [shape=(m,), dtype=float32]
            Output samples available so far (``m`` varies from block to block).
        """
        block = np.ascontiguousarray(block, dtype=np.float32)
        if self._stream is None:
            return block
        return self._stream.resample_chunk(block, last=False)

    def finish(self) -> np.ndarray:
        """Flush the resampler's delay line; call once at the end of the stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


class LevelMeter:
    """Accumulate peak and RMS level over a stream of (multi-channel) blocks.

    Levels are in dBFS over all channels' samples; silence reads ``-inf``.
    """

    def __init__(self) -> None:
        self.peak = 0.0
        self._sum_sq = 0.0
        self.count = 0

    def push(self, block: np.ndarray) -> None:
        """Add a block of shape ``(n,)`` or ``(channels, n)``."""
        if block.size:
            self.peak = max(self.peak, float(np.max(np.abs(block))))
            self._sum_sq += float(np.dot(block.ravel(), block.ravel()))
            self.count += block.size

    @property
    def peak_dbfs(self) -> float:
        """Sample peak in dBFS."""
        return 20.0 * math.log10(self.peak) if self.peak > 0 else -math.inf

    @property
    def rms_dbfs(self) -> float:
        """RMS level in dBFS."""
        if self.count == 0 or self._sum_sq <= 0:
            return -math.inf
        return 10.0 * math.log10(self._sum_sq / self.count)
