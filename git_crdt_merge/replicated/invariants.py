"""The history invariants of Layer 1, checked where git lets us, and the commands that restore them.

1. **No record is ever lost.**  The manifest is grow-only, so a commit's manifest holds every
   line of every parent's (a merge: also of ``MERGE_HEAD`` while it is being made).  A line that
   disappears comes from a text merge without the driver, a ``git revert`` (git takes the
   parent's blob when only one side changed the file, so the driver never runs), a hand edit or
   ``git checkout REV -- .crdt/manifest``.  Such a commit is blocked by ``pre-commit`` and
   ``pre-merge-commit``; a cherry-pick, revert or rebase pick (which run no pre-commit hook)
   is stopped by ``prepare-commit-msg``, with the driver's answer staged where git did not
   call it (:func:`repair_pick`); a commit made without the hooks is reported by
   ``post-commit``, refused by ``pre-push`` (the pushed tip must hold every record of every
   pushed commit), and listed by ``git crdt verify``.
2. **No record without its objects.**  ``verify`` checks that every visible contribution's
   objects are in the checked tree or index; the driver's ``ours ∪ (theirs ∖ base)`` keeps picks
   from bringing back records of commits whose objects git left out.

Fixes: :func:`restore_records` brings lost lines back (with the objects the parents' trees hold
for them), optionally as an observed remove (what a deleted add line meant); :func:`revert`
is the CRDT meaning of ``git revert`` (adds become an observed remove, removes become a new add,
register writes go back to the previous value).  No torch here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ManifestError, NotFoundError, UsageError
from ..git import commands as gitops
from ..git import objects as gitobjects
from . import checks
from .manifest import (
    DEFAULT_OUTPUT,
    DEFAULT_STRATEGY,
    MANIFEST_PATH,
    Manifest,
    Record,
    add_record,
    parse_record,
    remove_record,
    set_record,
)
from .repo import Repo, new_tag
from .store import OBJECTS_DIR, object_id_of_path, object_path

LOST_FIX = (
    "'git crdt restore-records' brings the lost records back with their objects "
    "('--remove' records the removal a deleted add line meant, e.g. after a plain 'git revert'),"
    " then commit (or 'git commit --amend' the commit that lost them); to take a contribution "
    "out use 'git crdt remove-contribution' or 'git crdt revert COMMIT', never a deleted line"
)


def lines_of(data: bytes | None) -> set[str]:
    # split on "\n" only: names may hold other Unicode line separators
    if not data:
        return set()
    return set(data.decode("utf-8", errors="replace").split("\n")) - {""}


@dataclass
class Loss:
    """Records of ``source`` (a parent, ``MERGE_HEAD``) that the checked state lacks."""

    source: str
    lines: list[str] = field(default_factory=list)

    def describe(self, limit: int = 3) -> str:
        parts = []
        for line in self.lines[:limit]:
            try:
                rec = parse_record(line)
            except ManifestError:
                parts.append("an unparseable line")
                continue
            if rec.op == "add":
                parts.append(f"add of {rec.fields['name']!r} ({rec.fields['id'][:12]})")
            elif rec.op == "remove":
                parts.append(f"remove {rec.tag[:12]}")
            else:
                parts.append(f"register write {rec.fields['key']!r}")
        more = f" and {len(self.lines) - limit} more" if len(self.lines) > limit else ""
        return ", ".join(parts) + more


def _short(rev: str) -> str:
    return rev[:10] if len(rev) == 40 else rev


def losses(state: set[str], sources: dict[str, set[str]]) -> list[Loss]:
    found = []
    for source, lines in sources.items():
        lost = sorted(lines - state)
        if lost:
            found.append(Loss(source, lost))
    return found


def loss_messages(what: str, found: Sequence[Loss]) -> list[str]:
    return [
        f"{what} lacks {len(loss.lines)} record(s) of {loss.source}: {loss.describe()} "
        "(records are never deleted)"
        for loss in found
    ]


# -- what a state must contain ------------------------------------------------------------
def git_commands(depth: int = 6) -> list[list[str]] | None:
    """The argv of every ``git`` process above this hook, nearest first (read from /proc: git
    tells hooks neither which command runs them nor its options), or None where /proc is not
    there.  Between the hook and git sit our hook script and maybe the pre-commit framework."""
    pid = os.getppid()
    found: list[list[str]] = []
    for _ in range(depth):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return found if found else None
        if cmd and Path(cmd[0].decode(errors="replace")).name == "git":
            found.append([w.decode(errors="replace") for w in cmd if w])
        try:
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            break
        if pid <= 1:
            break
    return found


def _subcommand(argv: list[str]) -> str | None:
    """``commit`` of ``git -c x=y commit --amend``: the first word after git's own options."""
    words = iter(argv[1:])
    for word in words:
        if word in ("-c", "-C", "--git-dir", "--work-tree", "--namespace"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _amending() -> bool:
    """Whether the ``git commit`` that runs this hook has ``--amend``.  Then the new commit's
    parents are HEAD's parents."""
    for argv in git_commands() or []:
        if _subcommand(argv) == "commit":
            return "--amend" in argv
    return False


PICKS = ("cherry-pick", "revert", "rebase")


def pick_in_progress(repo: Repo) -> str | None:
    """The history operation that makes the commit now being written, when it is one that runs
    no ``pre-commit`` hook (cherry-pick, revert, a rebase pick): from the git processes above
    us, else (no /proc) from the state files git keeps while such an operation runs."""
    chain = git_commands()
    if chain is not None:
        for argv in chain:
            sub = _subcommand(argv)
            if sub in PICKS:
                return sub
        return None
    git_dir = gitops.git_dir(repo.root)
    if (git_dir / "rebase-merge").exists() or (git_dir / "rebase-apply").exists():
        return "rebase"
    for name, op in (("CHERRY_PICK_HEAD", "cherry-pick"), ("REVERT_HEAD", "revert")):
        if (git_dir / name).exists():
            return op
    if (git_dir / "sequencer").exists():
        return "cherry-pick"
    return None


def expected_sources(repo: Repo, *, amend: bool | None = None) -> dict[str, str]:
    """label -> commit whose records the next commit must hold: HEAD (HEAD's parents when
    amending) and MERGE_HEAD while a merge is being concluded."""
    head = gitops.rev_parse(repo.root, "HEAD^{commit}")
    found: dict[str, str] = {}
    if head is not None:
        if amend if amend is not None else _amending():
            for i, parent in enumerate(gitops.commit_parents(repo.root, head)):
                found[f"HEAD^{i + 1} ({_short(parent)})"] = parent
        else:
            found[f"HEAD ({_short(head)})"] = head
    for sha in merging_heads(repo):
        found[f"MERGE_HEAD ({_short(sha)})"] = sha
    return found


def merging_heads(repo: Repo) -> list[str]:
    """The other parents of the merge being concluded.  ``MERGE_HEAD`` once it exists (a
    conflicted merge, then ``git commit``); in ``pre-merge-commit`` git has not written it yet
    (git 2.39, measured), so then the heads come from ``GIT_REFLOG_ACTION`` (``merge NAME...``)
    or, for ``git pull``, from the merged lines of ``FETCH_HEAD``."""
    merge_head = gitops.git_path(repo.root, "MERGE_HEAD")
    if merge_head.exists():
        return merge_head.read_text().split()
    action = os.environ.get("GIT_REFLOG_ACTION", "").split()
    heads: list[str] = []
    if action[:1] == ["merge"]:
        for word in action[1:]:
            if word.startswith("-"):
                continue
            sha = gitops.rev_parse(repo.root, f"{word}^{{commit}}")
            if sha is not None:
                heads.append(sha)
    elif action[:1] == ["pull"]:
        fetch_head = gitops.git_path(repo.root, "FETCH_HEAD")
        try:
            lines = fetch_head.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] == "" and len(parts[0]) == 40:
                heads.append(parts[0])
    return heads


