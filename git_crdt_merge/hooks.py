"""What the installed hooks run: ``git-crdt hook NAME ARGS...``.

- ``post-checkout``, ``post-merge``, ``post-rewrite``, ``post-commit``: resolve the merged model.
  A no-op on a cache hit (no torch import), quiet unless there is work, and never fails the
  user's git command: a resolution error is reported and the hook exits 0.
  ``git config crdt.autoResolve false`` turns them off.  They also take chunk files that
  ``git stash pop`` wrote into the work tree out again (``install.drop_chunk_files``).
- ``pre-commit``, ``pre-merge-commit``: verify the staged state; ``pre-push``: verify the tip
  of every pushed ref.  These check integrity only (``verify(resolvable=False)``) and block a
  bad commit, merge or push with a message saying how to fix it.
"""

from __future__ import annotations

import os
import sys

from . import gitops
from .errors import CrdtError
from .repo import Repo

POST_HOOKS = ("post-checkout", "post-merge", "post-rewrite", "post-commit")
PRE_HOOKS = ("pre-commit", "pre-merge-commit", "pre-push")
ZERO = "0" * 40


def _say(msg: str) -> None:
    print(f"git-crdt: {msg}", file=sys.stderr)


def post_hook(repo: Repo, name: str, args: list[str]) -> int:
    if gitops.config_get(repo.root, "crdt.autoResolve") == "false":
        return 0
    if name == "post-checkout" and args[2:3] == ["0"]:
        return 0  # a file checkout, not a branch switch
    if not repo.is_initialized():
        return 0
    from .resolve import resolve

    def announce(total_bytes: int) -> None:  # called only on a cache miss: quiet otherwise
        _say(f"resolving the merged model ({total_bytes / 1e6:.0f} MB) ...")

    outcome = resolve(repo, on_start=announce)
    if not outcome.cache_hit and not outcome.empty:
        _say(f"merged model written to {outcome.output.relative_to(repo.root)}/")
    return 0


def pushed_revs(stdin_text: str) -> list[str]:
    """The tip commit of every ref a push sends (the state that lands on the remote; commits
    below a tip are not checked): from git's pre-push input, or from the pre-commit
    framework, which consumes that input and passes ``PRE_COMMIT_TO_REF`` instead."""
    revs = []
    for line in stdin_text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] != ZERO:
            revs.append(parts[1])
    framework = os.environ.get("PRE_COMMIT_TO_REF")
    if not revs and framework:
        revs.append(framework)
    return revs


def pre_hook(repo: Repo, name: str, args: list[str]) -> int:
    from .verify import verify

    if not repo.is_initialized():
        return 0
    revs = pushed_revs(sys.stdin.read()) if name == "pre-push" else [":"]
    for rev in revs:
        if rev != ":" and gitops.show_blob(repo.root, f"{rev}:.crdt/manifest") is None:
            continue
        report = verify(repo, rev)
        # A partial clone lacks objects its promisor remote holds: not a broken state.
        absent = [p for p in report.problems if p.kind == "absent"]
        report.problems = [p for p in report.problems if p.kind != "absent"]
        if absent and name != "pre-push":
            _say(f"{name}: {len(absent)} objects not fetched yet (partial clone); not checked")
        if report.problems:
            where = "the staged state" if rev == ":" else f"commit {rev[:10]}"
            for p in report.problems[:10]:
                _say(f"{name}: {where}: {p.message}")
            if len(report.problems) > 10:
                _say(f"{name}: ... and {len(report.problems) - 10} more ('git crdt verify')")
            fixes = dict.fromkeys(p.fix for p in report.problems)
            _say(f"{name} blocked. Fix: " + "; ".join(fixes) + ".")
            return 1
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        _say("usage: git-crdt hook NAME [ARGS...]")
        return 2
    name, args = argv[0], argv[1:]
    try:
        repo = Repo.open(".")
    except CrdtError:
        return 0
    if name in POST_HOOKS:
        try:
            from .install import drop_chunk_files

            if drop_chunk_files(repo.root):
                _say("took the chunk files under .crdt/objects/ out of the work tree again")
            return post_hook(repo, name, args)
        except CrdtError as exc:
            _say(f"{name}: could not resolve the merged model: {exc}")
            return 0
        except Exception as exc:  # a hook must never break the user's checkout
            _say(f"{name}: internal error while resolving: {exc!r}")
            return 0
    if name in PRE_HOOKS:
        try:
            return pre_hook(repo, name, args)
        except CrdtError as exc:
            _say(f"{name}: {exc}")
            return 1
        except Exception as exc:  # verification itself broke: say so in one line, and block
            _say(
                f"{name}: internal error while verifying ({exc!r}); 'git commit --no-verify' "
                "skips it"
            )
            return 1
    _say(f"unknown hook {name!r}")
    return 0
