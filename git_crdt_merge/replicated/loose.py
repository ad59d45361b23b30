"""An object store over model files in memory, for a merge outside any repository.

``git crdt merge RECIPE.yml -o OUT`` describes loose models with the same descriptors as
``add-contribution`` (the same chunking, the same blake3 names, so the same ids and Merkle
root), but keeps each chunk as a view of the memory-mapped file it came from instead of
writing it to git: the engine then reads the same bytes through the same interface."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import blake3

from ..errors import StoreError
from .store import _PARALLEL_HASH_BYTES, ObjectStore


class LooseStore(ObjectStore):
    """The object store interface over in-memory views: ``put`` keeps a view (no copy),
    every read serves it back.  Nothing is written anywhere."""

    def __init__(self) -> None:  # no repository: none of ObjectStore's git state
        self.root = Path(".")
        self.rev = None
        self.workers = 1
        self._mode = "git"
        self._objects: dict[str, memoryview] = {}

    def _put_one(
        self,
        data: bytes | memoryview,
        object_id: str | None = None,
        *,
        chunk: bool = False,
        origin: tuple[str, int] | None = None,
    ) -> tuple[str, bool]:
        view = memoryview(data).cast("B")
        if object_id is None:
            threads = blake3.blake3.AUTO if len(view) >= _PARALLEL_HASH_BYTES else 1
            object_id = blake3.blake3(view, max_threads=threads).hexdigest()
        new = object_id not in self._objects
        self._objects.setdefault(object_id, view)
        return object_id, new

    def put(self, data: bytes | memoryview) -> str:
        return self._put_one(data)[0]

    def adopt_lfs_file(self, path: Path) -> str | None:
        return None  # nothing is stored: there is no LFS object to reference

    def has(self, object_id: str) -> bool:
        return object_id in self._objects

    def size(self, object_id: str) -> int | None:
        view = self._objects.get(object_id)
        return None if view is None else len(view)

    def absent(self, object_ids: Iterable[str]) -> list[str]:
        return [o for o in object_ids if o not in self._objects]

    @property
    def partial(self) -> bool:
        return False

    def _view(self, object_id: str) -> memoryview:
        try:
            return self._objects[object_id]
        except KeyError:
            raise StoreError(f"object {object_id[:16]} is not in the loose models") from None

    def get(self, object_id: str, *, verify: bool = True, max_size: int | None = None) -> bytes:
        view = self._view(object_id)
        if max_size is not None and len(view) > max_size:
            raise StoreError(f"object {object_id[:16]} is larger than {max_size} bytes")
        return bytes(view)

    def read_into(self, object_ids: Sequence[str], dest: memoryview) -> None:
        pos = 0
        for oid in object_ids:
            view = self._view(oid)
            if pos + len(view) > len(dest):
                raise StoreError(f"object {oid[:16]} is larger than its tensor")
            dest[pos : pos + len(view)] = view
            pos += len(view)
        if pos != len(dest):
            raise StoreError(f"tensor data has {pos} bytes, expected {len(dest)}")