def _manifests(repo: Repo, commits: Iterable[str]) -> dict[str, set[str]]:
    commits = list(dict.fromkeys(commits))
    blobs = gitops.read_blobs(repo.root, [f"{c}:{MANIFEST_PATH}" for c in commits])
    return {c: lines_of(blobs[f"{c}:{MANIFEST_PATH}"]) for c in commits}


def state_losses(repo: Repo, state: set[str], *, amend: bool | None = None) -> list[Loss]:
    """What the staged or work-tree state lacks of HEAD / MERGE_HEAD."""
    sources = expected_sources(repo, amend=amend)
    manifests = _manifests(repo, sources.values())
    return losses(state, {label: manifests[c] for label, c in sources.items()})


def commit_losses(repo: Repo, commit: str) -> list[Loss]:
    """What ``commit``'s manifest lacks of its parents'."""
    parents = gitops.commit_parents(repo.root, commit)
    manifests = _manifests(repo, [commit, *parents])
    return losses(
        manifests[commit],
        {f"parent {_short(p)}": manifests[p] for p in parents},
    )


def range_losses(
    repo: Repo, tip: str, exclude: Sequence[str], remote_tip: str | None = None, limit: int = 2000
) -> list[Loss]:
    """What ``tip`` lacks of any commit in ``tip ^exclude...`` (the commits a push sends) and of
    ``remote_tip`` (the ref's value on the remote, if we have it): a record dropped on the way
    and never restored would be deleted on the remote."""
    have = [e for e in exclude if gitops.rev_parse(repo.root, f"{e}^{{commit}}")]
    commits = gitops.rev_list(repo.root, tip, have, limit)
    if remote_tip is not None and gitops.rev_parse(repo.root, f"{remote_tip}^{{commit}}"):
        commits.append(remote_tip)
    manifests = _manifests(repo, [tip, *commits])
    state = manifests[tip]
    union: dict[str, set[str]] = {}
    for c in commits:
        if manifests[c] - state:
            union[f"commit {_short(c)}"] = manifests[c]
    return losses(state, union)


