"""Rich tables and progress for the CLI: how results look, kept out of the core modules.

Everything here draws on a console the caller passes (the CLI's stderr console), so ``--json``
output on stdout stays clean.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ..bounded import display


def cell(value: Any) -> str:
    """Repository text as a table cell: control characters escaped, rich markup escaped."""
    return escape(display(value))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _bar(console: Console, *columns: ProgressColumn) -> Progress:
    """A progress bar on ``console`` that disappears when done (the result line follows)."""
    return Progress(*columns, console=console, transient=True)


@contextmanager
def byte_progress(
    console: Console, label: str, enabled: bool
) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(on_start(total), advance(n)) callbacks drawing a bar with throughput on stderr."""
    if not enabled or not console.is_terminal:
        yield (lambda total: None), (lambda n: None)
        return
    with _bar(
        console,
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(label, total=None)
        yield (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


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
    with _bar(
        console,
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
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
    # clones as columns: three of them fit an 80-column terminal
    agree = Table(title="every clone holds the same merged model", title_justify="left")
    agree.add_column("", no_wrap=True)
    for who in clones:
        agree.add_column(who)
    agree.add_row("got the others' work by", *[report["merge_order"][w] for w in clones])
    for strategy, roots in report["roots"].items():
        files = report["files"][strategy]
        agree.add_row(f"{strategy} root", *[roots[w][:12] for w in clones])
        agree.add_row(
            f"{strategy} sha256",
            *[files[w].get("model.safetensors", "?")[:12] for w in clones],
        )

    acc = Table(title="test accuracy by digit subset", title_justify="left")
    tasks = [k for k in report["accuracy"][0] if k not in ("model", "kind")]
    acc.add_column("model", no_wrap=True)
    acc.add_column("what it is", no_wrap=True)
    for t in tasks:
        acc.add_column("all" if t == "all" else t, justify="right")
    for row in report["accuracy"]:
        acc.add_row(row["model"], row["kind"], *[_pct(row[t]) for t in tasks])
    return [agree, acc]


# -- diff and show -------------------------------------------------------------------------------
def _value(v: Any) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def print_state_diff(console: Console, data: dict[str, Any]) -> None:
    console.print(f"a: {data['a']}  (root {data['merkle_root_a'][:16]})", markup=False)
    console.print(f"b: {data['b']}  (root {data['merkle_root_b'][:16]})", markup=False)
    if not (data["added"] or data["removed"] or data["renamed"] or data["registers"]):
        console.print("no difference")
        return
    for c in data["added"]:
        console.print(f"[green]+ {c['id'][:12]}  {escape(c['name'])}[/green]")
    for c in data["removed"]:
        console.print(f"[red]- {c['id'][:12]}  {escape(c['name'])}[/red]")
    for c in data["renamed"]:
        console.print(f"~ {c['id'][:12]}  {c['a']} -> {c['b']}", markup=False)
    for r in data["registers"]:
        console.print(f"{r['key']}: {_value(r['a'])} -> {_value(r['b'])}", markup=False)


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def model_diff_table(data: dict[str, Any]) -> Table:
    total = data["total"]
    table = Table(
        title=f"a: {data['a']}\nb: {data['b']}",
        title_justify="left",
        caption=(
            f"{total['tensors_differing']} of {len(data['tensors'])} tensors differ; "
            f"L2 distance {total['l2']:.6g}, {100 * total['changed']:.2f}% of "
            f"{total['elements']} elements changed"
        ),
        caption_justify="left",
    )
    table.add_column("tensor", overflow="fold")
    table.add_column("shape")
    for col in ("L2 distance", "cosine", "max |a-b|", "changed"):
        table.add_column(col, justify="right")
    for r in data["tensors"]:
        if r["status"] != "compared":
            table.add_row(cell(r["name"]), cell(r["status"]), "", "", "", "")
            continue
        table.add_row(
            cell(r["name"]),
            "x".join(map(str, r["shape"])) or "scalar",
            _num(r["l2"]),
            _num(r["cosine"], ".6f"),
            _num(r["max_abs"]),
            f"{100 * r['changed']:.1f}%",
        )
    return table


def print_show(console: Console, data: dict[str, Any]) -> None:
    title = f"contribution {data['name']}" if data["role"] == "contribution" else "base model"
    console.print(title, markup=False)
    console.print(f"id          {data['id']}")
    console.print(f"kind        {data['kind']}   weight {data['weight']}   format {data['format']}")
    console.print(
        f"size        {human_bytes(data['total_bytes'])} in {len(data['tensors'])} tensors, "
        f"{data['parameters']:,} parameters"
    )
    for add in data["added_by"]:
        where = (
            f"commit {add['commit'][:12]} {add['subject']!r} by {add['author']} ({add['date']})"
            if add["commit"]
            else "not committed yet"
        )
        console.print(f"added       {where}", markup=False)
        if add.get("message"):
            console.print(f"message     {add['message']}", markup=False)
    if data["files"]:
        console.print(f"files       {', '.join(data['files'])}", markup=False)
    for key, value in data["metadata"].items():
        console.print(f"metadata    {key} = {value}", markup=False)
    for kind, info in data["extra_inputs"].items():
        console.print(f"extra input {kind}: {_value(info)}", markup=False)
    table = Table("tensor", "dtype", "shape", "size", "chunks")
    for t in data["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        table.add_row(
            cell(t["name"]), cell(t["dtype"]), shape, human_bytes(t["bytes"]), str(t["chunks"])
        )
    console.print(table)


# -- log -----------------------------------------------------------------------------------------
def log_table(entries: list[dict[str, Any]]) -> Table:
    """``git crdt log``: one row per record, summarised (``--json`` has the records as they
    are)."""
    records = [e["record"] or {"op": "?", "line": e["line"]} for e in entries]
    names = {r["tag"]: f"{r['name']} {r['id'][:12]}" for r in records if r.get("op") == "add"}
    table = Table("commit", "subject", "op", "record")
    for e, rec in zip(entries, records, strict=True):
        op = rec.get("op", "?")
        if op == "add":
            what = f"{rec['name']} {rec['id'][:12]}"
            if rec.get("message"):
                what += f" ({rec['message']})"
        elif op == "remove":
            what = ", ".join(names.get(t, t[:12]) for t in rec["observed"])
        elif op == "set":
            value = rec["value"]
            shown = value[:12] if rec["key"] == "base" and isinstance(value, str) else value
            what = f"{rec['key']} = {_value(shown)}  (clock {rec['clock']})"
        else:
            what = _value(rec)
        table.add_row(cell((e["commit"] or "-")[:10]), cell(e["subject"]), cell(op), cell(what))
    return table


def print_plan(console: Console, plan: dict[str, Any]) -> None:
    """A dry run's plan: the inputs, one row per tensor (with the parameters that vary by
    tensor, after gradients and filters), then the estimates."""
    console.print(
        f"strategy {cell(plan['strategy'])} {cell(json.dumps(plan['params'], sort_keys=True))}, "
        f"root {plan['merkle_root'][:12]}, {plan['layers']} layers",
        soft_wrap=True,
    )
    inputs = Table("input", "name", "id", "weight")
    if plan["base"] is not None:
        inputs.add_row("base", "", plan["base"][:12], "")
    for c in plan["contributions"]:
        inputs.add_row("contribution", cell(c["name"]), c["id"][:12], f"{c['weight']:g}")
    console.print(inputs)
    varying = plan["per_tensor_params"]
    table = Table("tensor", "dtype", "shape", "size", *varying)
    for t in plan["tensors"]:
        table.add_row(
            cell(t["name"]),
            t["dtype"],
            "x".join(map(str, t["shape"])) or "scalar",
            human_bytes(t["bytes"]),
            *(cell(json.dumps(t["params"][k])) for k in varying),
        )
    console.print(table)
    console.print(
        f"{len(plan['tensors'])} tensors, {human_bytes(plan['output_bytes'])} out, "
        f"{human_bytes(plan['input_bytes'])} read; estimated memory "
        f"{human_bytes(plan['estimated_memory_bytes'])}, time about "
        f"{plan['estimated_seconds']:.3g} s (dry run: nothing written)",
        soft_wrap=True,
    )
