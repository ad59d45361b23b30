"""Rich tables and progress for the CLI: how results look, kept out of the core modules.

Everything here draws on a console the caller passes (the CLI's stderr console), so ``--json``
output on stdout stays clean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def step_progress(console: Console, total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A ``step(description)`` callback: a bar with the current step on a terminal, one line
    per step otherwise (logs, CI), nothing when disabled."""
    if not enabled:
        yield lambda msg: None
        return
    if not console.is_terminal:
        count = [0]

        def line(msg: str) -> None:
            count[0] += 1
            console.print(f"[{count[0]}/{total}] {msg}", markup=False, highlight=False)

        yield line
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=total)
        started = [False]

        def advance(msg: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=msg)

        yield advance
        bar.update(task, completed=total)


# -- demo ----------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def demo_tables(report: dict[str, Any]) -> list[Table]:
    """The clones-agree table and the accuracy table of ``git crdt demo``."""
    clones = report["clones"]
    agree = Table(title="every clone holds the same merged model", title_justify="left")
    agree.add_column("clone")
    agree.add_column("how it got the others' work")
    for strategy in report["roots"]:
        agree.add_column(f"{strategy}\nMerkle root", no_wrap=True)
        agree.add_column(f"{strategy}\nfile sha256", no_wrap=True)
    for who in clones:
        cells = [who, report["merge_order"][who]]
        for strategy, roots in report["roots"].items():
            files = report["files"][strategy][who]
            cells += [roots[who][:10], files.get("model.safetensors", "?")[:10]]
        agree.add_row(*cells)

    acc = Table(title="test accuracy by digit subset", title_justify="left")
    tasks = [k for k in report["accuracy"][0] if k not in ("model", "kind")]
    acc.add_column("model", no_wrap=True)
    acc.add_column("what it is", no_wrap=True)
    for t in tasks:
        acc.add_column("all" if t == "all" else t, justify="right")
    for row in report["accuracy"]:
        acc.add_row(row["model"], row["kind"], *[_pct(row[t]) for t in tasks])
    return [agree, acc]
