"""What the installed hooks run: ``git-crdt hook NAME ARGS...``.

- ``post-checkout``, ``post-merge``, ``post-rewrite``, ``post-commit``: resolve the merged model.
  A no-op on a cache hit (no torch import), quiet unless there is work, and never fails the
  user's git command: a resolution error is reported and the hook exits 0.
  ``git config crdt.autoResolve false`` turns them off.  They also take chunk files that
  ``git stash pop`` wrote into the work tree out again (``install.drop_chunk_files``).
- ``pre-commit``, ``pre-merge-commit``: verify the staged state; ``pre-push``: verify the tip
  of every pushed ref.  These check integrity only (``verify(resolvable=False)``) and block a
  bad commit, merge or push with a message saying how to fix it.  That includes the join
  invariant (:mod:`invariants`): no record of HEAD or MERGE_HEAD lost, and for a push, none of
  any pushed commit lost at the tip.
- ``prepare-commit-msg`` is the one hook that cherry-pick, revert and every rebase pick run
  before they commit (they run no ``pre-commit``): there it verifies the staged state and
  blocks the pick.  Where git took the picked side's manifest whole without calling the driver
  (a plain ``git revert`` of an add deletes the add line), it stages what the driver would have
  written (:func:`invariants.repair_pick`: an observed remove) and blocks, naming the command
  that commits it (``git revert --continue``, ...).  It does nothing for ``git commit`` (its
  ``pre-commit`` ran, or ``--no-verify`` said not to) and for merges (``pre-merge-commit``).
- ``post-commit`` also runs for those picks: when the commit changed ``.crdt/``, it verifies
  the commit and warns (a pick made with the hook missing, or before it existed).
- What the pre hooks pass on is re-hashed: ``pre-merge-commit`` (and ``pre-commit`` while a
  merge is concluded) every object that ``HEAD`` lacks, ``pre-push`` every object the
  remote's tip lacks.
- A resolving hook that fails records why (:mod:`freshness`), so ``status`` can say it.

Every line they print goes through :func:`bounded.display` (pulled names and messages may
hold terminal escape sequences).
"""

from __future__ import annotations

import os
import sys

from ..bounded import display
from ..errors import CrdtError
from ..git import commands as gitops
from ..replicated.manifest import CRDT_DIR, MANIFEST_PATH
from ..replicated.repo import Repo

POST_HOOKS = ("post-checkout", "post-merge", "post-rewrite", "post-commit", "post-applypatch")
PRE_HOOKS = ("pre-commit", "pre-merge-commit", "pre-push", "pre-applypatch")
PICK_HOOKS = ("prepare-commit-msg",)
ZERO = "0" * 40


def _say(msg: str) -> None:
    print(f"git-crdt: {display(msg)}", file=sys.stderr)


def post_hook(repo: Repo, name: str, args: list[str]) -> int:
    if name == "post-checkout" and args[2:3] == ["0"]:
        return 0  # a file checkout, not a branch switch
    if not repo.is_initialized():
        return 0
    if name in ("post-commit", "post-applypatch"):
        warn_about_commit(repo)
    if gitops.config_get(repo.root, "crdt.autoResolve") == "false":
        from ..resolution.freshness import output_state

        state = output_state(repo)
        if state.state == "stale":  # a model is there, and it is not the set's: say so
            _say(f"{name}: {state.message()} (crdt.autoResolve is false)")
        return 0
    from ..resolution.resolve import resolve

    def announce(total_bytes: int) -> None:  # called only on a cache miss: quiet otherwise
        _say(f"resolving the merged model ({total_bytes / 1e6:.0f} MB) ...")

    from ..resolution.freshness import clear_failure, record_failure

    try:
        outcome = resolve(repo, on_start=announce)
    except CrdtError as exc:
        record_failure(repo, repo.read_manifest().merkle_root(), str(exc), name)
        raise
    clear_failure(repo)
    if not outcome.cache_hit and not outcome.empty:
        _say(f"merged model written to {outcome.output.relative_to(repo.root)}/")
    return 0


def warn_about_commit(repo: Repo) -> None:
    """After cherry-pick, revert, a rebase pick or a commit: if it changed ``.crdt/``, check it
    (lost records, records without objects) and say what to run.  Never blocks."""
    from ..query.verify import verify

    head = gitops.rev_parse(repo.root, "HEAD^{commit}")
    if head is None:
        return
    trees = [
        gitops.rev_parse(repo.root, f"{c}:.crdt")
        for c in [head, *gitops.commit_parents(repo.root, head)]
    ]
    if len(trees) > 1 and all(t == trees[0] for t in trees[1:]):
        return
    report = verify(repo, head)
    for p in report.problems[:10]:
        _say(f"warning: commit {head[:10]}: {p.message}")
    if report.problems:
        fixes = dict.fromkeys(p.fix for p in report.problems)
        _say("warning: fix: " + "; ".join(fixes) + " (pre-push will refuse this history)")


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
    if not repo.is_initialized():
        return 0
    stdin_text = sys.stdin.read() if name == "pre-push" else ""
    pushes: list[tuple[str, str | None]]
    if name == "pre-push":
        if not _pushed_history_keeps_records(repo, stdin_text, args):
            return 1
        pushes = list(pushed_refs(stdin_text))
    else:
        merging = name == "pre-merge-commit" or (gitops.git_dir(repo.root) / "MERGE_HEAD").exists()
        pushes = [(":", "HEAD" if merging else None)]
    return 0 if _states_pass(repo, name, pushes) else 1


