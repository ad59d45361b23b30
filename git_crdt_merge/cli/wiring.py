"""``init``, ``install``, ``clone``, ``uninstall``, ``doctor``: wiring a clone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..integration import install as installer

if TYPE_CHECKING:
    from ..integration.clone import CloneResult
from .app import (
    JsonOpt,
    QuietOpt,
    app,
    emit_json,
    err,
    handle_errors,
    run_reported,
)

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Where chunks are stored: git (blobs, any remote) or lfs (Git LFS objects, "
        "for hosted remotes; docs/hosting.md).",
    ),
]


@app.command()
def init(storage: StorageOpt = None, quiet: QuietOpt = False) -> None:
    """Set up this repository: .crdt/, the .gitattributes binding, driver and hooks."""
    with handle_errors():
        notes = installer.init(Path.cwd(), storage=storage)
    _print_notes(notes, "initialised git-crdt in this repository", quiet)


@app.command()
def storage(
    mode: Annotated[
        str | None, typer.Argument(help="git or lfs; without it, show the current mode.")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Show or switch where new chunks are stored (git blobs or Git LFS objects).

    The mode is recorded in .crdt/storage (staged: commit it so every clone agrees). Chunks
    stored before keep their form; both forms are read."""
    with handle_errors():
        if mode is None:
            sys.stdout.write(installer.storage_mode(Path.cwd()) + "\n")
            return
        notes = installer.set_storage(Path.cwd(), mode)
    if not quiet:
        for note in notes:
            err.print(note, markup=False)


@app.command()
def install(
    global_: Annotated[
        bool, typer.Option("--global", help="Register the driver for the user.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Register the merge driver and the hooks in this clone (idempotent).

    Also sets what git needs to move the chunks undeflated and without delta search (push,
    fetch, clone, gc); in a bare repository (a remote) it sets only that."""
    with handle_errors():
        notes = installer.install(Path.cwd(), global_=global_)
    _print_notes(notes, "git-crdt installed", quiet)


def _print_notes(notes: list[str], done: str, quiet: bool) -> None:
    """The installer's notes, then ``done``; nothing with --quiet."""
    if not quiet:
        for note in notes:
            err.print(note, markup=False)
        err.print(done)


@app.command()
def clone(
    url: Annotated[str, typer.Argument(help="The repository to clone (any git URL or path).")],
    directory: Annotated[
        Path | None, typer.Argument(help="The new folder (default: from the URL, as git).")
    ] = None,
    branch: Annotated[
        str | None, typer.Option("--branch", "-b", help="Check out this branch or tag.")
    ] = None,
    depth: Annotated[
        int | None, typer.Option("--depth", min=1, help="A shallow clone of N commits.")
    ] = None,
    filter_: Annotated[
        str | None,
        typer.Option("--filter", help="A partial clone, e.g. blob:none (git clone --filter)."),
    ] = None,
    origin: Annotated[
        str | None, typer.Option("--origin", "-o", help="Name of the remote (default origin).")
    ] = None,
    single_branch: Annotated[
        bool, typer.Option("--single-branch", help="Fetch only one branch's history.")
    ] = False,
    no_tags: Annotated[bool, typer.Option("--no-tags", help="Fetch no tags.")] = False,
    shallow_since: Annotated[
        str | None, typer.Option("--shallow-since", help="A shallow clone since DATE.")
    ] = None,
    reference: Annotated[
        str | None, typer.Option("--reference", help="Borrow objects from this repository.")
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="KEY=VALUE set in the new clone (repeatable)."),
    ] = None,
    no_resolve: Annotated[
        bool, typer.Option("--no-resolve", help="Check out, but do not resolve the model.")
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Clone, install and check out without ever writing a chunk into the work tree.

    Like 'git lfs clone': 'git clone --no-checkout', then 'git crdt install' in the new
    clone (driver, hooks, transport settings, sparse checkout excluding .crdt/objects/), then
    the checkout and the merged model. A plain 'git clone' writes every chunk into the work
    tree first."""
    from ..integration.clone import clone as do_clone

    args: list[str] = []
    for flag, value in (
        ("--branch", branch),
        ("--depth", depth),
        ("--filter", filter_),
        ("--origin", origin),
        ("--shallow-since", shallow_since),
        ("--reference", reference),
    ):
        if value is not None:
            args.append(f"{flag}={value}")
    args += ["--single-branch"] if single_branch else []
    args += ["--no-tags"] if no_tags else []
    args += [f"--config={c}" for c in config or []]
    args += ["--quiet"] if quiet or json_ else []
    show = not (quiet or json_) and err.is_terminal
    run_reported(
        "resolve",
        lambda start, advance: do_clone(
            url,
            directory,
            cwd=Path.cwd(),
            clone_args=args,
            resolve=not no_resolve,
            show_progress=show,
            on_start=start,
            progress=advance,
        ),
        _describe_clone,
        json_=json_,
        quiet=quiet,
        show=show,
    )


def _describe_clone(result: CloneResult) -> None:
    for note in result.notes:
        err.print(note, markup=False)
    if result.resolved and not result.resolved["empty"]:
        where = Path(result.resolved["output"])
        rel = where.relative_to(result.path) if where.is_relative_to(result.path) else where
        err.print(f"merged model in {rel}/", markup=False)
    err.print(f"cloned into {result.path} (chunks kept out of the work tree)", markup=False)


@app.command()
def uninstall(
    global_: Annotated[
        bool, typer.Option("--global", help="Remove the user-level driver.")
    ] = False,
) -> None:
    """Remove the merge driver and our hooks (chained hooks are restored)."""
    with handle_errors():
        installer.uninstall(Path.cwd(), global_=global_)
    err.print("git-crdt uninstalled")


@app.command()
def doctor(
    remote: Annotated[
        str | None,
        typer.Option(
            "--remote",
            help="Also check a remote on this machine (a remote's name, a path or a file:// "
            "URL): would it deflate the chunks again or search them for deltas?",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Report what is missing or broken; exit 1 if anything is.

    Also runs in a bare repository (a remote), where it checks the transport settings."""
    d = installer.doctor(Path.cwd(), remote=remote)
    if json_:
        emit_json({"ok": d.ok, "problems": d.problems})
    else:
        for line in d.ok:
            err.print(f"[green]ok[/green]      {line}")
        for line in d.problems:
            err.print(f"[red]problem[/red] {line}")
    if d.problems:
        raise typer.Exit(1)
