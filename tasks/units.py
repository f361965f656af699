"""Units and the one rounding rule used everywhere.

Time is in seconds (float), rates in Hz (int), lengths in samples or frames (int). Converting
seconds to samples always goes through :func:`seconds_to_samples` so that every stage agrees on
where a boundary falls.
"""

from typing import TypeAlias

Seconds: TypeAlias = float
Hz: TypeAlias = int


def seconds_to_samples(seconds: Seconds, sample_rate: Hz) -> int:
    """Convert a duration to a whole number of samples, rounding half up.

    Parameters
    ----------
    seconds : float >= 0
        Duration in seconds.
    sample_rate : int > 0
        Sampling rate in Hz.

    Returns
    -------
    int
        ``floor(seconds * sample_rate + 0.5)``.
    """
    return int(seconds * sample_rate + 0.5)


def seconds_to_frames(seconds: Seconds, sample_rate: Hz, hop_length: int) -> int:
    """Convert a duration to a whole number of STFT frames (at least one).

    Parameters
    ----------
    seconds : float > 0
        Duration in seconds.
    sample_rate : int > 0
        Sampling rate in Hz.
    hop_length : int > 0
        Samples between frames.

    Returns
    -------
    int
        ``max(1, round(seconds_to_samples(seconds, sample_rate) / hop_length))``.
    """
    return max(1, int(seconds_to_samples(seconds, sample_rate) / hop_length + 0.5))
