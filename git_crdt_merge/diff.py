"""``git crdt diff``: what changed between two states of the set (no torch here; the tensor
statistics of ``--tensors`` are in :mod:`tensordiff`).

A *state* is the manifest of a revision, of the index (``:``) or of the work tree (``None``).
The diff lists contributions that became visible or stopped being visible, contributions whose
display name changed, and register values that differ.
"""

from __future__ import annotations

from typing import Any

from . import gitops
from .errors import NotFoundError
from .manifest import Manifest
from .repo import Repo
from .verify import load_state

WORK_TREE = "work tree"


def state_label(rev: str | None) -> str:
    return WORK_TREE if rev is None else ("index" if rev == ":" else rev)


def read_state(repo: Repo, rev: str | None) -> Manifest:
    """The manifest at ``rev`` (None: the work tree); a revision without one, and ``HEAD``
    before the first commit, are the empty set."""
    if rev is not None and rev != ":":
        proc = gitops.run(
            ["rev-parse", "--verify", "-q", f"{rev}^{{commit}}"], repo.root, check=False
        )
        if proc.returncode != 0:
            unborn = (
                rev == "HEAD"
                and gitops.run(["symbolic-ref", "-q", "HEAD"], repo.root, check=False).returncode
                == 0
            )
            if unborn:
                return Manifest.parse(b"", rev)
            raise NotFoundError(f"unknown revision {rev!r}")
        if gitops.show_blob(repo.root, f"{rev}:.crdt/manifest") is None:
            return Manifest.parse(b"", rev)
    return load_state(repo, rev)


def state_diff(repo: Repo, rev_a: str | None, rev_b: str | None) -> dict[str, Any]:
    """Contributions added and removed from A to B, and registers whose value changed."""
    a, b = read_state(repo, rev_a), read_state(repo, rev_b)
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
