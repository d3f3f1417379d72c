"""Give the memory a pass freed back to the operating system before the next pass.

A pass allocates activations whose sizes follow its batch and question lengths. glibc keeps
freed chunks in its heap for reuse, and after a large block is freed it raises its mmap threshold
so later blocks of that size come from the heap too: the server's resident memory steps up to
its largest passes and stays there, holes included. ``malloc_trim(0)`` after each pass hands the
free pages back (it also releases holes inside the heap, not only its top).

Measured with bench/serve.py, 10-minute soaks at 8 clients, three servers side by side on one
machine (docs/serving.md): trimming after each pass kept resident memory level at no cost in
questions/s, where a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=1048576``) also kept it level
but served 28% fewer questions, because every large tensor then pays for fresh zeroed pages.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim  # glibc only: musl and macOS have no such function
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        log.debug("no malloc_trim in this C library: freed memory stays with the allocator")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
