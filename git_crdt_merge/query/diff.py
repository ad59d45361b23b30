"""``git crdt diff``: what changed between two states of the set (no torch here; the tensor
statistics of ``--tensors`` are in :mod:`tensordiff`).

A *state* is the manifest of a revision, of the index (``:``) or of the work tree (``None``).
The diff lists contributions that became visible or stopped being visible, contributions whose
display name changed, and register values that differ.
"""

from __future__ import annotations

from typing import Any

from ..replicated.manifest import Manifest
from ..replicated.repo import Repo

WORK_TREE = "work tree"


def state_label(rev: str | None) -> str:
    return WORK_TREE if rev is None else ("index" if rev == ":" else rev)


def state_diff(repo: Repo, rev_a: str | None, rev_b: str | None) -> dict[str, Any]:
    """Contributions added and removed from A to B, and registers whose value changed."""
    a, b = repo.manifest_at(rev_a, known=True), repo.manifest_at(rev_b, known=True)
    va, vb = dict(a.visible_contributions()), dict(b.visible_contributions())
    registers = []
    for key, get in (("strategy", Manifest.strategy), ("base", Manifest.base)):
        if get(a) != get(b):
            registers.append({"key": key, "a": get(a), "b": get(b)})
    if a.output() != b.output():
        registers.append({"key": "output", "a": a.output(), "b": b.output()})
    return {
        "a": state_label(rev_a),
        "b": state_label(rev_b),
        "merkle_root_a": a.merkle_root(),
        "merkle_root_b": b.merkle_root(),
        "added": [{"id": i, "name": vb[i]} for i in sorted(set(vb) - set(va))],
        "removed": [{"id": i, "name": va[i]} for i in sorted(set(va) - set(vb))],
        "renamed": [
            {"id": i, "a": va[i], "b": vb[i]} for i in sorted(set(va) & set(vb)) if va[i] != vb[i]
        ],
        "registers": registers,
    }
