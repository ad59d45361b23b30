"""Whether the output folder (``merged/``) is the model of the current set, and if not, why.

Some git operations run no hook (``reset --hard``, ``stash``, ``stash pop``, ``am``, an
interrupted rebase), ``crdt.autoResolve`` may be off, and a resolving hook may fail (an
incompatible pulled contribution, a strategy whose input contract the set does not meet).  In
all those cases the folder keeps an older model.  It is never silently stale: ``status``,
``doctor``, ``list`` and the hooks call :func:`output_state` and say so, with the reason the
last failed resolution gave (kept in ``.git/crdt/last-resolve.json``).  No torch here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..replicated.manifest import Manifest
from ..replicated.repo import Repo, atomic_write
from . import cache

FAILURE_FILE = "last-resolve.json"


@dataclass
class OutputState:
    state: str  # "current", "stale", "missing", "empty" (no set, no folder)
    output: str  # the folder, relative to the work tree
    root: str  # the Merkle root of the current set
    reason: str = ""
    failed: bool = False  # a resolving hook failed on this set

    @property
    def ok(self) -> bool:
        """No wrong model on disk and no failed resolution (a folder not resolved yet, with
        crdt.autoResolve off, holds no wrong model)."""
        return self.state in ("current", "empty") or (self.state == "missing" and not self.failed)

    def message(self) -> str:
        if self.state == "current":
            return f"{self.output}/ holds the model of the current set"
        if self.state == "empty":
            return "no visible contributions and no merged model"
        what = "is stale" if self.state == "stale" else "is missing"
        return f"{self.output}/ {what}: {self.reason}"

    def as_dict(self) -> dict[str, str]:
        return {
            "state": self.state,
            "output": self.output,
            "merkle_root": self.root,
            "reason": self.reason,
        }


def record_failure(repo: Repo, root: str, error: str, hook: str) -> None:
    """Remember why a hook could not resolve ``root`` (shown until a resolution succeeds)."""
    data = {"root": root, "error": error, "hook": hook, "time": int(time.time())}
    try:
        atomic_write(repo.state_dir / FAILURE_FILE, json.dumps(data).encode())
    except OSError:
        pass


def clear_failure(repo: Repo) -> None:
    (repo.state_dir / FAILURE_FILE).unlink(missing_ok=True)


def last_failure(repo: Repo, root: str) -> str | None:
    try:
        data = json.loads((repo.state_dir / FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("root") != root:
        return None
    return f"the {data.get('hook', 'last')} hook could not resolve it: {data.get('error')}"


def output_state(repo: Repo, manifest: Manifest | None = None) -> OutputState:
    manifest = manifest if manifest is not None else repo.read_manifest()
    rel = manifest.output()
    out_dir = repo.root / rel
    root = manifest.merkle_root()
    have = cache.published_key(repo, out_dir)
    empty = not manifest.visible_contributions()
    failure = last_failure(repo, root)
    hint = "run 'git crdt resolve'"
    if empty:
        if have is None:
            return OutputState("empty", rel, root)
        return OutputState(
            "stale", rel, root, f"the set is empty but it still holds an older model; {hint}"
        )
    if have is None:
        reason = failure or f"not resolved yet; {hint}"
        return OutputState("missing", rel, root, reason, failure is not None)
    if have.split(".", 1)[0] == root:
        return OutputState("current", rel, root)
    reason = failure or (
        f"it holds the model of root {have[:12]}, the set's root is {root[:12]} (git reset, "
        f"stash, am and crdt.autoResolve=false run no resolving hook); {hint}"
    )
    return OutputState("stale", rel, root, reason, failure is not None)


def remove_output(repo: Repo, out_dir: Path) -> bool:
    """Remove a published model (only one of ours) when the set has become empty."""
    if out_dir.is_symlink() or not out_dir.is_dir() or cache.published_key(repo, out_dir) is None:
        return False
    cache.check_replaceable(repo, out_dir)
    trash = cache.cache_root(repo) / f".old-{os.getpid()}-{time.monotonic_ns()}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(out_dir, trash)
    except OSError:
        trash = out_dir
    shutil.rmtree(trash, ignore_errors=True)
    return True
