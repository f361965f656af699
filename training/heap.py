"""The C heap while a network trains on CPU: large blocks reused, not mapped and unmapped.

A training step of the log-mel CNN (batch 64) makes activations of 100 MB and more. glibc's
``malloc`` serves any block above its mmap threshold (at most 32 MiB on 64-bit Linux, however
it is set) with a fresh ``mmap`` and unmaps it on ``free``, so every step faults its
activations in again, page by page: 340,000-460,000 minor faults a step (log-mel CNN, CRNN),
about half of its time in the kernel (``mtag train --model auto`` on philharmonia-dev: 403 M
faults, 792 of its 2,297 CPU-seconds in the kernel). :func:`reused_heap` tells glibc to serve
every block from the heap and to keep up to 512 MiB of freed memory at its top, so a step
reuses the previous step's pages: 1.9-2.0x faster log-mel CNN and CRNN steps in one thread
(decision 74).

Where the C library is not glibc (or there is no ``mallopt``), nothing changes. The settings
are the process's: only the thread's own arena is affected when the training runs in a thread
that already has one (glibc's main arena is the main thread's).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
"""glibc's ``mallopt`` parameters (``malloc.h``)."""
TRIM_BYTES = 512 << 20
"""Freed memory kept at the heap's top while training (more than one step's activations)."""
TOP_PAD_BYTES = 64 << 20
"""What the heap grows by at once while training."""
_DEFAULTS = {M_TRIM_THRESHOLD: 128 << 10, M_TOP_PAD: 128 << 10, M_MMAP_MAX: 65536}
"""glibc's own defaults, restored after training unless the environment set them."""
_ENV = {M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_TOP_PAD: "MALLOC_TOP_PAD_",
        M_MMAP_MAX: "MALLOC_MMAP_MAX_"}

_lock = threading.Lock()
_depth = 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library this process runs on (its own symbols: no search, no subprocess), if it
    is glibc.
    """
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")
            and hasattr(libc, "gnu_get_libc_version")):
        return None  # not glibc (musl has no mallopt parameters of these numbers)
    return libc


def _restored(param: int) -> int:
    value = os.environ.get(_ENV[param], "")
    return int(value) if value.isdigit() else _DEFAULTS[param]


@contextlib.contextmanager
def reused_heap(enabled: bool = True) -> Iterator[bool]:
    """Within the block, glibc serves large blocks from the heap and keeps freed memory for
    reuse (see the module's text); afterwards its settings are restored (those of the
    environment, else glibc's defaults) and freed memory is given back (``malloc_trim``).
    Yields whether the settings took effect. Nested and concurrent uses share one setting,
    restored when the last ends.
    """
    global _depth
    libc = _libc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
            libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param in (M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD):
                    libc.mallopt(param, _restored(param))
                libc.malloc_trim(0)
