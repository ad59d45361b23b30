"""Layer 1: chunks kept as Git LFS objects (the ``lfs`` storage mode, docs/format.md).

The repository's storage mode is the one line of ``.crdt/storage`` (``git`` or ``lfs``; absent
means ``git``), committed so that every clone agrees.  In ``lfs`` mode the git blob at a
chunk's path ``.crdt/objects/<2 hex>/<62 hex>`` is a Git LFS pointer (spec v1: ``version``,
``oid sha256:<64 hex>``, ``size <n>``) and the chunk's bytes are an LFS object in git-lfs's
own store, ``<lfs dir>/objects/<sha256[:2]>/<sha256[2:4]>/<sha256>``, which git-lfs's pre-push
hook uploads and ``git lfs fetch`` downloads.  The chunk is still named by the blake3 of its
bytes: manifest, descriptors and ids do not depend on the mode.

Pointers come from a pull: they are parsed by a bounded strict parser (the canonical form
only), and an LFS object is read bounded (its size must be the pointer's) and then checked
against the chunk's blake3 name by the store, like any other chunk.  No git process here.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import atomic, bounded
from ..errors import InputError, ManifestError, StoreError
from ..git import commands as gitops

STORAGE_PATH = ".crdt/storage"
MODES = ("git", "lfs")
DEFAULT_MODE = "git"
POINTER_VERSION = b"version https://git-lfs.github.com/spec/v1\n"
# A canonical pointer without extensions is at most 43 + 76 + 25 bytes; git-lfs itself scans
# blobs under 1024 bytes for pointers.
MAX_POINTER_BYTES = 200
# A model file whose slices are chunks is never read whole: a shard of up to this size.
MAX_SLICED_FILE_BYTES = 1024**4
_POINTER_RE = re.compile(
    rb"version https://git-lfs\.github\.com/spec/v1\n"
    rb"oid sha256:([0-9a-f]{64})\n"
    rb"size (0|[1-9][0-9]{0,18})\n\Z"
)


@dataclass(frozen=True)
class Pointer:
    """A Git LFS pointer: the object's sha256 and size."""

    oid: str
    size: int

    def encode(self) -> bytes:
        return b"%soid sha256:%s\nsize %d\n" % (POINTER_VERSION, self.oid.encode(), self.size)


def parse_pointer(data: bytes | memoryview) -> Pointer | None:
    """The pointer ``data`` is, in its canonical form only, or None (not a pointer).  Bounded:
    anything longer than a pointer can be is not one."""
    if len(data) > MAX_POINTER_BYTES:
        return None
    m = _POINTER_RE.match(bytes(data))
    if m is None:
        return None
    return Pointer(m.group(1).decode(), int(m.group(2)))


SLICE_VERSION = b"git-crdt lfs-slice v1\n"
_SLICE_RE = re.compile(
    rb"git-crdt lfs-slice v1\n"
    rb"object ([0-9a-f]{64})\n"
    rb"offset (0|[1-9][0-9]{0,18})\n"
    rb"size (0|[1-9][0-9]{0,18})\n\Z"
)


@dataclass(frozen=True)
class Slice:
    """A chunk kept as a byte range of another object of the store (a model file that is
    already an LFS object here): ``object`` (its blake3 name), ``offset``, ``size``."""

    object: str
    offset: int
    size: int

    def encode(self) -> bytes:
        return b"%sobject %s\noffset %d\nsize %d\n" % (
            SLICE_VERSION,
            self.object.encode(),
            self.offset,
            self.size,
        )


def parse_slice(data: bytes | memoryview) -> Slice | None:
    """The slice ``data`` is (canonical form only), or None.  Bounded like a pointer."""
    if len(data) > MAX_POINTER_BYTES:
        return None
    m = _SLICE_RE.match(bytes(data))
    if m is None:
        return None
    return Slice(m.group(1).decode(), int(m.group(2)), int(m.group(3)))


