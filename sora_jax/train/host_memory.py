"""Giving the host memory an XLA compile freed back to the operating system.

Compiling a training step on CPU allocates (and frees) several hundred MB in glibc's
per-thread arenas, which glibc keeps: the process's resident memory stays at the compiler's
peak for the whole run, and the step's own buffers are then allocated around those pages.
``malloc_trim(0)`` right after a compile, before the program first runs, hands the free pages
back (measured on issue 15's peer benchmark shape: 1193 MB after compiling, 702 MB after the
trim, with the executable alive). Only glibc has ``malloc_trim``; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_free_host_memory() -> bool:
    """Returns the process heap's free pages to the OS (glibc ``malloc_trim(0)``).

    Returns:
      True if memory was released, False if none was or the C library has no malloc_trim.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
