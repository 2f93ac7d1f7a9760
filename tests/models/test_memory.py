"""release_freed_memory hands a load's freed C-heap pages back to the OS (glibc's malloc_trim)."""

import sys

import pytest

from plm_engine.models.memory import _malloc_trim, release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="needs glibc")
def test_freed_heap_pages_leave_the_resident_set():
    # 64 KiB blocks come from the heap (below glibc's mmap threshold); keeping the last one alive pins
    # the heap's top, so free() alone cannot shrink it and the 60 MB below stay resident.
    blocks = [bytearray(64 * 1024) for _ in range(960)]
    keep = blocks[-1]
    del blocks
    before = _rss_mb()
    release_freed_memory()
    assert before - _rss_mb() > 30, "malloc_trim should return the freed blocks' pages"
    assert len(keep) == 64 * 1024