def attribute_problem(repo: Repo, rev: str | None) -> str | None:
    """The manifest must stay bound to the driver in the checked state's .gitattributes."""
    value = gitops.attr_in_state(repo.root, "merge", MANIFEST_PATH, rev)
    if value is None:  # --source needs git 2.40: a revision cannot be checked here
        return None
    if value == "crdt":
        return None
    return (
        ".gitattributes no longer binds .crdt/manifest to merge=crdt: git would merge it as text "
        "and drop records; restore the line '.crdt/manifest merge=crdt text eol=lf'"
    )


# -- restoring --------------------------------------------------------------------------------
@dataclass
class Restored:
    records: int = 0
    removed: list[str] = field(default_factory=list)  # names now under an observed remove
    objects: int = 0
    missing: list[str] = field(default_factory=list)  # contributions whose objects were not found

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _sources_for_restore(repo: Repo, revs: Sequence[str]) -> list[str]:
    """The commits to take records from: ``revs``, or HEAD, HEAD's parents and MERGE_HEAD."""
    if revs:
        found = []
        for rev in revs:
            sha = gitops.rev_parse(repo.root, f"{rev}^{{commit}}")
            if sha is None:
                raise NotFoundError(f"no commit {rev!r}")
            found.append(sha)
        return found
    head = gitops.rev_parse(repo.root, "HEAD^{commit}")
    found = [] if head is None else [head, *gitops.commit_parents(repo.root, head)]
    return found + list(expected_sources(repo, amend=False).values())


def _object_entries(repo: Repo, commits: Sequence[str]) -> dict[str, str]:
    """object id -> git blob SHA-1 over the trees of ``commits``."""
    found: dict[str, str] = {}
    for c in commits:
        for path, sha in gitops.tree_entries(repo.root, c, OBJECTS_DIR).items():
            oid = object_id_of_path(path)
            if oid is not None:
                found.setdefault(oid, sha)
    return found


