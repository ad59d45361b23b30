"""What the installed hooks run: ``git-crdt hook NAME ARGS...``.

- ``post-checkout``, ``post-merge``, ``post-rewrite``, ``post-commit``: resolve the merged model.
  A no-op on a cache hit (no torch import), quiet unless there is work, and never fails the
  user's git command: a resolution error is reported and the hook exits 0.
  ``git config crdt.autoResolve false`` turns them off.
- ``pre-commit``, ``pre-merge-commit``: verify the staged state; ``pre-push``: verify the tip
  of every pushed ref.  These check integrity only (``verify(resolvable=False)``) and block a
  bad commit, merge or push with a message saying how to fix it.  What they pass on is
  re-hashed: ``pre-merge-commit`` (and ``pre-commit`` while a merge is concluded) every object
  that ``HEAD`` lacks, ``pre-push`` every object the remote's tip lacks.

Every line they print goes through :func:`bounded.display` (pulled names and messages may
hold terminal escape sequences).
"""

from __future__ import annotations

import os
import sys

from . import gitops
from .bounded import display
from .errors import CrdtError
from .repo import Repo

POST_HOOKS = ("post-checkout", "post-merge", "post-rewrite", "post-commit")
PRE_HOOKS = ("pre-commit", "pre-merge-commit", "pre-push")
ZERO = "0" * 40


def _say(msg: str) -> None:
    print(f"git-crdt: {display(msg)}", file=sys.stderr)


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
    return [rev for rev, _ in pushed_refs(stdin_text)]


def pushed_refs(stdin_text: str) -> list[tuple[str, str]]:
    """(tip, what the remote has: its old tip, or "" for a new ref) of every pushed ref."""
    refs = []
    for line in stdin_text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] != ZERO:
            refs.append((parts[1], "" if parts[3] == ZERO else parts[3]))
    framework = os.environ.get("PRE_COMMIT_TO_REF")
    if not refs and framework:
        refs.append((framework, os.environ.get("PRE_COMMIT_FROM_REF", "")))
    return refs


def pre_hook(repo: Repo, name: str, args: list[str]) -> int:
    from .verify import verify

    if not repo.is_initialized():
        return 0
    pushes: list[tuple[str, str | None]]
    if name == "pre-push":
        pushes = list(pushed_refs(sys.stdin.read()))
    else:
        merging = name == "pre-merge-commit" or (gitops.git_dir(repo.root) / "MERGE_HEAD").exists()
        pushes = [(":", "HEAD" if merging else None)]
    for rev, against in pushes:
        if rev != ":" and gitops.show_blob(repo.root, f"{rev}:.crdt/manifest") is None:
            continue
        # What this hook passes on (a merge's new objects, a push's) is re-hashed: a chunk
        # rewritten in place at the same size is caught before it spreads.
        report = verify(repo, rev, hash_new_against=against)
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
