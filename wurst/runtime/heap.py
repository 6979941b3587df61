"""Freed CPU memory kept for reuse while a model runs (glibc only).

glibc's malloc hands every allocation above its mmap threshold (32 MiB at most, by default) fresh pages from the
kernel and returns them on free, and it gives back the top of its heap once more than the trim threshold is free.
A denoising step allocates and frees the same large activations again and again, so by default each of them
costs a page fault per 4 KiB and the kernel's zeroing: at 1024x1024 on 2 cores that was 6-10% of a Stage B or
Stage C forward pass and 40% of the VQGAN's decode (docs/perf-notes.md). While a model runs, `kept_heap` raises
both thresholds so that freed blocks are reused; on leaving, it sets them to the largest values glibc's own
adjustment reaches (mmap 32 MiB, trim 64 MiB) and returns the free memory to the system (`malloc_trim`), so the
process keeps nothing between runs. Elsewhere (other C libraries, a preloaded allocator) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
RUNNING = 2**31 - 1  # mallopt's largest (an int): blocks up to 2 GiB come from the heap, which is not trimmed
AFTER = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # gnu_get_libc_version is glibc's own symbol: mallopt's parameters mean the above only there.
    return libc if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


_LIBC = _glibc()
_lock = threading.Lock()
_depth = 0  # kept_heap nests (and pipelines may run in several threads): the first in sets, the last out restores


@contextlib.contextmanager
def kept_heap() -> Iterator[None]:
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(M_MMAP_THRESHOLD, RUNNING)
            _LIBC.mallopt(M_TRIM_THRESHOLD, RUNNING)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for parameter, value in AFTER.items():
                    _LIBC.mallopt(parameter, value)
                _LIBC.malloc_trim(0)
