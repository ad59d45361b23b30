"""``git crdt diff --tensors``: how far apart two models are, tensor by tensor.

Each side is

1. a visible contribution of the work tree (name or id prefix), or ``base`` (the base register)
   when no contribution has that name;
2. a ``.safetensors`` file or a model folder on disk;
3. a revision: the merged model of its state (taken from the cache, or computed into it).

Statistics per tensor: L2 distance ‖a−b‖, cosine similarity ⟨a,b⟩/(‖a‖‖b‖), largest absolute
difference, and the fraction of elements that differ, all in float64.  Norms and dot products
use the exact reductions of :mod:`numerics`, so the numbers do not depend on thread count or
CPU; there is no Python loop over elements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import numerics
from ..errors import CrdtError, NotFoundError
from ..git import commands as gitops
from ..replicated import contributions, formats
from ..replicated.descriptor import Descriptor, TensorEntry
from ..replicated.encoding import read_tensor_into
from ..replicated.reader import read_descriptor
from ..replicated.repo import Repo
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH
from ..resolution import cache, resolve
from .diff import WORK_TREE, state_label

# -- models as tensor tables -----------------------------------------------------------------------
Loader = Callable[[], torch.Tensor]


@dataclass
class Model:
    label: str
    tensors: dict[str, tuple[str, list[int], Loader]]  # name -> (dtype, shape, load)


def _descriptor_model(label: str, store: ObjectStore, desc: Descriptor) -> Model:
    def loader(info: TensorEntry) -> Loader:
        def load() -> torch.Tensor:
            buf = bytearray(info.nbytes)
            if buf:
                read_tensor_into(store, info, memoryview(buf))
            dtype = NAME_TO_TORCH[info.dtype]
            if not buf:
                return torch.empty(list(info.shape), dtype=dtype)
            return torch.frombuffer(buf, dtype=dtype).reshape(list(info.shape))

        return load

    tensors = {
        name: (info.dtype, list(info.shape), loader(info)) for name, info in desc.tensors.items()
    }
    return Model(label, tensors)


def _file_model(label: str, path: Path) -> Model:
    source = formats.discover(path)
    tensors: dict[str, tuple[str, list[int], Loader]] = {}

    def loader(data: memoryview, dtype: str, shape: list[int]) -> Loader:
        def load() -> torch.Tensor:
            if not len(data):
                return torch.empty(shape, dtype=NAME_TO_TORCH[dtype])
            buf = bytearray(data)
            return torch.frombuffer(buf, dtype=NAME_TO_TORCH[dtype]).reshape(shape)

        return load

    for t in formats.iter_tensors(source):
        tensors[t.name] = (t.dtype, t.shape, loader(t.data, t.dtype, t.shape))
    return Model(label, tensors)


def resolved_folder(repo: Repo, rev: str | None) -> Path:
    """The cached merged model of the state at ``rev`` (computed into the cache if absent)."""
    manifest = repo.manifest_at(rev, known=True)
    if not manifest.visible_contributions():
        raise NotFoundError(f"{state_label(rev)} has no visible contributions: no merged model")
    settings = cache.Settings()  # the default numerics and shards: the hooks' result
    hit = cache.cached(
        repo, settings.key(manifest.merkle_root(), cache.strategy_revision(manifest))
    )
    if hit is not None:
        return hit
    store = ObjectStore(repo.root, rev=None if rev in (None, ":") else rev)
    return resolve.resolve_to_cache(repo, manifest, store, settings)


def open_model(repo: Repo, spec: str) -> Model:
    """A contribution (or ``base``), a path on disk, or a revision's merged model."""
    store = ObjectStore(repo.root)
    manifest = repo.read_manifest()
    try:
        cid = contributions.find_contribution(manifest, spec)
    except CrdtError:
        cid = None
    if cid is not None:
        name = dict(manifest.visible_contributions())[cid]
        desc = read_descriptor(store, manifest, cid)
        resolve.check_inputs(store, [desc])  # sizes from the chunks, before any buffer
        return _descriptor_model(f"{name} ({cid[:12]})", store, desc)
    if spec == "base" and manifest.base() is not None:
        base_id = manifest.base()
        assert base_id is not None
        desc = read_descriptor(store, manifest, base_id)
        resolve.check_inputs(store, [desc])
        return _descriptor_model(f"base ({base_id[:12]})", store, desc)
    path = Path(spec)
    if path.exists():
        return _file_model(str(path), path)
    if gitops.commit_of(repo.root, spec) is None:
        raise NotFoundError(
            f"{spec!r} is not a contribution, a file or folder, or a revision (see 'git crdt list')"
        )
    return _file_model(f"merged model of {spec}", resolved_folder(repo, spec))


def work_tree_model(repo: Repo) -> Model:
    return _file_model(f"merged model of the {WORK_TREE}", resolved_folder(repo, None))


# -- statistics ------------------------------------------------------------------------------
def tensor_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Distance statistics of two tensors of the same shape (float64, exact reductions)."""
    n = a.numel()
    if n == 0:
        return {
            "l2": 0.0,
            "cosine": None,
            "max_abs": 0.0,
            "changed": 0.0,
            "changed_elements": 0,
            "elements": 0,
        }
    a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
    d = a64 - b64
    na, nb = numerics.l2_norm(a64), numerics.l2_norm(b64)
    cos = numerics.dot(a64, b64) / (na * nb) if na > 0 and nb > 0 else None
    changed = int(torch.count_nonzero(a.reshape(-1) != b.reshape(-1)))
    return {
        "l2": numerics.l2_norm(d),
        "cosine": cos,
        "max_abs": float(d.abs().max()),
        "changed": changed / n,
        "changed_elements": changed,
        "elements": n,
    }


def _pairs(a: Model, b: Model) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in sorted(set(a.tensors) | set(b.tensors)):
        if name not in b.tensors:
            yield name, {"status": "only in a"}
            continue
        if name not in a.tensors:
            yield name, {"status": "only in b"}
            continue
        (da, sa, la), (db, sb, lb) = a.tensors[name], b.tensors[name]
        if sa != sb:
            yield name, {"status": f"shape {sa} vs {sb}"}
            continue
        row: dict[str, Any] = {"status": "compared", "dtype": da if da == db else f"{da}/{db}"}
        row["shape"] = sa
        row.update(tensor_stats(la(), lb()))
        yield name, row


def model_bytes(m: Model) -> int:
    return sum(
        formats.DTYPE_SIZES.get(dtype, 1) * math.prod(shape)
        for dtype, shape, _ in m.tensors.values()
    )


def model_diff(a: Model, b: Model, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-tensor statistics (by name, sorted) and totals; ``progress`` gets bytes of ``a``."""
    rows = []
    sq: list[float] = []
    changed = elements = 0
    for name, row in _pairs(a, b):
        rows.append({"name": name, **row})
        if row["status"] == "compared":
            sq.append(row["l2"] ** 2)
            elements += row["elements"]
            changed += row["changed_elements"]
        if progress is not None and name in a.tensors:
            dtype, shape, _ = a.tensors[name]
            progress(formats.DTYPE_SIZES.get(dtype, 1) * math.prod(shape))
    total = {
        "l2": math.sqrt(math.fsum(sq)),
        "changed": changed / elements if elements else 0.0,
        "elements": elements,
        "tensors_compared": len(sq),
        "tensors_differing": sum(1 for r in rows if r["status"] != "compared" or r["changed"] > 0),
    }
    return {"a": a.label, "b": b.label, "tensors": rows, "total": total}
