"""The process heap: keep freed buffers for reuse instead of giving them back to the system.

An ingest allocates the same large buffers (zstd's 8 MiB outputs, decoded base planes) piece
after piece on several threads.  glibc returns such buffers to the system when they are freed
(a large one is its own mapping; a thread's heap is trimmed when its free top grows), so each
new one faults its pages in again: about 130,000 page faults, and 0.1-0.25 s of system time,
for a 768 MiB ingest in this VM (``scripts/bench_ingest.py --storage``).  With fixed
thresholds the freed buffers are reused; the process keeps at most ``trim`` bytes of free
memory per heap, and gives it all back when it exits.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest on 64-bit: 8 MiB pieces stay in the heap
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Make this process's allocator keep freed buffers of up to 32 MiB for reuse (glibc on
    Linux; elsewhere nothing changes).  True when the allocator took the setting."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
