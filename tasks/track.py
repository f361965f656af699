"""From decoded blocks to one track's features: mono, level, resample, segment, summarise.

:func:`extract_track` is pure given its inputs: an iterator of native-rate blocks (from the
decode adapter) and a callback that receives each completed batch of dense segment tensors
(so a sink can write or spill them; nothing here does I/O). Summary statistics come back at the
end, because spectral contrast needs the whole track (see :func:`tasks.features.contrast_db`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.audio import LevelMeter, StreamResampler, to_mono, valid_audio
from tasks.columns import summary_columns
from tasks.config import FeatureConfig
from tasks.features import SCALAR_FEATURES, SpectralExtractor, contrast_db, max_db
from tasks.segment import Segment, SegmentStream
from tasks.units import Hz


@dataclass
class SegmentBatch:
    """Dense tensors of consecutive segments of one track.

    Attributes
    ----------
    index : np.ndarray [shape=(S,), dtype=int32]
        Segment numbers within the track.
    start_s : np.ndarray [shape=(S,), dtype=float64]
        Start times in seconds (the centre of the first frame).
    valid_frames : np.ndarray [shape=(S,), dtype=int32]
        Frames that lie inside the track (the rest is padding).
    logmel : np.ndarray [shape=(S, n_mels, F), dtype=float32]
    mfcc : np.ndarray [shape=(S, n_mfcc, F), dtype=float32]
    """

    index: np.ndarray
    start_s: np.ndarray
    valid_frames: np.ndarray
    logmel: np.ndarray
    mfcc: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class TrackResult:
    """What one track yields besides its dense tensors.

    Attributes
    ----------
    n_samples : int
        Mono samples at the target rate.
    duration_s : float
        ``n_samples / sample_rate``.
    peak_dbfs, rms_dbfs : float
        Level of the decoded (native-rate, all channels) signal.
    stats : np.ndarray [shape=(S, len(summary_columns(config))), dtype=float32]
        Summary statistics per segment over its valid frames.
    segment_index, start_s, valid_frames : np.ndarray [shape=(S,)]
        As in :class:`SegmentBatch`, for every segment of the track.
    descriptors : dict
        Tempo, key and loudness (:data:`tasks.columns.DESCRIPTOR_COLUMNS`); empty when the
        config switches them off.
    """

    n_samples: int
    duration_s: float
    peak_dbfs: float
    rms_dbfs: float
    stats: np.ndarray
    segment_index: np.ndarray
    start_s: np.ndarray
    valid_frames: np.ndarray
    descriptors: dict[str, Any] = field(default_factory=dict)


@dataclass
class _StatsAccumulator:
    config: FeatureConfig
    rows: list[np.ndarray] = field(default_factory=list)
    peaks: list[np.ndarray] = field(default_factory=list)
    valleys: list[np.ndarray] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, seg: Segment) -> None:
        n = seg.span.valid_frames
        f = seg.frames
        parts = []
        for block in (f.mfcc[:n], f.chroma[:n]):
            parts += [block.mean(axis=0), block.std(axis=0)]
        scalars = f.scalars[:n]
        self.rows.append(
            np.concatenate([*parts, scalars.mean(axis=0), scalars.std(axis=0)])
        )
        self.peaks.append(f.contrast_peak[:n])
        self.valleys.append(f.contrast_valley[:n])
        self.spans.append((seg.span.index, seg.span.start_frame, n))

    def finish(self) -> np.ndarray:
        c = self.config
        peak_max = max(max_db(p, c.amin) for p in self.peaks)
        valley_max = max(max_db(v, c.amin) for v in self.valleys)
        n_mc = 2 * (c.n_mfcc + c.n_chroma)
        n_scalar = len(SCALAR_FEATURES)
        out = np.empty((len(self.rows), len(summary_columns(c))), dtype=np.float32)
        for i, (row, p, v) in enumerate(zip(self.rows, self.peaks, self.valleys, strict=True)):
            con = contrast_db(p, v, peak_max_db=peak_max, valley_max_db=valley_max, amin=c.amin)
            out[i, :n_mc] = row[:n_mc]
            out[i, n_mc:n_mc + 2 * con.shape[1]] = np.concatenate([con.mean(0), con.std(0)])
            means, stds = row[n_mc:n_mc + n_scalar], row[n_mc + n_scalar:]
            tail = out[i, n_mc + 2 * con.shape[1]:]
            tail[0::2], tail[1::2] = means, stds
        return out


def extract_track(
    blocks: Iterable[np.ndarray],
    native_rate: Hz,
    config: FeatureConfig,
    extractor: SpectralExtractor,
    on_batch: Callable[[SegmentBatch], None],
) -> TrackResult:
    """Run one track through mono mix, resampling, segmentation and feature extraction.

    Parameters
    ----------
    blocks : iterable of np.ndarray [shape=(channels, n), dtype=float32]
        Decoded audio at ``native_rate``, in order (any block sizes).
    native_rate : int > 0
        Sampling rate of ``blocks`` in Hz.
    config : FeatureConfig
    extractor : SpectralExtractor
        Built from ``config``; reuse it across tracks.
    on_batch : callable
        Receives each :class:`SegmentBatch` as soon as its segments are complete.

    Returns
    -------
    TrackResult

    Raises
    ------
    DecodeError
        If a block holds NaN/Inf samples or the track holds no samples.
    """
    meter = LevelMeter()
    resampler = StreamResampler(native_rate, config.sample_rate, quality=config.resample_quality)
    stream = SegmentStream(config, extractor)
    acc = _StatsAccumulator(config)
    desc = None
    if config.descriptors:
        from tasks.descriptors import TrackDescriptors

        desc = TrackDescriptors.for_config(native_rate, config)

    def emit(segments: list[Segment]) -> None:
        if not segments:
            return
        for seg in segments:
            acc.add(seg)
        if desc is not None:
            desc.push_segments(segments)
        on_batch(_batch(segments, config))

    for block in blocks:
        valid_audio(block)
        meter.push(block)
        if desc is not None:
            desc.push_block(block)
        emit(stream.push(resampler.push(to_mono(block))))
    emit(stream.push(resampler.finish()))
    emit(stream.finish())
    index, start, valid = (np.array(col) for col in zip(*acc.spans, strict=True))
    return TrackResult(
        n_samples=stream.n_samples,
        duration_s=stream.n_samples / config.sample_rate,
        peak_dbfs=meter.peak_dbfs,
        rms_dbfs=meter.rms_dbfs,
        stats=acc.finish(),
        segment_index=index.astype(np.int32),
        start_s=start * config.frame_seconds,
        valid_frames=valid.astype(np.int32),
        descriptors=desc.finish() if desc is not None else {},
    )


def _batch(segments: list[Segment], config: FeatureConfig) -> SegmentBatch:
    return SegmentBatch(
        index=np.array([s.span.index for s in segments], dtype=np.int32),
        start_s=np.array([s.span.start_frame * config.frame_seconds for s in segments]),
        valid_frames=np.array([s.span.valid_frames for s in segments], dtype=np.int32),
        logmel=np.stack([s.frames.logmel.T for s in segments]),
        mfcc=np.stack([s.frames.mfcc.T for s in segments]),
    )


def finite_or_none(x: float) -> float | None:
    """Return ``x``, or ``None`` for NaN/inf (for tables that store levels of silence)."""
    return x if math.isfinite(x) else None
