"""Segmentation: the tail rule, and a streaming segmenter over frame-level features.

Segments are runs of STFT frames of one centred STFT over the whole track (librosa's framing:
frame ``j`` is centred on sample ``j * hop_length``, the track padded with zeros by
``n_fft // 2`` at both ends). A track of ``n`` samples has ``1 + n // hop_length`` *valid*
frames. Segment ``k`` covers frames ``[k * H, k * H + F)`` with ``F = config.segment_frames``
and ``H = config.segment_hop_frames``.

The tail rule
    * segment 0 is always kept, so a track shorter than one window yields one segment, padded;
    * a later segment is kept if it starts inside the track, adds frames the previous segment
      did not cover, and either is full or holds at least ``min_tail_s`` of valid frames.
    Frames past the end of a kept tail segment are computed on the zero-padded signal (they
    decay to the ``amin`` floor, -100 dB in log-mel); each segment records its number of valid
    frames and summary statistics use only those.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tasks.config import FeatureConfig
from tasks.errors import DecodeError
from tasks.features import FrameFeatures, SpectralExtractor


@dataclass(frozen=True)
class SegmentSpan:
    """Where a segment lies, in frames of the track's STFT."""

    index: int
    start_frame: int
    valid_frames: int


def valid_frames(n_samples: int, hop_length: int) -> int:
    """Number of frames librosa's centred STFT gives for ``n_samples`` samples."""
    return 1 + n_samples // hop_length


def plan_segments(n_valid: int, config: FeatureConfig) -> list[SegmentSpan]:
    """Apply the tail rule to a track with ``n_valid`` valid frames.

    Parameters
    ----------
    n_valid : int > 0
        Valid frames of the track (see :func:`valid_frames`).
    config : FeatureConfig

    Returns
    -------
    list of SegmentSpan
        At least one span; spans are in order of ``index``.
    """
    size, hop, min_tail = config.segment_frames, config.segment_hop_frames, config.min_tail_frames
    spans = [SegmentSpan(0, 0, min(size, n_valid))]
    k = 1
    while k * hop < n_valid and (k - 1) * hop + size < n_valid:
        valid = min(size, n_valid - k * hop)
        if valid == size or valid >= min_tail:
            spans.append(SegmentSpan(k, k * hop, valid))
        k += 1
    return spans


@dataclass
class Segment:
    """One segment's frames (exactly ``config.segment_frames`` of them) and where it lies."""

    span: SegmentSpan
    frames: FrameFeatures


