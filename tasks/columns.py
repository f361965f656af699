"""Column names of the store's tables, declared without importing the modules that compute
them (the store's schemas and the command's preflight then import no librosa or compiled
kernels): the per-segment summary statistics (:mod:`tasks.track`), the descriptors (tempo,
key, loudness; :mod:`tasks.descriptors`) and the file's own tags (:mod:`tasks.tags`).
"""

from __future__ import annotations

import pyarrow as pa

from tasks.config import FeatureConfig
from tasks.tags import TAG_FIELDS

SCALAR_FEATURES: tuple[str, ...] = (
    "centroid",
    "bandwidth",
    "rolloff",
    "flatness",
    "zcr",
    "rms",
)
"""Names of the one-value-per-frame features, in storage order."""


def summary_columns(config: FeatureConfig) -> list[str]:
    """Names of the per-segment summary statistics, in storage order.

    Parameters
    ----------
    config : FeatureConfig

    Returns
    -------
    list of str
        ``mfcc_mean_00 ..``, ``mfcc_std_00 ..``, then chroma and contrast the same way, then
        ``<scalar>_mean`` and ``<scalar>_std`` for each of :data:`SCALAR_FEATURES`.
    """
    cols: list[str] = []
    for group, size in (
        ("mfcc", config.n_mfcc),
        ("chroma", config.n_chroma),
        ("contrast", config.contrast_bands + 1),
    ):
        for stat in ("mean", "std"):
            cols += [f"{group}_{stat}_{i:02d}" for i in range(size)]
    for name in SCALAR_FEATURES:
        cols += [f"{name}_mean", f"{name}_std"]
    return cols


DESCRIPTOR_COLUMNS: list[tuple[str, str, str, str, str]] = [
    ("loudness_lufs", "float32", "LUFS",
     "integrated loudness, ITU-R BS.1770-4 (K-weighting, 400 ms blocks with 75 % overlap, "
     "-70 LUFS absolute and -10 LU relative gates); null if no block passes the gates",
     "LoudnessMeter on the decoded native-rate channels"),
    ("loudness_range_lu", "float32", "LU",
     "loudness range, EBU Tech 3342 (3 s short-term loudness every 100 ms, -70 LUFS absolute "
     "and -20 LU relative gates, 95th minus 10th percentile); null under 3 s",
     "LoudnessMeter on the decoded native-rate channels"),
    ("true_peak_dbtp", "float32", "dBTP",
     "true peak, ITU-R BS.1770-4 Annex 2 (4x polyphase interpolation, max over channels, "
     "never below the sample peak); null for digital silence",
     "LoudnessMeter on the decoded native-rate channels"),
    ("tempo_bpm", "float32", "BPM",
     "global tempo from the averaged autocorrelation of the spectral-flux onset envelope "
     "(log-normal prior at 120 BPM, octave check); null for silence or under 3 s",
     "TempoEstimator on the log-mel frames of the segments"),
    ("tempo_confidence", "float32", "",
     "prominence of the tempo's autocorrelation peak over the median in 30-300 BPM, in [0, 1]",
     "TempoEstimator on the log-mel frames of the segments"),
    ("beat_count", "int32", "beats",
     "estimated beats: onset-active span (gaps capped at 8 beats) / beat period + 1; "
     "not a tracked beat sequence; null when the tempo is null",
     "TempoEstimator on the log-mel frames of the segments"),
    ("onset_rate", "float32", "1/s",
     "detected onsets (peaks of the onset envelope) per second of audio",
     "TempoEstimator on the log-mel frames of the segments"),
    ("key", "string", "",
     "tonic of the best-correlated key profile (Temperley 1999): C, C#, D, ... B",
     "KeyEstimator on the chroma frames of the segments (RMS-weighted)"),
    ("mode", "string", "", "major or minor (with the key)",
     "KeyEstimator on the chroma frames of the segments (RMS-weighted)"),
    ("key_strength", "float32", "",
     "Pearson correlation of the track's mean chroma with the chosen key profile, in [-1, 1]",
     "KeyEstimator on the chroma frames of the segments (RMS-weighted)"),
]
"""Output columns: (name, Arrow type alias for ``pyarrow.type_for_alias``, unit, meaning,
source). Every column is nullable."""


_TAG_TYPES = {"genre": pa.list_(pa.string()), "artists": pa.list_(pa.string()),
              "musicbrainz_artist_id": pa.list_(pa.string()),
              "musicbrainz_album_artist_id": pa.list_(pa.string()),
              "year": pa.int32(), "track_number": pa.int32(), "track_total": pa.int32(),
              "disc_number": pa.int32(), "disc_total": pa.int32()}

TAG_COLUMNS: list[tuple[str, str]] = [
    ("tags_error" if f == "error" else f, f) for f in TAG_FIELDS]
"""(tracks column, :func:`tasks.tags.read_tags` key): ``error`` is stored as ``tags_error``."""


def descriptor_fields() -> list[pa.Field]:
    """Arrow fields of :data:`DESCRIPTOR_COLUMNS`."""
    return [pa.field(name, pa.type_for_alias(alias)) for name, alias, *_ in DESCRIPTOR_COLUMNS]


def tag_fields() -> list[pa.Field]:
    """Arrow fields of :data:`TAG_COLUMNS`."""
    return [pa.field(col, _TAG_TYPES.get(key, pa.string())) for col, key in TAG_COLUMNS]
