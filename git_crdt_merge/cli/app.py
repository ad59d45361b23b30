"""The ``git crdt`` app and what its commands share: options, errors, JSON, progress.

The commands are in one module per group beside this one (``wiring``, ``writing``,
``resolving``, ``reading``, ``repairing``, ``checking``, ``tools``); importing the
:mod:`git_crdt_merge.cli` package registers them, in the order ``git crdt -h`` lists them.

Human output and progress go to stderr; ``--json`` output goes to stdout.  Every
:class:`~git_crdt_merge.errors.CrdtError` becomes one line on stderr and its exit code
(table in docs/errors.md).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

import typer
from rich.console import Console

from ..bounded import display
from ..errors import CrdtError, UsageError
from ..integration import install as installer
from ..replicated.repo import Repo
from ..sizes import parse_size
from . import render

err = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="git-crdt",
    help="Order-free git merges of fine-tuned models (git-crdt-merge).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes.")]


def size_arg(text: str | None, what: str, low: int = 0, high: int | None = None) -> int | None:
    """A size option's value in bytes (``50MB``, ``2GiB``, ``500000000``: :mod:`..sizes`),
    within ``[low, high]``; a bad one is a one-line usage error."""
    if text is None:
        return None
    with handle_errors():
        size = parse_size(text, what)
        if size < low or (high is not None and size > high):
            upper = f" to {high} bytes" if high is not None else " bytes or more"
            raise UsageError(f"{what} must be {low}{upper}, got {text!r} ({size} bytes)")
        return size
    raise AssertionError  # pragma: no cover - handle_errors exits


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fail(exc: CrdtError) -> typer.Exit:
    err.print(f"git-crdt: error: {display(exc)}", markup=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


@contextmanager
def handle_errors() -> Iterator[None]:
    try:
        yield
    except CrdtError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        err.print("git-crdt: interrupted")
        raise typer.Exit(130) from None


@contextmanager
def byte_progress(
    label: str, enabled: bool
) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(on_start(total), advance(n)) callbacks drawing a byte bar on stderr (render.py)."""
    with render.byte_progress(err, label, enabled) as callbacks:
        yield callbacks


class Reported(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Reported)
Callbacks = Callable[[int], None]


def run_reported(
    label: str,
    call: Callable[[Callbacks, Callbacks], R],
    describe: Callable[[R], None],
    *,
    json_: bool,
    quiet: bool,
    show: bool | None = None,
) -> R:
    """A long command's run: ``call(on_start, progress)`` under one-line errors with a byte
    bar labelled ``label`` (unless ``show`` is false, by default when ``--json``/``--quiet``),
    then its result on stdout as JSON (``--json``), told by ``describe`` on stderr, or nothing
    (``--quiet``)."""
    with (
        handle_errors(),
        byte_progress(label, not (json_ or quiet) if show is None else show) as (
            start,
            advance,
        ),
    ):
        result = call(start, advance)
    if json_:
        emit_json(result.as_dict())
    elif not quiet:
        describe(result)
    return result


def open_repo(*, tidy: bool = False) -> Repo:
    """The repository of the current directory; ``tidy`` (commands that write the set or the
    model) first takes chunk files a ``git stash pop`` left in the work tree out again."""
    repo = Repo.open(Path.cwd())
    if tidy:
        installer.drop_chunk_files(repo.root)
    return repo


def run() -> None:
    if os.environ.get("NO_COLOR"):
        err.no_color = True
    app()
