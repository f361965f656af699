"""Per-file time limits: no step of one file (hashing, decoding, extracting) runs forever.

A :class:`Deadline` is checked between the chunks a step reads (bytes hashed, blocks decoded),
so a file that never ends (a device behind a link, a stream that keeps growing) or a mount that
slows to a crawl stops with :class:`~tasks.errors.TimeLimitExceeded`, a transient failure the
next run tries again. A single read that blocks inside the C library cannot be interrupted
this way; FIFOs and devices are never opened for that reason (``flows.ingest_worker``).
"""

from __future__ import annotations

import os
import time

from tasks.errors import TimeLimitExceeded

BASE_LIMIT_S = 120.0
"""Seconds every file gets before its size or length counts (``MTAG_FILE_TIME_LIMIT_S``)."""
MIN_REALTIME_X = 4.0
"""Decoding and extracting a file may take up to ``duration / MIN_REALTIME_X`` more (a file
normally runs at 100-300x realtime per core)."""
MIN_READ_BYTES_S = 2e6
"""Hashing a file may take up to ``size / MIN_READ_BYTES_S`` more seconds (2 MB/s)."""


def base_limit_s() -> float:
    """The base limit, from ``MTAG_FILE_TIME_LIMIT_S`` if set."""
    value = os.environ.get("MTAG_FILE_TIME_LIMIT_S")
    return float(value) if value else BASE_LIMIT_S


class Deadline:
    """A time limit for one step of one file.

    Parameters
    ----------
    seconds : float
        Seconds from now.
    what : str
        The step, for the error message (``"decoding"``).
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self._end = time.monotonic() + seconds

    @classmethod
    def for_decoding(cls, duration_s: float | None) -> Deadline:
        """The limit of decoding and extracting a file of ``duration_s`` seconds."""
        return cls(base_limit_s() + (duration_s or 0.0) / MIN_REALTIME_X, "decoding")

    @classmethod
    def for_hashing(cls, size_bytes: int | None) -> Deadline:
        """The limit of hashing a file of ``size_bytes`` bytes."""
        return cls(base_limit_s() + max(0, size_bytes or 0) / MIN_READ_BYTES_S, "hashing")

    def check(self) -> None:
        """Raise :class:`TimeLimitExceeded` if the limit has passed."""
        if time.monotonic() > self._end:
            raise TimeLimitExceeded(f"{self.what} ran past its time limit of "
                                    f"{self.seconds:.0f} s")
