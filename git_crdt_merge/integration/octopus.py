"""The merge strategy ``crdt`` (the program ``git-merge-crdt``): octopus merges that join.

git's own ``octopus`` strategy never calls merge drivers: it merges each file with
``git merge-one-file``, so two heads that both changed ``.crdt/manifest`` make it give up
("Merge with strategy octopus failed").  ``git crdt install`` sets ``pull.octopus = crdt``,
which ``git merge A B ...`` and ``git pull`` of several heads use (git 2.39 reads
``pull.octopus`` for both), so they run this instead:

- the heads are merged one after the other, as the octopus strategy does, each with
  ``git merge-tree --write-tree`` (git's ort merge, which calls our driver: the manifests are
  joined, every other file merges as in a two-head merge), on a temporary commit that stands for
  what is merged so far, so every step sees the right merge bases;
- only the final tree is read into the index and work tree (``read-tree -u -m``, which keeps
  the sparse checkout: no chunk file is written);
- a conflict in any step, or local changes in the index, stop it before anything is touched,
  with exit 2 (git then says the strategy failed and leaves everything as it was) and a
  message giving the sequential alternative, ``git merge A && git merge B``.

git finds the strategy through PATH (a strategy cannot be given by absolute path).  Where the
program is not on PATH, git refuses the octopus itself ("Could not find merge strategy 'crdt'")
before it starts; ``git crdt doctor`` says so.  Imports no torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..bounded import display
from ..errors import GitError
from ..git import commands as gitops

USAGE = "usage: git-merge-crdt BASE... -- HEAD REMOTE..."
STRATEGY = "crdt"
PROGRAM = "git-merge-crdt"
TMP_MESSAGE = b"git-crdt octopus step (temporary, unreferenced)\n"


def _say(msg: str) -> None:
    print(f"git-crdt: {display(msg)}", file=sys.stderr)


def _refuse(why: str, remotes: list[str]) -> int:
    _say(why)
    steps = " && ".join(f"git merge {r}" for r in remotes)
    _say(f"merge the heads one at a time instead: {steps}")
    return 2


def merge(root: Path, head: str, remotes: list[str], names: list[str]) -> int:
    """Merge ``remotes`` into ``head`` (see the module docstring); the exit code for git."""
    if not gitops.index_matches(root, "HEAD"):
        return _refuse("your index has changes; an octopus merge needs a clean one", names)
    current = head
    tree = None
    for remote, name in zip(remotes, names, strict=True):
        tree, conflicted, error = gitops.merge_tree(root, current, remote)
        if conflicted:
            return _refuse(f"merging {name} conflicts in {', '.join(conflicted[:5])}", names)
        if tree is None:
            return _refuse(f"cannot merge {name}: {error}", names)
        current = gitops.commit_tree(root, tree, [current, remote], TMP_MESSAGE)
    if tree is None:
        return 0
    try:
        gitops.read_tree_update(root, "HEAD", tree)
    except GitError as exc:
        return _refuse(f"cannot update the work tree: {exc}", names)
    return 0


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(USAGE, file=sys.stderr)
        return 2
    rest = argv[argv.index("--") + 1 :]
    if len(rest) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    head, remotes = rest[0], rest[1:]
    # git passes each head as a commit id and names it in GITHEAD_<sha>
    names = [os.environ.get(f"GITHEAD_{r}", r) for r in remotes]
    try:
        root = gitops.toplevel(".")
        resolved = []
        for r in [head, *remotes]:
            sha = gitops.rev_parse(root, f"{r}^{{commit}}")
            if sha is None:
                return _refuse(f"{r} is not a commit", names)
            resolved.append(sha)
        return merge(root, resolved[0], resolved[1:], names)
    except GitError as exc:
        _say(f"merge strategy {STRATEGY}: {exc}")
        return 2


def entry() -> None:
    """Console script ``git-merge-crdt``."""
    sys.exit(main(sys.argv[1:]))