def restore_records(repo: Repo, revs: Sequence[str] = (), *, remove: bool = False) -> Restored:
    """Bring back every record of ``revs`` (default: HEAD, its parents, MERGE_HEAD) that the
    work-tree manifest lacks, and stage the objects their trees hold for the contributions
    they make visible.  ``remove``: also record an observed remove of the restored adds."""
    repo.require_initialized()
    commits = _sources_for_restore(repo, revs)
    result = Restored()
    with repo.lock(), repo.transaction() as env:
        manifest = repo.read_manifest()
        have = set(manifest.records)
        wanted: dict[str, Record] = {}
        for lines in _manifests(repo, commits).values():
            for line in sorted(lines - have):
                try:
                    wanted[line] = parse_record(line)
                except ManifestError:
                    continue  # a damaged line in history is verify's and repair's to report
        if not wanted:
            return result
        state = manifest.with_records(wanted.values())
        restored_adds = [r for r in wanted.values() if r.op == "add"]
        if remove:
            live = {r.tag for r in state.visible_adds()}
            tags = [r.tag for r in restored_adds if r.tag in live]
            if tags:
                state = state.with_records([remove_record(new_tag(), tags)])
                result.removed = sorted({str(r.fields["name"]) for r in restored_adds})
        result.records = len(wanted)
        visible = {cid for cid, _ in state.visible_contributions()}
        # descriptors by address (format 2 records name theirs; format 1 ids are addresses)
        needed = [
            state.descriptor_address(str(r.fields["id"]))
            for r in restored_adds
            if r.fields["id"] in visible
        ]
        base = state.base()
        if base:
            needed.append(state.descriptor_address(base))
        result.objects, result.missing = _stage_objects(repo, commits, needed, env)
        repo.write_manifest(state, env)
    return result


def _stage_objects(
    repo: Repo, commits: Sequence[str], contribution_ids: Sequence[str], env: dict[str, str]
) -> tuple[int, list[str]]:
    """Stage the descriptors and objects of ``contribution_ids`` that the index lacks, from
    the trees of ``commits``.  Returns (objects staged, ids whose objects are not there)."""
    indexed = {
        oid
        for path in gitops.index_entries(repo.root, OBJECTS_DIR)
        if (oid := object_id_of_path(path)) is not None
    }
    available = _object_entries(repo, commits)
    db = gitobjects.ObjectDB(gitops.common_dir(repo.root) / "objects", root=repo.root)
    stage: dict[str, str] = {}
    missing = []
    for cid in dict.fromkeys(contribution_ids):
        sha = available.get(cid)
        if sha is None:
            if cid not in indexed:
                missing.append(cid)
            continue
        try:
            desc = json.loads(db.read(sha, max_size=checks.MAX_DESCRIPTOR_BYTES))
        except (ValueError, gitops.GitError):
            missing.append(cid)
            continue
        oids = [cid, *(oid for oid, _ in checks.object_references(desc))]
        for oid in oids:
            if oid in indexed or oid in stage:
                continue
            if oid in available:
                stage[oid] = available[oid]
            elif cid not in missing:
                missing.append(cid)
    gitops.stage_blobs(
        repo.root,
        [(object_path(oid), sha) for oid, sha in sorted(stage.items())],
        skip_worktree=True,
        env=env,
    )
    return len(stage), missing


def revert(repo: Repo, rev: str) -> list[str]:
    """Stage the CRDT inverse of commit ``rev``'s manifest change: its adds get an observed
    remove, its removes a fresh add of the same contribution (its objects must still be
    staged), its register writes a new write of the value before it.  Returns what it did."""
    repo.require_initialized()
    commit = gitops.rev_parse(repo.root, f"{rev}^{{commit}}")
    if commit is None:
        raise NotFoundError(f"no commit {rev!r}")
    parents = gitops.commit_parents(repo.root, commit)
    if len(parents) > 1:
        raise UsageError(f"{rev} is a merge: revert the commits it brought, one by one")
    manifests = _manifests(repo, [commit, *parents])
    before = manifests[parents[0]] if parents else set()
    introduced = [parse_record(line) for line in sorted(manifests[commit] - before)]
    if not introduced:
        raise UsageError(f"commit {rev} does not change the manifest")
    old = Manifest.parse("".join(f"{x}\n" for x in sorted(before)).encode(), f"{rev}^")
    done: list[str] = []
    replica = repo.replica_id()
    with repo.lock(), repo.transaction() as env:
        manifest = repo.read_manifest()
        live = {r.tag for r in manifest.visible_adds()}
        new: list[Record] = []
        tags = [r.tag for r in introduced if r.op == "add" and r.tag in live]
        if tags:
            new.append(remove_record(new_tag(), tags))
            names = sorted({str(r.fields["name"]) for r in introduced if r.tag in tags})
            done += [f"removed {n!r}" for n in names]
        by_tag = {r.tag: r for r in manifest.adds()}
        visible = {cid for cid, _ in manifest.visible_contributions()}
        staged = {
            oid
            for path in gitops.index_entries(repo.root, OBJECTS_DIR)
            if (oid := object_id_of_path(path)) is not None
        }
        for r in introduced:
            if r.op != "remove":
                continue
            for tag in r.fields["observed"]:
                add = by_tag.get(tag)
                if add is None or add.fields["id"] in visible:
                    continue
                cid = str(add.fields["id"])
                address = str(add.fields.get("desc", cid))  # format 2 names its descriptor
                if address not in staged:
                    raise ManifestError(
                        f"cannot bring back {add.fields['name']!r}: its objects are no longer "
                        "staged (add the model again with 'git crdt add-contribution')"
                    )
                new.append(add_record(new_tag(), cid, str(add.fields["name"]), desc=address))
                visible.add(cid)
                done.append(f"added {add.fields['name']!r} again")
        clock = manifest.max_clock()
        for r in introduced:
            if r.op != "set":
                continue
            key = str(r.fields["key"])
            current = manifest.register_record(key)
            if current is None or current.line != r.line:
                continue  # a later write won: reverting this one changes nothing
            clock += 1
            defaults = {"base": None, "output": DEFAULT_OUTPUT, "strategy": DEFAULT_STRATEGY}
            previous = old.register(key, defaults[key])
            new.append(set_record(key, previous, clock, replica))
            done.append(f"register {key!r} set back")
        if not new:
            return []
        repo.write_manifest(manifest.with_records(new), env)
    return done


