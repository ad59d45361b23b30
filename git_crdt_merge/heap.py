"""glibc heap tuning, one policy per long command (a no-op where the C library is another).

- Resolution (:mod:`.resolution.engine`, :mod:`.resolution.pool`): buffers up to the largest
  tensor are reused from the heap, larger ones get their own mmap, and freed memory goes back
  to the system between tensors, so the peak RSS stays within its bound.
- Ingest (``add-contribution``, ``set-base``): the same large buffers (zstd's outputs, decoded
  base planes, 8 MiB each) are allocated piece after piece on several threads, and glibc's
  defaults give them back to the system when freed (a large block is its own mapping; a
  thread's heap is trimmed when its free top grows), so each new one faults its pages in
  again: about 130,000 page faults and 0.1-0.25 s of system time for a 768 MiB ingest in this
  VM (``scripts/bench_ingest.py --storage``), 25,000 with :func:`keep_freed_buffers`."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit
_KEPT_FREE_BYTES = 256 * 1024 * 1024


def bound_heap(largest_tensor: int) -> None:
    """Fix glibc's mmap threshold just above the largest tensor of this resolution.

    Tensors up to that size (the inputs' temporaries, which repeat tensor after tensor) are
    then reused from the heap without page faults, larger blocks get their own mmap, and
    setting the threshold also stops glibc's dynamic adjustment, which otherwise raises the
    trim threshold with it and keeps freed blocks around: measured on the 100M-parameter
    benchmark, ties resolved in 3.0 s at 381 MB peak RSS, against 4.1 s at 360 MB with a
    4 MiB threshold and 5.0 s at 500 MB with glibc's defaults.  A no-op where the C library
    is not glibc.

    One arena for every thread: strategies run contributions side by side on worker threads,
    and per-thread arenas would each keep their own freed tensors (measured: +15-40 MB of peak
    RSS on that benchmark)."""
    threshold = int(os.environ.get("CRDT_MMAP_THRESHOLD", 0)) or min(
        largest_tensor + (1 << 20), _MMAP_THRESHOLD_MAX
    )
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        libc.mallopt(_M_ARENA_MAX, 1)


def release_free_heap() -> None:
    """Give the pages of freed heap blocks back to the system (glibc ``malloc_trim``), between
    tensors: temporaries of many sizes leave holes that would otherwise stay resident
    (measured: 6 MiB less peak RSS for ties on the 100M-parameter benchmark, under 1 ms)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_buffers() -> bool:
    """Keep freed blocks of up to 32 MiB for reuse, and up to 256 MiB of free memory per heap
    (all of it goes back to the system when the process exits).  True when glibc took it."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        and libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE_BYTES)
    )


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """glibc, for ``mallopt`` and ``malloc_trim``; None where the C library is another."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc
