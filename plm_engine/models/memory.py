"""Give the memory a load freed back to the operating system.

Loading a model or a tokenizer builds many short-lived objects (GGUF metadata lists, the tokenizer's JSON,
safetensors headers). Python and glibc keep the freed heap pages for reuse, so they stay resident for the
life of the process (NOTES.md, "Resident memory").
glibc's malloc_trim returns every free page of its heaps (not only the top one, as free() does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (Linux/glibc only). No gc.collect(): with torch
    imported a full collection is slower than a warm load (benchmarks/results/NOTES.md), and a load's
    garbage is freed by reference counts. Call it after a load or a burst of prefills, never in every
    decode step: it walks the heap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
