"""The C heap while a network trains on CPU (training.heap, decision 74)."""

from __future__ import annotations

import ctypes
import resource
import sys

import pytest

from training.heap import reused_heap


def _faults_of_big_blocks(n: int = 6, size: int = 96 << 20) -> int:
    """Minor page faults of ``n`` blocks of ``size`` bytes from ``malloc``, each written,
    then freed (as torch's CPU allocator does; numpy asks for huge pages, which hide this).
    """
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = libc.malloc(size)
        assert block
        ctypes.memset(block, 1, size)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_reuse_freed_memory_inside_and_are_unmapped_again_after():
    pages = (96 << 20) // resource.getpagesize()
    outside = _faults_of_big_blocks()
    with reused_heap() as on:
        assert on  # glibc here
        inside = _faults_of_big_blocks()
    after = _faults_of_big_blocks()
    # outside: every block is a fresh mapping, faulted in page by page (6 blocks)
    assert outside > 4 * pages
    # inside: the first block's pages are reused by the next five
    assert inside < 2 * pages
    # the settings are restored: blocks are mapped (and faulted) afresh again
    assert after > 4 * pages


def test_a_disabled_heap_changes_nothing_and_nesting_restores_once():
    with reused_heap(False) as on:
        assert not on
    with reused_heap() as a, reused_heap() as b:
        assert a == b
    from training import heap

    assert heap._depth == 0