def find_object(media: Path, size: int) -> list[Path]:
    """The LFS objects here of exactly ``size`` bytes (candidates for a file's bytes)."""
    objects = media / "objects"
    if not objects.is_dir():
        return []
    found = []
    for p in objects.glob("??/??/*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == size and len(p.name) == 64:
            found.append(p)
    return found


def is_pointer_file(path: Path) -> bool:
    """Whether the file at ``path`` is an LFS pointer (a model that ``git lfs pull`` has not
    fetched yet): its first bytes are a pointer's version line and it is small."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024 + 1)
    except OSError:
        return False
    return head.startswith(POINTER_VERSION) and len(head) <= 1024


# -- the storage mode ------------------------------------------------------------------------
def read_mode(root: Path) -> str:
    """The repository's storage mode from the work tree's ``.crdt/storage`` (``git`` if absent).
    A committed file is hostile: read bounded, never through a symbolic link, and only the two
    known words are accepted."""
    try:
        data = bounded.read_regular(root / STORAGE_PATH, 64, STORAGE_PATH, ManifestError)
    except FileNotFoundError:
        return DEFAULT_MODE
    return parse_mode(data, STORAGE_PATH)


def parse_mode(data: bytes, source: str) -> str:
    word = data.decode("ascii", errors="replace").strip()
    if word not in MODES:
        raise ManifestError(f"{source}: unknown storage mode {word[:20]!r} (git or lfs)")
    return word


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"storage mode must be 'git' or 'lfs', not {mode!r}")
    return mode


# -- the LFS object store --------------------------------------------------------------------
def media_dir(root: Path) -> Path:
    """git-lfs's storage folder of this repository: ``lfs.storage`` if set (relative to the
    common git dir), else ``<common git dir>/lfs``, shared by every worktree as git-lfs does."""
    common = gitops.common_dir(root)
    configured = gitops.config_get(root, "lfs.storage")
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_absolute() else common / path
    return common / "lfs"


def object_file(media: Path, sha256: str) -> Path:
    return media / "objects" / sha256[:2] / sha256[2:4] / sha256


def write_object(media: Path, data: bytes | memoryview, pointer: Pointer) -> bool:
    """Write ``data`` as the LFS object ``pointer`` names unless it is there (same sha256: the
    same bytes, stored once); atomic (a temporary file in git-lfs's ``tmp`` folder, renamed).
    Returns True if written."""
    path = object_file(media, pointer.oid)
    if has_object(media, pointer):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = media / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with atomic.readonly_file(path, tmp_dir, "crdt-", "lfs:tmp-written") as fd:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done : done + (1 << 30)])
    return True


def has_object(media: Path, pointer: Pointer) -> bool:
    """Whether the LFS object is here, as a regular file of the pointer's size."""
    try:
        st = os.lstat(object_file(media, pointer.oid))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == pointer.size


def read_object_into(
    media: Path, pointer: Pointer, dest: memoryview, what: str, offset: int = 0
) -> None:
    """Fill ``dest`` from the LFS object at ``offset`` (the whole object by default): a
    regular file, never followed through a link, whose size must be the pointer's; the caller
    checks the bytes against the chunk's blake3 name."""
    if offset < 0 or offset + len(dest) > pointer.size:
        raise StoreError(
            f"{what}: bytes {offset}..{offset + len(dest)} lie outside the LFS object's "
            f"{pointer.size}"
        )
    path = object_file(media, pointer.oid)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise StoreError(
            f"{what} is in Git LFS (sha256 {pointer.oid[:16]}) and not fetched here: run "
            "'git crdt verify --fetch' or 'git lfs fetch'"
        ) from None
    except OSError as exc:
        raise StoreError(f"{what}: LFS object cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != pointer.size:
            raise StoreError(
                f"{what}: LFS object {pointer.oid[:16]} has {st.st_size} bytes, its pointer "
                f"says {pointer.size} (corrupt: run 'git lfs fsck')"
            )
        pos = 0
        while pos < len(dest):
            n = os.preadv(fd, [dest[pos:]], offset + pos)
            if not n:
                raise StoreError(f"{what}: LFS object {pointer.oid[:16]} is truncated")
            pos += n
    finally:
        os.close(fd)
