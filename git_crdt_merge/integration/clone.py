"""``git crdt clone``: a clone that never writes a chunk into its work tree.

A plain ``git clone`` checks out every path before any hook or setting of ours exists in the
new repository, so every chunk under ``.crdt/objects/`` is written into the work tree once
(until ``git crdt install`` takes it out again).  As ``git lfs clone`` did, this clones with
``--no-checkout``, installs (driver, hooks, transport settings, the sparse pattern that
excludes ``.crdt/objects/``), and only then checks out, so git never writes those paths; then
it resolves the merged model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CrdtError, UsageError
from ..git import commands as gitops
from ..replicated.repo import Repo
from . import install as installer


@dataclass
class CloneResult:
    path: Path
    notes: list[str]
    resolved: dict[str, Any] | None  # resolve's outcome; None when not resolved

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "notes": self.notes, "resolve": self.resolved}


def default_directory(url: str) -> str:
    """The folder ``git clone URL`` would create: the last path component of the URL, without
    a trailing ``/``, ``/.git`` or ``.git``."""
    name = url.rstrip("/")
    if name.endswith("/.git"):
        name = name[: -len("/.git")]
    name = re.split(r"[/:]", name)[-1]
    if name.endswith(".git"):
        name = name[: -len(".git")]
    name = name.strip()
    if not name or name in (".", ".."):
        raise UsageError(f"cannot guess a folder name from {url!r}: pass DIR")
    return name


def clone(
    url: str,
    directory: Path | None,
    *,
    cwd: Path,
    clone_args: Sequence[str] = (),
    resolve: bool = True,
    show_progress: bool = False,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> CloneResult:
    """Clone ``url`` into ``directory`` without checkout, install, check out, resolve.

    ``clone_args`` are passed to ``git clone`` (``--branch``, ``--depth``, ``--filter``, ...).
    A failed resolution leaves the clone in place and raises, saying so."""
    if url.startswith("-"):
        raise UsageError(f"URL {url!r} looks like an option")
    target = directory if directory is not None else Path(default_directory(url))
    target = target if target.is_absolute() else cwd / target
    gitops.clone(
        ["--no-checkout", *clone_args, "--", url, str(target)], cwd, show_progress=show_progress
    )
    notes = installer.install(target, sparse=True)
    if gitops.rev_parse(target, "HEAD") is None:
        notes.append("the repository is empty: nothing to check out")
        return CloneResult(target, notes, None)
    # Our post-checkout hook would resolve too; resolve here instead, so that errors and the
    # outcome reach the caller (a hook must never fail the checkout).
    gitops.checkout_head(target, "crdt.autoResolve=false")
    installer.drop_chunk_files(target)  # nothing to do unless git ignored the pattern
    repo = Repo.open(target)
    if not resolve or not repo.is_initialized():
        return CloneResult(target, notes, None)
    from ..resolution.resolve import resolve as do_resolve

    try:
        outcome = do_resolve(repo, on_start=on_start, progress=progress)
    except CrdtError as exc:
        raise type(exc)(
            f"cloned into {target}, but the merged model could not be resolved: {exc} "
            "(fix that, then run 'git crdt resolve' there)"
        ) from None
    return CloneResult(target, notes, outcome.as_dict())
