"""Atomic writes of read-only files: a temporary file beside the destination, renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import faults


@contextmanager
def readonly_file(dest: Path, tmp_dir: Path, prefix: str, fault: str) -> Iterator[int]:
    """Yield the descriptor of a new temporary file in ``tmp_dir`` (same file system as
    ``dest``); when the block ends without an error the file is closed, made read-only and
    renamed to ``dest``, so a crash leaves either nothing or the whole file; on an error it is
    removed.  ``fault`` names the kill point between the write and the rename (tests)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=tmp_dir)
    try:
        yield fd
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o444)
        faults.point(fault)
        os.replace(tmp, dest)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
