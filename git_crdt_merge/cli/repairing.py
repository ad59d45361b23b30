"""``repair``, ``restore-records``, ``revert``: bringing a damaged set back."""

from __future__ import annotations

from typing import Annotated

import typer

from ..git import commands as gitops
from ..replicated import invariants
from ..replicated.manifest import MANIFEST_PATH
from .app import (
    JsonOpt,
    app,
    emit_json,
    err,
    handle_errors,
    open_repo,
)


@app.command()
def repair(
    drop_invalid: Annotated[
        bool, typer.Option(help="Set unparseable lines aside in .git/crdt/ instead of failing.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Only report what would be written.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Rebuild .crdt/manifest from a damaged file (e.g. conflict markers): the union of both
    sides, as the merge driver would have made it; then stage it."""
    from ..replicated.repair import repair_manifest

    with handle_errors():
        result, saved = repair_manifest(open_repo(), drop_invalid=drop_invalid, dry_run=dry_run)
    info = {
        "records": result.records,
        "conflict_markers": result.markers,
        "invalid_lines": len(result.invalid),
        "invalid_saved_to": str(saved) if saved else None,
        "written": not dry_run,
    }
    if json_:
        emit_json(info)
    else:
        err.print(
            f"manifest rebuilt: {result.records} records, {result.markers} conflict marker "
            "lines dropped" + ("" if not dry_run else " (dry run, nothing written)")
        )
        if saved:
            err.print(f"{len(result.invalid)} unparseable lines saved to {saved}", markup=False)


@app.command("restore-records")
def restore_records(
    from_: Annotated[
        list[str] | None,
        typer.Option(
            "--from",
            help="Take records from this commit (default: HEAD, its parents and MERGE_HEAD).",
        ),
    ] = None,
    remove: Annotated[
        bool,
        typer.Option(
            "--remove", help="Also record an observed remove of the restored contributions."
        ),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Bring back manifest records that were lost (a text merge without the driver, a plain
    'git revert', a deleted line), with their objects; stage them.

    With --remove they come back removed: what a deleted add line meant, as an observed
    remove that every clone applies."""
    with handle_errors():
        result = invariants.restore_records(open_repo(), from_ or [], remove=remove)
    if json_:
        emit_json(result.as_dict())
        return
    if not result.records:
        err.print("no lost records: nothing to restore")
        return
    err.print(f"restored {result.records} record(s) and {result.objects} object(s); staged")
    if result.removed:
        err.print("recorded a remove of: " + ", ".join(result.removed), markup=False)
    if result.missing:
        err.print(
            "git-crdt: warning: objects not found for "
            + ", ".join(c[:12] for c in result.missing)
            + ": fetch the commit that has them, or 'git crdt remove-contribution' them",
            markup=False,
        )
    err.print("now commit (or 'git commit --amend' the commit that lost them)")


@app.command()
def revert(
    commit: Annotated[str, typer.Argument(help="The commit whose manifest change to undo.")],
    no_commit: Annotated[
        bool, typer.Option("--no-commit", "-n", help="Only stage the change.")
    ] = False,
) -> None:
    """Undo a commit's manifest change the CRDT way: its adds get an observed remove, its
    removes a new add, its register writes the previous value.  A plain 'git revert' of an
    add gets the same remove from the hooks, after a stop to commit it."""
    with handle_errors():
        repo = open_repo()
        done = invariants.revert(repo, commit)
        if not done:
            err.print(f"nothing to revert: the state already undoes {commit}", markup=False)
            return
        if not no_commit:
            sha = gitops.commit_of(repo.root, commit) or commit
            subject = gitops.commit_subject(repo.root, sha)
            message = f'Revert "{subject}"\n\nThis reverts commit {sha} (git crdt revert).\n'
            gitops.commit_paths(repo.root, message, [MANIFEST_PATH])
    err.print("; ".join(done) + ("" if no_commit else "; committed"), markup=False)