def _states_pass(repo: Repo, name: str, states: list[tuple[str, str | None]]) -> bool:
    """verify() every (state, what to re-hash new objects against); print and False if any
    has a problem."""
    from ..query.verify import verify

    for rev, against in states:
        if rev != ":" and gitops.show_blob(repo.root, f"{rev}:{MANIFEST_PATH}") is None:
            continue
        # What this hook passes on (a merge's new objects, a push's) is re-hashed: a chunk
        # rewritten in place at the same size is caught before it spreads.
        report = verify(repo, rev, hash_new_against=against)
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
            return False
    return True


def continue_command(repo: Repo, op: str) -> str:
    """What commits the pick once its hook stopped it (git 2.39, measured): a rebase and a
    cherry-pick (it leaves ``CHERRY_PICK_HEAD``) commit the staged state on ``--continue``; a
    revert leaves only ``MERGE_MSG``, so it is committed by hand, and a sequence of reverts
    then goes on with ``--continue`` (which skips the pick that HEAD now holds)."""
    if op == "rebase":
        return "git rebase --continue"
    if op == "cherry-pick":
        return "git cherry-pick --continue"
    if (gitops.git_dir(repo.root) / "sequencer").exists():
        return "git commit --no-edit && git revert --continue"
    return "git commit --no-edit"


def pick_hook(repo: Repo, name: str) -> int:
    """``prepare-commit-msg``: check the state a cherry-pick, revert or rebase pick is about to
    commit (see the module docstring)."""
    from ..replicated.invariants import loss_messages, pick_in_progress, repair_pick

    op = pick_in_progress(repo)
    if op is None or gitops.rev_parse(repo.root, "HEAD^{commit}") is None:
        return 0
    if gitops.index_matches(repo.root, "HEAD", [CRDT_DIR]):
        return 0  # the pick does not touch .crdt/
    repaired = repair_pick(repo)
    if repaired is not None:
        for msg in loss_messages(f"this {op}", repaired.lost):
            _say(f"{name}: {msg}")
        done = [f"an observed remove of {n!r}" for n in repaired.removed]
        done += [f"{n!r} added again" for n in repaired.added_again]
        if repaired.kept:
            done.append(f"{repaired.kept} other record(s) kept")
        _say(
            f"{name}: git did not call the merge driver (the manifest did not change since the "
            "picked commit), so it deleted those lines; staged what the driver writes instead: "
            + ", ".join(done)
        )
        if repaired.missing:
            _say(f"{name}: the objects of {len(repaired.missing)} contribution(s) were not found")
        _say(
            f"{name}: {op} stopped. Check with 'git crdt status', then run "
            f"'{continue_command(repo, op)}'."
        )
        return 1
    if not _states_pass(repo, name, [(":", None)]):
        _say(f"{name}: {op} stopped; after the fix run '{continue_command(repo, op)}'.")
        return 1
    return 0


def _pushed_history_keeps_records(repo: Repo, stdin_text: str, args: list[str]) -> bool:
    """The tip of every pushed ref must hold every record of every commit the push sends and
    of what the remote has: otherwise the push deletes records for everyone."""
    from ..replicated.invariants import LOST_FIX, loss_messages, range_losses

    remote = args[0] if args else ""
    for line in stdin_text.splitlines():
        parts = line.split()
        if len(parts) != 4 or parts[1] == ZERO:
            continue
        if gitops.show_blob(repo.root, f"{parts[1]}:{MANIFEST_PATH}") is None:
            continue
        refs = gitops.remote_tracking_tips(repo.root, remote)
        remote_tip = parts[3] if parts[3] != ZERO else None
        exclude = refs + ([remote_tip] if remote_tip else [])
        found = range_losses(repo, parts[1], exclude, remote_tip)
        if found:
            for msg in loss_messages(f"pushed tip {parts[1][:10]}", found):
                _say(f"pre-push: {msg}")
            _say(f"pre-push blocked. Fix: {LOST_FIX}.")
            return False
    return True


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
    if name in PICK_HOOKS:
        try:
            return pick_hook(repo, name)
        except CrdtError as exc:
            _say(f"{name}: {exc}")
            return 1
        except Exception as exc:  # a broken check blocks, and says how to go on without it
            _say(
                f"{name}: internal error while verifying ({exc!r}); "
                "'git -c core.hooksPath=/dev/null COMMAND --continue' skips the hooks"
            )
            return 1
    _say(f"unknown hook {name!r}")
    return 0
