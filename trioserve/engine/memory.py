"""Giving freed memory back to the system when the engine goes idle.

MLX frees its buffers with ``free()``; glibc keeps much of that in its heap (its mmap
threshold rises after large frees), so an idle server would sit on its peak memory.
``malloc_trim(0)`` hands the free heap back. Measured with ``tools/stress.py`` (12 clients,
32 MB prefix cache): RSS after a storm of random requests went from +12-17 % over the idle
baseline to +0.2 %.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _malloc_trim():  # -> the C function, or None where there is no glibc
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return free heap pages to the OS (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
