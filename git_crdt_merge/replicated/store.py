"""Layer 1: the content-addressed object store under ``.crdt/objects/``.

Objects (tensor chunks, contribution descriptors, auxiliary files) are named by the blake3 hash
of their bytes and live in the commit tree at ``.crdt/objects/<2 hex>/<62 hex>``, as ordinary git
blobs, so clone, fetch and push carry them.  They are staged with skip-worktree and excluded by
the sparse-checkout pattern, so they never appear in the working tree.  Identical bytes are
stored once, whatever contribution they belong to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from ..errors import GitError, StoreError, UsageError
from ..git import commands as gitops
from ..git import objects as gitobjects

OBJECTS_DIR = ".crdt/objects"
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
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
        self._db: gitobjects.ObjectDB | None = None
        self._promisor: str | None = None

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
            return self.db.blob_size(sha)
        except GitError as exc:
            raise StoreError(f"object {object_id[:16]} cannot be read: {exc}") from None

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
            sha = self._sha_or_raise(oid)
            try:
                size = self.db.blob_size(sha)
                if size is None:
                    raise GitError("it is not in the object database")
                if pos + size > len(dest):
                    raise StoreError(f"object {oid[:16]} is larger than its tensor")
                part = dest[pos : pos + size]
                self.db.read_into(sha, part)
            except GitError as exc:
                raise StoreError(f"object {oid[:16]} cannot be read: {exc}") from None
            threads = blake3.blake3.AUTO if size >= _PARALLEL_HASH_BYTES else 1
            if blake3.blake3(part, max_threads=threads).hexdigest() != oid:
                raise StoreError(
                    f"object {oid[:16]} does not match its blake3 hash (corrupt or substituted; "
                    "run 'git crdt verify --full')"
                )
            pos += size
        if pos != len(dest):
            raise StoreError(f"tensor data has {pos} bytes, expected {len(dest)}")
