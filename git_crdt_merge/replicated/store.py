"""Layer 1: the content-addressed object store under ``.crdt/objects/``.

Objects (tensor chunks, contribution descriptors, auxiliary files) are named by the blake3 hash
of their bytes and live in the commit tree at ``.crdt/objects/<2 hex>/<62 hex>``, as ordinary git
blobs, so clone, fetch and push carry them.  They are staged with skip-worktree and excluded by
the sparse-checkout pattern, so they never appear in the working tree.  Identical bytes are
stored once, whatever contribution they belong to.

Where a chunk's bytes live is the repository's storage mode (:mod:`.lfs`): in ``git`` mode
the blob is the chunk; in ``lfs`` mode the blob is a Git LFS pointer and the bytes are an LFS
object.  Writers use the mode of ``.crdt/storage``; readers look at each object (a blob whose
blake3 is its name is the chunk itself, else it must be a canonical pointer), so a repository
that switched modes reads both kinds.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..errors import GitError, StoreError, UsageError
from ..git import commands as gitops
from ..git import objects as gitobjects
from . import lfs

OBJECTS_DIR = ".crdt/objects"
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
# threads that hash, encode and write chunks (zstd, numpy, blake3 and file I/O release the GIL)
WORKERS = min(8, os.cpu_count() or 1)
# The largest object git-crdt writes (ingest) or accepts (verify): a sane bound on memory.
MAX_OBJECT_BYTES = 1024**3
# Below this, one blake3 thread beats spinning up the pool.
_PARALLEL_HASH_BYTES = 1 << 20


def object_path(object_id: str) -> str:
    return f"{OBJECTS_DIR}/{object_id[:2]}/{object_id[2:]}"


def object_id_of_path(path: str) -> str | None:
    parts = path.split("/")
    if len(parts) == 4 and "/".join(parts[:2]) == OBJECTS_DIR:
        return parts[2] + parts[3]
    return None


@dataclass(frozen=True)
class LfsLocation:
    """Where a chunk kept in Git LFS is: ``size`` bytes at ``offset`` of the LFS object
    ``pointer`` names, whose pointer blob is the object ``holder`` (the chunk itself, or the
    model file it is a slice of)."""

    pointer: lfs.Pointer
    offset: int
    size: int
    holder: str


def split_chunks(data: memoryview, chunk_size: int) -> list[memoryview]:
    if chunk_size < 1:
        raise UsageError(f"chunk size must be at least 1 byte, not {chunk_size}")
    if chunk_size > MAX_OBJECT_BYTES:
        raise UsageError(f"chunk size must be at most {MAX_OBJECT_BYTES} bytes, not {chunk_size}")
    if len(data) == 0:
        return [data]
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


class ObjectStore:
    """Writes objects as loose git blobs and stages them; reads them back by blake3 id.

    ``rev`` selects where ids are looked up when reading: the index (None) or a revision.
    """

    def __init__(self, root: Path, *, rev: str | None = None, workers: int = WORKERS) -> None:
        self.root = root
        self.rev = rev
        self.objects_dir = gitops.common_dir(root) / "objects"
        self.workers = workers
        self._known: dict[str, str] | None = None
        self._pending: dict[str, str] = {}
        self._touched: set[str] = set()  # already-staged ids a writer used again
        self._lock = threading.Lock()
        self._db: gitobjects.ObjectDB | None = None
        self._promisor: str | None = None
        self._mode: str | None = None
        self._media: Path | None = None
        self._pointers: dict[str, LfsLocation | None] = {}  # object id -> where in LFS

    # -- lookup ------------------------------------------------------------------------------
    def known(self) -> dict[str, str]:
        """object id -> git SHA-1 of the stored objects (index or ``rev``)."""
        if self._known is None:
            if self.rev is None:
                entries = gitops.index_entries(self.root, OBJECTS_DIR)
            else:
                entries = gitops.tree_entries(self.root, self.rev, OBJECTS_DIR)
            self._known = {}
            for path, sha in entries.items():
                oid = object_id_of_path(path)
                if oid is not None:
                    self._known[oid] = sha
        return self._known

    def sha_of(self, object_id: str) -> str | None:
        with self._lock:
            return self._pending.get(object_id) or self.known().get(object_id)

    def has(self, object_id: str) -> bool:
        return self.sha_of(object_id) is not None

    # -- storage mode ------------------------------------------------------------------------
    @property
    def storage_mode(self) -> str:
        """Where new chunks go: ``git`` or ``lfs`` (``.crdt/storage`` of the work tree)."""
        if self._mode is None:
            self._mode = lfs.read_mode(self.root)
        return self._mode

    @property
    def media(self) -> Path:
        """git-lfs's storage folder (``.git/lfs``)."""
        if self._media is None:
            self._media = lfs.media_dir(self.root)
        return self._media

    # -- writing -----------------------------------------------------------------------------
    def _put_one(
        self,
        data: bytes | memoryview,
        object_id: str | None = None,
        *,
        chunk: bool = False,
        origin: tuple[str, int] | None = None,
    ) -> tuple[str, bool]:
        sha256 = None
        if chunk and origin is None and object_id is None and self.storage_mode == "lfs":
            object_id, sha256 = _blake3_and_sha256(data)
        if object_id is None:
            object_id = blake3.blake3(data).hexdigest()
        if self.has(object_id):
            with self._lock:
                self._touched.add(object_id)
            return object_id, False
        if origin is not None and chunk and self.storage_mode == "lfs":
            # the bytes are already an LFS object (a model file): the blob names the range
            piece = lfs.Slice(origin[0], origin[1], len(data))
            sha = gitops.write_loose_blob(self.objects_dir, piece.encode())
            with self._lock:
                self._pointers.pop(object_id, None)
        elif sha256 is not None:
            # the chunk's bytes become an LFS object; the blob staged at its path is the pointer
            pointer = lfs.Pointer(sha256, len(data))
            lfs.write_object(self.media, data, pointer)
            sha = gitops.write_loose_blob(self.objects_dir, pointer.encode())
            with self._lock:
                self._pointers[object_id] = LfsLocation(pointer, 0, pointer.size, object_id)
        else:
            sha = gitops.write_loose_blob(self.objects_dir, data)
        with self._lock:
            self._pending[object_id] = sha
        return object_id, True

    def put(self, data: bytes | memoryview) -> str:
        """Store one object; return its blake3 id."""
        return self._put_one(data)[0]

    def put_chunks(
        self,
        chunks: Sequence[memoryview],
        progress: Callable[[int, bool], None] | None = None,
        origins: Sequence[tuple[str, int] | None] | None = None,
    ) -> list[str]:
        """Store many objects in parallel (hashing and writing release the GIL).

        ``origins`` (lfs mode): for each chunk, (the id of an object from
        :meth:`adopt_lfs_file`, the chunk's offset in it) where the chunk is that file's bytes
        as they are, else None; such a chunk is stored as a slice, not a second copy."""
        where = list(origins) if origins is not None else [None] * len(chunks)

        def work(i: int) -> str:
            oid, new = self._put_one(chunks[i], chunk=True, origin=where[i])
            if progress is not None:
                progress(len(chunks[i]), new)
            return oid

        if len(chunks) <= 1 or self.workers <= 1:
            return [work(i) for i in range(len(chunks))]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(work, range(len(chunks))))

    def adopt_lfs_file(self, path: Path) -> str | None:
        """In lfs mode, a model file whose bytes are already an LFS object here (the user's
        ``git lfs track``ed model, fetched): stage that object's pointer as an object of ours
        (named by the file's blake3) and return its id, so that chunks can be slices of it;
        None otherwise.  Costs one pass over the file (sha256 and blake3 together), and only
        when the LFS store holds an object of the file's exact size."""
        if self.storage_mode != "lfs":
            return None
        try:
            size = path.stat().st_size
        except OSError:
            return None
        if size == 0 or not lfs.find_object(self.media, size):
            return None
        with open(path, "rb") as fh:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    holder, sha256 = _blake3_and_sha256(view)
                finally:
                    view.release()
        pointer = lfs.Pointer(sha256, size)
        if not lfs.has_object(self.media, pointer):
            return None  # another object of the same size
        if not self.has(holder):
            sha = gitops.write_loose_blob(self.objects_dir, pointer.encode())
            with self._lock:
                self._pending[holder] = sha
        with self._lock:
            self._touched.add(holder)
            self._pointers[holder] = LfsLocation(pointer, 0, size, holder)
        return holder

    def pending(self) -> dict[str, str]:
        return dict(self._pending)

    def touch(self, object_ids: Iterable[str]) -> None:
        """Mark already-staged objects as used again: the next :meth:`flush` gives them
        skip-worktree back if they lost it."""
        with self._lock:
            self._touched.update(object_ids)

    def flush(self, env: dict[str, str] | None = None) -> int:
        """Stage every object written since the last flush (skip-worktree); return the count.

        Objects that were already staged and used again get skip-worktree too, so a re-run
        repairs an index where an interrupted writer staged them without it.  ``env``: the
        environment of an :func:`gitops.index_transaction`."""
        with self._lock:
            items = sorted(self._pending.items())
            self._pending.clear()
            touched = sorted(self._touched - {oid for oid, _ in items})
            self._touched.clear()
        known_now = self.known()
        gitops.stage_blobs(
            self.root,
            [(object_path(oid), sha) for oid, sha in items],
            skip_worktree=True,
            also_skip=[object_path(oid) for oid in touched if oid in known_now],
            env=env,
        )
        known = self.known()
        known.update(items)
        return len(items)

    # -- reading -----------------------------------------------------------------------------
    @property
    def db(self) -> gitobjects.ObjectDB:
        if self._db is None:
            self._db = gitobjects.ObjectDB(self.objects_dir, root=self.root)
        return self._db

    def _sha_or_raise(self, object_id: str) -> str:
        sha = self.sha_of(object_id)
        if sha is None:
            where = self.rev or "the index"
            raise StoreError(f"object {object_id[:16]} is missing from {where}")
        return sha

    def size(self, object_id: str) -> int | None:
        """The object's size in bytes from its git header (None: not stored, or not present
        in the object database)."""
        sha = self.sha_of(object_id)
        if sha is None:
            return None
        try:
            size = self.db.blob_size(sha)
        except GitError as exc:
            raise StoreError(f"object {object_id[:16]} cannot be read: {exc}") from None
        where = self.pointer_of(object_id)
        return where.size if where is not None else size

    def pointer_of(self, object_id: str) -> LfsLocation | None:
        """Where in Git LFS the object's bytes are (None: its blob holds the bytes themselves,
        or is not here).  A blob whose blake3 is its name is the chunk, whatever it looks like;
        any other blob small enough counts only as a canonical LFS pointer, or as a slice of
        another object that is one (a model file that was already an LFS object)."""
        with self._lock:
            if object_id in self._pointers:
                return self._pointers[object_id]
        found = None
        blob = self._small_blob(object_id)
        if blob is not None and blake3.blake3(blob).hexdigest() != object_id:
            pointer = lfs.parse_pointer(blob)
            piece = lfs.parse_slice(blob) if pointer is None else None
            if pointer is not None:
                found = LfsLocation(pointer, 0, pointer.size, object_id)
            elif piece is not None and piece.object != object_id:
                parent = self._small_blob(piece.object)
                holder = lfs.parse_pointer(parent) if parent is not None else None
                if holder is None:
                    raise StoreError(
                        f"object {object_id[:16]} is a slice of {piece.object[:16]}, which is "
                        "not an LFS pointer here"
                    )
                if piece.offset + piece.size > holder.size:
                    raise StoreError(
                        f"object {object_id[:16]}: its slice lies outside {piece.object[:16]}"
                    )
                found = LfsLocation(holder, piece.offset, piece.size, piece.object)
            # a chunk is at most MAX_OBJECT_BYTES; a model file it is a slice of is only ever
            # read through its slices (or bounded by the reader's limit)
            if found is not None and (
                found.pointer.size > lfs.MAX_SLICED_FILE_BYTES
                or (piece is not None and found.size > MAX_OBJECT_BYTES)
            ):
                raise StoreError(
                    f"object {object_id[:16]}: its LFS pointer claims {found.size} bytes"
                )
        with self._lock:
            self._pointers[object_id] = found
        return found

    def _small_blob(self, object_id: str) -> bytes | None:
        """The object's git blob if it is small enough to be a pointer or a slice, else None."""
        sha = self.sha_of(object_id)
        if sha is None:
            return None
        try:
            size = self.db.blob_size(sha)
            if size is None or size > lfs.MAX_POINTER_BYTES:
                return None
            return self.db.read(sha, max_size=lfs.MAX_POINTER_BYTES)
        except GitError:
            return None  # reading the object reports it

    def slice_holders(self, object_ids: Iterable[str]) -> set[str]:
        """The objects that hold the listed chunks kept as slices (whole model files)."""
        out = set()
        for oid in object_ids:
            where = self.pointer_of(oid)
            if where is not None and where.holder != oid:
                out.add(where.holder)
        return out

    def lfs_absent(self, object_ids: Iterable[str]) -> list[str]:
        """The ids stored as LFS pointers whose LFS object this clone does not hold, sorted."""
        out = []
        for oid in sorted(set(object_ids)):
            where = self.pointer_of(oid)
            if where is not None and not lfs.has_object(self.media, where.pointer):
                out.append(oid)
        return out

    def fetch_lfs(self, object_ids: Iterable[str]) -> int:
        """Download, in one ``git lfs fetch``, the LFS objects of the listed chunks that this
        clone lacks (from the revision the store reads, or HEAD); returns how many."""
        ids = self.lfs_absent(object_ids)
        if not ids:
            return 0
        holders = sorted({where.holder for i in ids if (where := self.pointer_of(i)) is not None})
        gitops.lfs_fetch_paths(self.root, self.rev or "HEAD", [object_path(h) for h in holders])
        still = self.lfs_absent(ids)
        if still:
            raise StoreError(
                f"{len(still)} chunks (first {still[0][:16]}) are in Git LFS and the LFS "
                "server did not send them (is the remote's LFS storage complete? "
                "'git lfs fetch' says more)"
            )
        return len(ids)

    def absent(self, object_ids: Iterable[str]) -> list[str]:
        """The ids that are staged or committed but whose bytes this clone does not hold (a
        partial clone has not fetched them yet), sorted."""
        out = []
        for oid in sorted(set(object_ids)):
            sha = self.sha_of(oid)
            if sha is not None and self.db.entry(sha) is None:
                out.append(oid)
        return out

    @property
    def partial(self) -> bool:
        """Whether this is a partial clone (objects may be absent until fetched)."""
        if self._promisor is None:
            self._promisor = gitops.promisor_remote(self.root) or ""
        return bool(self._promisor)

    def fetch_absent(self, object_ids: Iterable[str]) -> int:
        """Fetch, in one batch from the promisor remote, every listed object this partial
        clone lacks; returns how many were fetched (0 outside a partial clone)."""
        if not self.partial:
            return 0  # a full clone: reading reports a missing object
        ids = self.absent(object_ids)
        if not ids:
            return 0
        remote = self._promisor or ""
        gitops.fetch_objects(self.root, remote, [self.sha_of(i) or "" for i in ids])
        still = self.absent(ids)
        if still:
            raise StoreError(
                f"{len(still)} objects (first {still[0][:16]}) are missing here and the "
                f"promisor remote {remote!r} did not send them"
            )
        return len(ids)

    def get(self, object_id: str, *, verify: bool = True, max_size: int | None = None) -> bytes:
        """The object's bytes, checked against its blake3 name unless ``verify=False``;
        ``max_size`` refuses a larger object before reading it."""
        sha = self._sha_or_raise(object_id)
        where = self.pointer_of(object_id)
        if where is not None:
            limit = MAX_OBJECT_BYTES if max_size is None else max_size
            if where.size > limit:
                raise StoreError(f"object {object_id[:16]} is larger than {limit} bytes")
            buf = bytearray(where.size)
            self.read_chunk_into(object_id, memoryview(buf))
            data = bytes(buf)
        else:
            try:
                data = self.db.read(sha, max_size=max_size)
            except GitError as exc:
                raise StoreError(f"object {object_id[:16]} cannot be read: {exc}") from None
        if verify and blake3.blake3(data).hexdigest() != object_id:
            raise StoreError(f"object {object_id[:16]} does not match its blake3 hash")
        return data

    def read_into(self, object_ids: Sequence[str], dest: memoryview) -> None:
        """Fill ``dest`` with the concatenation of the objects (a tensor's chunks), each read
        straight from its loose file or pack entry and checked against its blake3 name before
        the caller sees it: bytes from a pull feed nothing until they are verified."""
        pos = 0
        for oid in object_ids:
            size = self.size(oid)
            if size is None:
                self._sha_or_raise(oid)
                raise StoreError(
                    f"object {oid[:16]} cannot be read: it is not in the object database"
                )
            if pos + size > len(dest):
                raise StoreError(f"object {oid[:16]} is larger than its tensor")
            part = dest[pos : pos + size]
            self.read_chunk_into(oid, part)
            threads = blake3.blake3.AUTO if size >= _PARALLEL_HASH_BYTES else 1
            if blake3.blake3(part, max_threads=threads).hexdigest() != oid:
                raise StoreError(
                    f"object {oid[:16]} does not match its blake3 hash (corrupt or substituted; "
                    "run 'git crdt verify --full')"
                )
            pos += size
        if pos != len(dest):
            raise StoreError(f"tensor data has {pos} bytes, expected {len(dest)}")

    def read_chunk_into(self, object_id: str, dest: memoryview) -> None:
        """Fill ``dest`` (the object's size) with its bytes, from its git blob or its LFS object,
        unverified: the caller checks them against the blake3 name."""
        sha = self._sha_or_raise(object_id)
        where = self.pointer_of(object_id)
        if where is not None:
            if len(dest) != where.size:
                raise StoreError(f"object {object_id[:16]} has {where.size} bytes")
            what = f"object {object_id[:16]}"
            lfs.read_object_into(self.media, where.pointer, dest, what, where.offset)
            return
        try:
            self.db.read_into(sha, dest)
        except GitError as exc:
            raise StoreError(f"object {object_id[:16]} cannot be read: {exc}") from None


_HASH_BLOCK = 1 << 20


def _blake3_and_sha256(data: bytes | memoryview) -> tuple[str, str]:
    """(blake3, sha256) of ``data`` in one pass: each block is hashed by both while it is in
    the cache (an LFS chunk needs its sha256 name beside its blake3 one)."""
    view = memoryview(data).cast("B")
    b3, s2 = blake3.blake3(), hashlib.sha256()
    for i in range(0, len(view), _HASH_BLOCK):
        block = view[i : i + _HASH_BLOCK]
        b3.update(block)
        s2.update(block)
    return b3.hexdigest(), s2.hexdigest()
