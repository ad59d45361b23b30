"""Layer 1: the content-addressed object store under ``.crdt/objects/``.

Objects (tensor chunks, contribution descriptors, auxiliary files) are named by the blake3 hash
of their bytes and live in the commit tree at ``.crdt/objects/<2 hex>/<62 hex>``, as ordinary git
blobs, so clone, fetch and push carry them.  They are staged with skip-worktree and excluded by
the sparse-checkout pattern, so they never appear in the working tree.  Identical bytes are
stored once, whatever contribution they belong to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from . import gitops
from .errors import StoreError, UsageError

OBJECTS_DIR = ".crdt/objects"
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
# The largest object git-crdt writes (ingest) or accepts (verify): a sane bound on memory.
MAX_OBJECT_BYTES = 1024**3


def object_path(object_id: str) -> str:
    return f"{OBJECTS_DIR}/{object_id[:2]}/{object_id[2:]}"


def object_id_of_path(path: str) -> str | None:
    parts = path.split("/")
    if len(parts) == 4 and "/".join(parts[:2]) == OBJECTS_DIR:
        return parts[2] + parts[3]
    return None


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

    def __init__(self, root: Path, *, rev: str | None = None, workers: int = 2) -> None:
        self.root = root
        self.rev = rev
        self.objects_dir = gitops.common_dir(root) / "objects"
        self.workers = workers
        self._known: dict[str, str] | None = None
        self._pending: dict[str, str] = {}
        self._touched: set[str] = set()  # already-staged ids a writer used again
        self._lock = threading.Lock()
        self._reader: gitops.BlobReader | None = None

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

    # -- writing -----------------------------------------------------------------------------
    def _put_one(self, data: bytes | memoryview, object_id: str | None = None) -> tuple[str, bool]:
        if object_id is None:
            object_id = blake3.blake3(data).hexdigest()
        if self.has(object_id):
            with self._lock:
                self._touched.add(object_id)
            return object_id, False
        sha = gitops.write_loose_blob(self.objects_dir, data)
        with self._lock:
            self._pending[object_id] = sha
        return object_id, True

    def put(self, data: bytes | memoryview) -> str:
        """Store one object; return its blake3 id."""
        return self._put_one(data)[0]

    def put_chunks(
        self, chunks: Sequence[memoryview], progress: Callable[[int, bool], None] | None = None
    ) -> list[str]:
        """Store many objects in parallel (hashing and writing release the GIL)."""

        def work(chunk: memoryview) -> str:
            oid, new = self._put_one(chunk)
            if progress is not None:
                progress(len(chunk), new)
            return oid

        if len(chunks) <= 1 or self.workers <= 1:
            return [work(c) for c in chunks]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(work, chunks))

    def pending(self) -> dict[str, str]:
        return dict(self._pending)

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
    def size(self, object_id: str) -> int | None:
        """The object's size in bytes without reading it (None: not stored)."""
        sha = self.sha_of(object_id)
        if sha is None:
            return None
        try:
            loose = gitops.loose_blob_size(self.objects_dir, sha)
        except gitops.GitError:
            return None
        return loose if loose is not None else gitops.object_sizes(self.root, [sha])[sha]

    def get(self, object_id: str, *, verify: bool = False) -> bytes:
        sha = self.sha_of(object_id)
        if sha is None:
            where = self.rev or "the index"
            raise StoreError(f"object {object_id[:16]} is missing from {where}")
        if self._reader is None:
            self._reader = gitops.BlobReader(self.root)
        try:
            data = self._reader.read(sha)
        except Exception as exc:
            raise StoreError(f"object {object_id[:16]} cannot be read: {exc}") from None
        if verify and blake3.blake3(data).hexdigest() != object_id:
            raise StoreError(f"object {object_id[:16]} does not match its blake3 hash")
        return data

    def read_into(self, object_ids: Sequence[str], dest: memoryview) -> None:
        """Fill ``dest`` with the concatenation of the objects (a tensor's chunks)."""
        if self._reader is None:
            self._reader = gitops.BlobReader(self.root)
        pos = 0
        for oid in object_ids:
            sha = self.sha_of(oid)
            if sha is None:
                where = self.rev or "the index"
                raise StoreError(f"object {oid[:16]} is missing from {where}")
            size = gitops.loose_blob_size(self._reader.objects_dir, sha)
            if size is None:
                data = self.get(oid)
                size = len(data)
                if pos + size > len(dest):
                    raise StoreError(f"object {oid[:16]} is larger than its tensor")
                dest[pos : pos + size] = data
            else:
                if pos + size > len(dest):
                    raise StoreError(f"object {oid[:16]} is larger than its tensor")
                try:
                    self._reader.read_into(sha, dest[pos : pos + size])
                except Exception as exc:
                    raise StoreError(f"object {oid[:16]} cannot be read: {exc}") from None
            pos += size
        if pos != len(dest):
            raise StoreError(f"tensor data has {pos} bytes, expected {len(dest)}")
