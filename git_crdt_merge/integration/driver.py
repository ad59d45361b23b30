"""The merge driver: ``git-crdt merge-driver %O %A %B %L %P``.

Git calls it when both sides changed ``.crdt/manifest`` (merge, rebase, cherry-pick, revert,
stash pop, ...).  It writes ``ours ∪ (theirs ∖ base)`` to ``%A`` and exits 0:

- in a true merge of grow-only histories the base is in both sides, so that is the join
  ``ours ∪ theirs`` (commutative: it does not depend on which side is ours, so criss-cross
  merges and merges in either direction give the same bytes);
- in a pick (cherry-pick, every rebase, ``am -3``, ``stash pop``) %O is the picked commit's
  parent and %B the picked commit, so ``theirs ∖ base`` is exactly the picked change: records
  of commits that were left out (``rebase --onto``, a dropped commit in ``rebase -i``) do not
  come back, just as git leaves their objects out of the tree;
- in ``git revert`` %O is the reverted commit and %B its parent, so ``base ∖ theirs`` is what
  the reverted commit added.  A deleted add becomes an observed remove of its tag and a deleted
  remove a new add of what it removed (the CRDT inverse; register writes are left as they are:
  ``git crdt revert`` sets them back).  Their tags are derived from the deleted lines, so two
  clones reverting the same commit write the same records.  Git calls the driver for a revert
  only when the manifest changed since the reverted commit; otherwise it would delete the line
  itself, and ``prepare-commit-msg`` stages this function's answer instead and stops the pick
  (:func:`invariants.repair_pick`).

The ancestor is read as a set of lines and never validated: a malformed ancestor only means
nothing is subtracted.  A remove from theirs that observes only tags absent from the result (the
pick of a remove whose add is not on this branch) is a no-op and is left out; one that observes
some present and some absent tags cannot be applied and is a conflict.

If a side is malformed it exits 1 with a one-line message and writes both sides, verbatim,
between conflict markers into ``%A``: git records a conflict and nothing is dropped
(``git crdt repair`` rebuilds the manifest from such a file).  Imports neither torch nor typer.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import blake3

from .. import bounded, faults
from ..errors import CrdtError, ManifestError
from ..git import commands as gitops
from ..replicated.manifest import (
    MANIFEST_PATH,
    MAX_MANIFEST_BYTES,
    Manifest,
    Record,
    add_record,
    parse_record,
    remove_record,
)

USAGE = "usage: git-crdt merge-driver ANCESTOR OURS THEIRS [MARKER_SIZE [PATH]]"


def merge_files(ours: Path, theirs: Path, label: str, base: Path | None = None) -> bytes:
    """``ours ∪ (theirs ∖ base)`` of three manifest files, canonical; raises ManifestError
    naming the bad side.  Without ``base`` it is the join."""
    a = Manifest.parse(_read(ours, f"{label} (ours)"), f"{label} (ours)")
    b = Manifest.parse(_read(theirs, f"{label} (theirs)"), f"{label} (theirs)")
    base_lines = _lines(base)
    return three_way(a, b, base_lines).serialize()


def _read(path: Path, what: str) -> bytes:
    """One side of the merge: a bounded read of the regular file git wrote (a hostile side
    can be as large as git can store; the manifest limit applies, as everywhere)."""
    return bounded.read_regular(path, MAX_MANIFEST_BYTES, what)


def _lines(path: Path | None) -> set[str]:
    if path is None:
        return set()
    try:
        data = _read(path, "the merge base")
    except (OSError, CrdtError):
        return set()
    return set(data.decode("utf-8", errors="replace").split("\n")) - {""}


def derived_tag(kind: str, lines: list[str]) -> str:
    """A tag that is a function of what it answers (so every clone writes the same record)."""
    return blake3.blake3(kind.encode() + b"\0" + "\n".join(sorted(lines)).encode()).hexdigest()[:32]


def inverse_of_deleted(ours: Manifest, deleted: list[str]) -> list[Record]:
    """What ``theirs`` deleted from ``base`` (a revert), as records: an observed remove of the
    deleted adds still live in ours, a new add for each contribution a deleted remove hid."""
    live = {r.tag for r in ours.visible_adds()}
    recs = [parse_record(line) for line in deleted]
    out: list[Record] = []
    tags = sorted(r.tag for r in recs if r.op == "add" and r.tag in live)
    if tags:
        out.append(remove_record(derived_tag("revert-add", tags), tags))
    visible = {cid for cid, _ in ours.visible_contributions()}
    by_tag = {r.tag: r for r in ours.adds()}
    for r in recs:
        if r.op != "remove":
            continue
        for tag in r.fields["observed"]:
            add = by_tag.get(tag)
            if add is not None and add.fields["id"] not in visible and tag not in tags:
                cid, name = str(add.fields["id"]), str(add.fields["name"])
                desc = add.fields.get("desc")  # format 2: the descriptor it names
                tag2 = derived_tag("revert-remove", [r.line, tag])
                out.append(add_record(tag2, cid, name, desc=None if desc is None else str(desc)))
                visible.add(cid)
    return out


def three_way(ours: Manifest, theirs: Manifest, base_lines: set[str]) -> Manifest:
    """``ours ∪ (theirs ∖ base)``, without removes that observe nothing present, plus the
    inverse of what theirs deleted from base (see above)."""
    picked = [r for line, r in theirs.records.items() if line not in base_lines]
    deleted = sorted(
        line for line in base_lines if line in ours.records and line not in theirs.records
    )
    if deleted:
        ours = ours.with_records(inverse_of_deleted(ours, deleted))
    records = dict(ours.records)
    records.update((r.line, r) for r in picked if r.op != "remove")
    present = {r.tag for r in records.values() if r.op == "add"}
    for r in picked:
        if r.op != "remove":
            continue
        observed = set(r.fields["observed"])
        if observed <= present:
            records[r.line] = r
        elif observed & present:
            raise ManifestError(
                f"a remove (tag {r.tag}) observes some tags that this side lacks: it cannot be "
                "applied here"
            )
    state = Manifest(records)
    state._check_consistency("merged manifest")
    return state


def conflict_text(ours: bytes, theirs: bytes, marker_size: int) -> bytes:
    def block(data: bytes) -> bytes:
        return data if not data or data.endswith(b"\n") else data + b"\n"

    return (
        b"<" * marker_size
        + b" ours\n"
        + block(ours)
        + b"=" * marker_size
        + b"\n"
        + block(theirs)
        + b">" * marker_size
        + b" theirs\n"
    )


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` (git's %A) atomically.  The temporary file lives in ``.git/crdt/``, so a
    driver killed half-way leaves nothing in the work tree (the next git-crdt writer removes
    it); beside %A only when the two are on different file systems."""
    name = f"merge-driver-{os.getpid()}.tmp"
    try:
        state = gitops.common_dir(Path.cwd()) / "crdt"
        state.mkdir(exist_ok=True)
        tmp = state / name
    except (CrdtError, OSError):
        tmp = path.with_name(f"{path.name}.{name}")
    tmp.write_bytes(data)
    faults.point("driver:tmp-written")
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno != errno.EXDEV:
            raise
        tmp = path.with_name(f"{path.name}.{name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2 if len(argv) < 3 else 0
    base, ours, theirs = Path(argv[0]), Path(argv[1]), Path(argv[2])
    marker_size = int(argv[3]) if len(argv) > 3 and argv[3].isdigit() else 7
    label = argv[4] if len(argv) > 4 else MANIFEST_PATH
    try:
        merged = merge_files(ours, theirs, label, base)
    except CrdtError as exc:
        print(f"git-crdt merge-driver: {exc}", file=sys.stderr)
        try:  # both sides, for the user to resolve; a side over the limit stays as it is
            sides = _read(ours, "ours"), _read(theirs, "theirs")
            _write(ours, conflict_text(*sides, marker_size))
        except (OSError, CrdtError):
            pass
        return 1
    except OSError as exc:
        print(f"git-crdt merge-driver: {exc}", file=sys.stderr)
        return 2
    _write(ours, merged)
    return 0
