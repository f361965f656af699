"""Feature configuration: one frozen dataclass whose hash names the feature set it makes.

Only fields that change the output belong here; how the work is scheduled (block sizes, shard
sizes, workers) lives with the flows. ``FeatureConfig.feature_set_id`` hashes the canonical JSON
of the config together with :data:`tasks.version.FEATURE_CODE_VERSION`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tasks.errors import ParameterError
from tasks.units import Hz, Seconds, seconds_to_frames
from tasks.version import FEATURE_CODE_VERSION

_RESAMPLE_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")


@dataclass(frozen=True)
class FeatureConfig:
    """Parameters of decoding, segmentation and feature extraction.

    Defaults follow the project's design: 22,050 Hz mono, 3 s windows with a 3 s hop, STFT
    2048/512 Hann, 128 mel bands in dB, 20 MFCC, 12 chroma, spectral statistics.
    ``segment_s`` and ``segment_hop_s`` are rounded to whole STFT frames (see
    :attr:`segment_frames`), the tail rule is in :mod:`tasks.segment`. ``descriptors``: tempo,
    key and loudness of every track (:mod:`tasks.descriptors`); ``tags``: the file's own tags
    (:mod:`tasks.tags`); either, switched off, leaves its columns null.
    """

    sample_rate: Hz = 22050
    resample_quality: str = "HQ"
    segment_s: Seconds = 3.0
    segment_hop_s: Seconds = 3.0
    min_tail_s: Seconds = 1.0
    n_fft: int = 2048
    hop_length: int = 512
    window: str = "hann"
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    n_mfcc: int = 20
    n_chroma: int = 12
    tuning: float = 0.0
    rolloff_percent: float = 0.85
    contrast_bands: int = 6
    contrast_fmin: float = 200.0
    contrast_quantile: float = 0.02
    amin: float = 1e-10
    zcr_threshold: float = 1e-10
    descriptors: bool = True
    tags: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~tasks.errors.ParameterError` if any value is out of range."""
        checks: list[tuple[bool, str]] = [
            (self.sample_rate > 0, "sample_rate must be > 0"),
            (self.resample_quality in _RESAMPLE_QUALITIES,
             f"resample_quality must be one of {_RESAMPLE_QUALITIES}"),
            (self.segment_s > 0, "segment_s must be > 0"),
            (0 < self.segment_hop_s, "segment_hop_s must be > 0"),
            (0 <= self.min_tail_s <= self.segment_s, "min_tail_s must lie in [0, segment_s]"),
            (self.n_fft >= 16 and self.n_fft % 2 == 0, "n_fft must be an even number >= 16"),
            (0 < self.hop_length <= self.n_fft, "hop_length must lie in (0, n_fft]"),
            (self.n_mels > 0, "n_mels must be > 0"),
            (0 < self.n_mfcc <= self.n_mels, "n_mfcc must lie in (0, n_mels]"),
            (self.n_chroma > 0, "n_chroma must be > 0"),
            (0.0 < self.rolloff_percent < 1.0, "rolloff_percent must lie in (0, 1)"),
            (self.contrast_bands >= 1, "contrast_bands must be >= 1"),
            (self.contrast_fmin > 0, "contrast_fmin must be > 0"),
            (0.0 < self.contrast_quantile < 1.0, "contrast_quantile must lie in (0, 1)"),
            (self.amin > 0, "amin must be > 0"),
            (self.fmin >= 0, "fmin must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParameterError(f"invalid FeatureConfig: {message}")
        nyquist = self.sample_rate / 2
        if self.fmax is not None and not self.fmin < self.fmax <= nyquist:
            raise ParameterError("invalid FeatureConfig: fmax must lie in (fmin, sample_rate/2]")
        if self.contrast_fmin * 2 ** (self.contrast_bands - 1) >= nyquist:
            raise ParameterError(
                "invalid FeatureConfig: spectral contrast bands exceed Nyquist; "
                "reduce contrast_fmin or contrast_bands"
            )

    # --- derived sizes --------------------------------------------------------------------
    @property
    def segment_frames(self) -> int:
        """STFT frames per segment: ``round(segment_s * sample_rate / hop_length)``."""
        return seconds_to_frames(self.segment_s, self.sample_rate, self.hop_length)

    @property
    def segment_hop_frames(self) -> int:
        """STFT frames between segment starts."""
        return seconds_to_frames(self.segment_hop_s, self.sample_rate, self.hop_length)

    @property
    def min_tail_frames(self) -> int:
        """Valid frames a tail segment needs to be kept (the first segment is always kept)."""
        return int(self.min_tail_s * self.sample_rate / self.hop_length + 0.5)

    @property
    def n_freqs(self) -> int:
        """Frequency bins of the one-sided STFT."""
        return self.n_fft // 2 + 1

    @property
    def frame_seconds(self) -> Seconds:
        """Seconds between consecutive frames."""
        return self.hop_length / self.sample_rate

    # --- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Build a config from a dict, rejecting unknown keys.

        Raises
        ------
        ParameterError
            If ``data`` has keys that are not fields of the config.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParameterError(f"unknown feature config keys: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        """Return the canonical JSON (sorted keys, no spaces) of the config."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def feature_set_id(self) -> str:
        """Identity of the feature set: ``fs-`` + 12 hex digits of a hash of config and code."""
        payload = f"{FEATURE_CODE_VERSION}\n{self.to_json()}".encode()
        return "fs-" + hashlib.blake2b(payload, digest_size=6).hexdigest()
