"""``git crdt show``: one contribution's descriptor, tensors, sizes, extra inputs, and the commit
that added it."""

from __future__ import annotations

import json
from typing import Any

from ..errors import CrdtError, NotFoundError
from ..git import commands as gitops
from ..replicated import contributions
from ..replicated.descriptor import Descriptor
from ..replicated.reader import read_descriptor
from ..replicated.repo import Repo
from ..replicated.store import ObjectStore
from . import history

# Descriptor keys every contribution has.  Extra inputs of strategies (Fisher diagonals, Gram
# matrices) live under "extras" as {kind: {"tensors": {name: tensor info}}}; any other key is
# shown as it is.
CORE_KEYS = {"format", "kind", "tensors", "files", "metadata", "weight"}


def extra_inputs(desc: Descriptor) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: value
        for key, value in sorted(desc.raw.items())
        if key not in CORE_KEYS and key != "extras"
    }
    for kind, table in sorted(desc.extras.items()):
        out[kind] = {"tensors": len(table), "bytes": sum(t.nbytes for t in table.values())}
    return dict(sorted(out.items()))


def _added_by(repo: Repo, cid: str) -> list[dict[str, Any]]:
    """Every add record of ``cid`` with the commit that introduced it (None: not committed)."""
    out = []
    for entry in history.record_log(repo):
        rec = json.loads(entry.line)
        if rec.get("op") != "add" or rec.get("id") != cid:
            continue
        info: dict[str, Any] = {
            "tag": rec["tag"],
            "name": rec["name"],
            "message": rec.get("message"),
            "commit": entry.commit,
            "subject": entry.subject,
        }
        if entry.commit is not None:
            who, when = gitops.commit_author(repo.root, entry.commit)
            info.update(author=who, date=when)
        out.append(info)
    return out


def show(repo: Repo, name_or_id: str) -> dict[str, Any]:
    """Everything known about a visible contribution (or the base, as ``base``)."""
    repo.require_initialized()
    manifest = repo.read_manifest()
    store = ObjectStore(repo.root)
    try:
        cid = contributions.find_contribution(manifest, name_or_id)
        name: str | None = dict(manifest.visible_contributions())[cid]
        role = "contribution"
    except NotFoundError:
        base = manifest.base()
        if name_or_id != "base" or base is None:
            raise
        cid, name, role = base, None, "base"
    desc = read_descriptor(store, manifest, cid)
    tensors = [
        {
            "name": tname,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "bytes": t.nbytes,
            "chunks": len(t.chunks),
            "encoding": "raw" if t.encoding is None else t.encoding.name,
        }
        for tname, t in sorted(desc.tensors.items())
    ]
    return {
        "id": cid,
        "name": name,
        "role": role,
        "kind": desc.kind,
        "format": desc.format,
        "descriptor": manifest.descriptor_address(cid),
        "chunk_size": desc.chunk_size,
        "weight": desc.weight,
        "tensors": tensors,
        "total_bytes": desc.total_bytes(),
        "parameters": sum(_numel(list(t.shape)) for t in desc.tensors.values()),
        "files": dict(sorted(desc.files.items())),
        "metadata": desc.metadata,
        "extra_inputs": extra_inputs(desc),
        "added_by": _added_by(repo, cid) if role == "contribution" else [],
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def contribution_rows(repo: Repo) -> list[dict[str, Any]]:
    """``git crdt list``: name, id, weight, tensor count and bytes of each visible
    contribution, in canonical order (a descriptor that cannot be read gives ``None`` sizes)."""
    manifest = repo.read_manifest()
    store = ObjectStore(repo.root)
    rows = []
    for cid, name in manifest.visible_contributions():
        try:
            desc = read_descriptor(store, manifest, cid)
            tensors = len(desc.tensors)
            size: int | None = desc.total_bytes()
            weight: float | None = desc.weight
        except CrdtError:
            tensors, size, weight = 0, None, None
        rows.append({"name": name, "id": cid, "weight": weight, "tensors": tensors, "bytes": size})
    return rows