@dataclass
class PickRepair:
    """What :func:`repair_pick` staged in place of the records a pick deleted."""

    lost: list[Loss]
    removed: list[str] = field(default_factory=list)  # names now under an observed remove
    added_again: list[str] = field(default_factory=list)  # names whose remove was reverted
    kept: int = 0  # deleted lines that are simply back (register writes, removes of nothing)
    missing: list[str] = field(default_factory=list)  # contributions whose objects were not found


def repair_pick(repo: Repo) -> PickRepair | None:
    """Stage what the merge driver would have written for the pick now being committed, when
    git did not call it and the staged manifest lacks records of HEAD.

    A cherry-pick, revert or rebase pick merges with base = the picked commit's parent (for a
    revert: the reverted commit itself).  When HEAD's manifest equals that base, git takes the
    picked side's blob whole and never calls the driver, so the lines the picked side lacks are
    deleted (a plain ``git revert`` of an add: the add line goes).  The driver's answer with
    ours = base = HEAD is ``driver.three_way(HEAD, staged, lines(HEAD))``: the staged records,
    every HEAD record back, and the inverse of what was deleted (an observed remove of a
    deleted add, with the same derived tag every clone writes; a new add for a deleted remove).
    Returns None when nothing of HEAD is missing."""
    from ..integration.driver import three_way

    head = gitops.rev_parse(repo.root, "HEAD^{commit}")
    if head is None:
        return None
    with repo.lock(), repo.transaction() as env:
        staged_bytes = gitops.show_blob(repo.root, f":{MANIFEST_PATH}") or b""
        staged = Manifest.parse(staged_bytes, f"the staged {MANIFEST_PATH}")
        head_lines = _manifests(repo, [head])[head]
        found = losses(set(staged.records), {f"HEAD ({_short(head)})": head_lines})
        if not found:
            return None
        head_bytes = "".join(f"{line}\n" for line in sorted(head_lines)).encode()
        ours = Manifest.parse(head_bytes, f"HEAD:{MANIFEST_PATH}")
        state = three_way(ours, staged, head_lines)
        result = PickRepair(found)
        before = {cid for cid, _ in staged.visible_contributions()}
        after = dict(state.visible_contributions())
        lost_ids = {
            str(r.fields["id"]): str(r.fields["name"])
            for line in found[0].lines
            if (r := _parse_or_none(line)) is not None and r.op == "add"
        }
        result.removed = sorted({n for cid, n in lost_ids.items() if cid not in after})
        result.added_again = sorted(str(after[c]) for c in after if c not in before)
        result.kept = len(found[0].lines) - len(lost_ids)
        needed = [state.descriptor_address(cid) for cid in after if cid not in before]
        _, result.missing = _stage_objects(repo, [head], needed, env)
        repo.write_manifest(state, env)
    return result


def _parse_or_none(line: str) -> Record | None:
    try:
        return parse_record(line)
    except ManifestError:
        return None
