"""The ingest's allocator setting: freed buffers are kept for reuse (Linux, glibc)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import numpy as np
from git_crdt_merge import heap
if sys.argv[1] == "keep":
    assert heap.keep_freed_buffers()
np.ones(8 << 20, dtype=np.uint8)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(1, 41):
    np.ones((8 << 20) + i * 4096, dtype=np.uint8)  # written, then freed
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True
    )
    return int(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_buffers_are_reused_without_page_faults() -> None:
    """40 buffers of 8 MiB (2,048 pages each), each a page larger than the one before:
    without the setting glibc maps each above its moving threshold afresh and faults all its
    pages in; with it the heap serves them all from the same memory, a page more each time."""
    default, kept = faults("default"), faults("keep")
    assert default > 40 * 250, default  # measured 21,460
    assert kept <= 40 * 4, kept  # measured 40: the one new page of each
    assert resource.getpagesize() == 4096  # the page count above assumes 4 KiB pages
