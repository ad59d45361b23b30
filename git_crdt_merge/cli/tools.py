"""``merge-driver``, ``demo``, ``completion``, ``man``, ``version``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..errors import UsageError
from .app import (
    JsonOpt,
    QuietOpt,
    app,
    emit_json,
    err,
    handle_errors,
)


@app.command("merge-driver", context_settings={"ignore_unknown_options": True})
def merge_driver(args: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """The git merge driver (%O %A %B %L %P); git calls it, you need not."""
    from ..integration.driver import main as driver_main

    raise typer.Exit(driver_main(args or []))


@app.command()
def demo(
    keep: Annotated[
        Path | None,
        typer.Option("--keep", help="Leave the repositories in this folder (new or empty)."),
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a digits classifier, fine-tune it in three clones, merge in different orders,
    and show that every clone gets the same model (offline, about a minute)."""
    import shutil
    import signal
    import tempfile

    from ..demo import STEPS, require_dependencies, run_demo
    from .render import demo_tables, step_progress

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so the temporary folder is removed on a closed terminal too

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupted)
    with handle_errors():
        require_dependencies()
        if keep is not None and keep.exists() and any(keep.iterdir()):
            raise UsageError(f"--keep {keep}: the folder exists and is not empty")
        work = keep if keep is not None else Path(tempfile.mkdtemp(prefix="git-crdt-demo-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            with step_progress(err, len(STEPS), not (json_ or quiet)) as step:
                report = run_demo(work.resolve(), kept=keep is not None, step=step).as_dict()
            if keep is not None:
                (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        finally:
            if keep is None:
                shutil.rmtree(work, ignore_errors=True)
    if json_:
        emit_json(report)
        return
    if not quiet:
        for table in demo_tables(report):
            err.print(table)
        err.print(
            "Each fine-tune is best on its own digits and forgets the others; the merged "
            "models recover all of them. Three clones merged in different orders (merge, "
            "rebase) and got the same Merkle root and byte-identical files, with no "
            f"coordination. Done in {report['seconds']:.0f} s.",
            markup=False,
        )
        if keep is not None:
            err.print(
                f"Repositories kept in {keep}: try 'cd {keep}/alice && git crdt status'",
                markup=False,
            )


@app.command()
def completion(
    path: Annotated[bool, typer.Option("--path", help="Print the script's path instead.")] = False,
) -> None:
    """Print the bash completion script for 'git crdt <TAB>' and 'git-crdt <TAB>'.

    Add 'source "$(git-crdt completion --path)"' to ~/.bashrc, after git's own completion."""
    from .docs import BASH_COMPLETION

    sys.stdout.write(f"{BASH_COMPLETION}\n" if path else BASH_COMPLETION.read_text())


@app.command("man")
def man_(
    path: Annotated[bool, typer.Option("--path", help="Print the page's path instead.")] = False,
) -> None:
    """Show the manual page, which 'git crdt --help' opens (it needs the page on MANPATH;
    this works without); plain text when 'man' is not installed."""
    import shutil
    import subprocess

    from .docs import MAN_PAGE, markdown

    if path:
        sys.stdout.write(f"{MAN_PAGE}\n")
        return
    if shutil.which("man"):
        raise typer.Exit(subprocess.call(["man", "-l", str(MAN_PAGE)]))
    sys.stdout.write(markdown(app))


@app.command()
def version() -> None:
    """Print the version."""
    sys.stdout.write(f"git-crdt-merge {__version__}\n")
