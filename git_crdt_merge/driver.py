"""The merge driver: ``git-crdt merge-driver %O %A %B %L %P``.

Git calls it when both sides changed ``.crdt/manifest`` (merge, rebase, cherry-pick, revert,
stash pop, ...).  It writes the join of both sides to ``%A`` and exits 0.  The join ignores the
ancestor ``%O`` and does not depend on which side is ours, so rebase and cherry-pick (which
swap the sides) and criss-cross merges all give the same bytes.

If a side is malformed it exits 1 with a one-line message and writes both sides, verbatim,
between conflict markers into ``%A``: git records a conflict and nothing is dropped
(``git crdt repair`` rebuilds the manifest from such a file).  Imports neither torch nor typer.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from . import faults, gitops
from .errors import CrdtError
from .manifest import Manifest, join

USAGE = "usage: git-crdt merge-driver ANCESTOR OURS THEIRS [MARKER_SIZE [PATH]]"


def merge_files(ours: Path, theirs: Path, label: str) -> bytes:
    """The canonical join of two manifest files; raises ManifestError naming the bad side."""
    a = Manifest.parse(ours.read_bytes(), f"{label} (ours)")
    b = Manifest.parse(theirs.read_bytes(), f"{label} (theirs)")
    return join(a, b).serialize()


def conflict_text(ours: bytes, theirs: bytes, marker_size: int) -> bytes:
    def block(data: bytes) -> bytes:
        return data if not data or data.endswith(b"\n") else data + b"\n"

    return (
        b"<" * marker_size
        + b" ours\n"
        + block(ours)
        + b"=" * marker_size
        + b"\n"
        + block(theirs)
        + b">" * marker_size
        + b" theirs\n"
    )


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` (git's %A) atomically.  The temporary file lives in ``.git/crdt/``, so a
    driver killed half-way leaves nothing in the work tree (the next git-crdt writer removes
    it); beside %A only when the two are on different file systems."""
    name = f"merge-driver-{os.getpid()}.tmp"
    try:
        state = gitops.common_dir(Path.cwd()) / "crdt"
        state.mkdir(exist_ok=True)
        tmp = state / name
    except (CrdtError, OSError):
        tmp = path.with_name(f"{path.name}.{name}")
    tmp.write_bytes(data)
    faults.point("driver:tmp-written")
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno != errno.EXDEV:
            raise
        tmp = path.with_name(f"{path.name}.{name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2 if len(argv) < 3 else 0
    ours, theirs = Path(argv[1]), Path(argv[2])
    marker_size = int(argv[3]) if len(argv) > 3 and argv[3].isdigit() else 7
    label = argv[4] if len(argv) > 4 else ".crdt/manifest"
    try:
        merged = merge_files(ours, theirs, label)
    except CrdtError as exc:
        print(f"git-crdt merge-driver: {exc}", file=sys.stderr)
        try:
            _write(ours, conflict_text(ours.read_bytes(), theirs.read_bytes(), marker_size))
        except OSError:
            pass
        return 1
    except OSError as exc:
        print(f"git-crdt merge-driver: {exc}", file=sys.stderr)
        return 2
    _write(ours, merged)
    return 0