class SegmentStream:
    """Turn a stream of mono samples into segments, computing each STFT frame once.

    Push resampled mono blocks of any size with :meth:`push`, then call :meth:`finish`. Both
    return the segments completed so far. Memory stays bounded by ``chunk_frames`` frames of
    spectrum plus one segment of frame features, whatever the track length.

    Parameters
    ----------
    config : FeatureConfig
    extractor : SpectralExtractor
        Built once per worker and shared across tracks.
    chunk_frames : int
        Frames computed per STFT call once enough samples are buffered.
    """

    def __init__(
        self, config: FeatureConfig, extractor: SpectralExtractor, *, chunk_frames: int = 2048
    ) -> None:
        self.config = config
        self.extractor = extractor
        self.chunk_frames = max(chunk_frames, config.segment_frames)
        self._pad = config.n_fft // 2
        self._buf = np.zeros(self._pad, dtype=np.float32)
        self._buf_start = 0  # padded-signal index of _buf[0]
        self.n_samples = 0
        self._first = 0.0
        self._last = 0.0
        self._next_frame = 0  # next frame to compute
        self._frames: FrameFeatures | None = None
        self._frames_start = 0  # frame index of _frames[0]
        self._next_segment = 0

    # ------------------------------------------------------------------------------------
    def push(self, y: np.ndarray) -> list[Segment]:
        """Add mono samples; return segments that are now complete."""
        if y.size == 0:
            return []
        if self.n_samples == 0:
            self._first = float(y[0])
        self._last = float(y[-1])
        self.n_samples += y.size
        self._buf = np.concatenate([self._buf, y.astype(np.float32, copy=False)])
        available = self._computable_frames() - self._next_frame
        if available < self.chunk_frames:
            return []
        self._compute(self._next_frame + available, right_edge=False)
        known_valid = valid_frames(self.n_samples, self.config.hop_length)
        return list(self._emit_full(min(known_valid, self._next_frame)))

    def finish(self) -> list[Segment]:
        """Close the stream: apply the tail rule and return the remaining segments.

        Raises
        ------
        DecodeError
            If no samples were pushed.
        """
        if self.n_samples == 0:
            raise DecodeError("no audio samples")
        c = self.config
        spans = plan_segments(valid_frames(self.n_samples, c.hop_length), c)
        last_frame = max(s.start_frame for s in spans) + c.segment_frames
        # frames whose whole window lies in the trailing zero padding are all alike: computed
        # once (SpectralExtractor.silence), not per frame
        all_zero_from = -(-(self._pad + self.n_samples) // c.hop_length)
        stop = min(last_frame, max(all_zero_from, self._next_frame))
        need = (stop - 1) * c.hop_length + c.n_fft
        end = self._buf_start + self._buf.size
        if need > end:
            self._buf = np.concatenate([self._buf, np.zeros(need - end, dtype=np.float32)])
        if stop > self._next_frame:
            self._compute(stop, right_edge=True)
        if last_frame > stop:
            assert self._frames is not None
            silence = self.extractor.silence(last_frame - stop)
            self._frames = FrameFeatures.concat([self._frames, silence])
            self._next_frame = last_frame
        return [self._cut(s) for s in spans if s.index >= self._next_segment]

    # ------------------------------------------------------------------------------------
    def _computable_frames(self) -> int:
        end = self._buf_start + self._buf.size
        n_fft, hop = self.config.n_fft, self.config.hop_length
        return max(0, (end - n_fft) // hop + 1)

    def _compute(self, stop_frame: int, *, right_edge: bool) -> None:
        hop = self.config.hop_length
        start = self._next_frame * hop - self._buf_start
        buf = self._buf[start:]
        zcr_buf = self._edge_padded(buf, self._next_frame * hop, right_edge)
        new = self.extractor.frames(buf, stop_frame - self._next_frame, zcr_buf=zcr_buf)
        self._next_frame = stop_frame
        keep_from = self._next_segment * self.config.segment_hop_frames
        if self._frames is None:
            self._frames, self._frames_start = new, stop_frame - len(new)
        else:
            old = self._frames.slice(max(0, keep_from - self._frames_start), len(self._frames))
            self._frames = FrameFeatures.concat([old, new])
            self._frames_start = stop_frame - len(self._frames)
        # samples before the next frame's start are no longer needed
        drop = self._next_frame * hop - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop

    def _edge_padded(self, buf: np.ndarray, buf_start: int, right_edge: bool) -> np.ndarray | None:
        """Copy of ``buf`` with padding replaced by edge samples (librosa's zcr padding)."""
        left = self._pad - buf_start
        right = self._pad + self.n_samples - buf_start if right_edge else buf.size
        if left <= 0 and right >= buf.size:
            return None
        out = buf.copy()
        if left > 0:
            out[:left] = self._first
        if right < buf.size:
            out[max(right, 0):] = self._last
        return out

    def _emit_full(self, valid_stop: int) -> Iterator[Segment]:
        c = self.config
        while True:
            start = self._next_segment * c.segment_hop_frames
            if start + c.segment_frames > valid_stop:
                return
            yield self._cut(SegmentSpan(self._next_segment, start, c.segment_frames))

    def _cut(self, span: SegmentSpan) -> Segment:
        assert self._frames is not None
        lo = span.start_frame - self._frames_start
        frames = self._frames.slice(lo, lo + self.config.segment_frames)
        assert len(frames) == self.config.segment_frames, (span, len(frames))
        self._next_segment = span.index + 1
        return Segment(span, frames)
