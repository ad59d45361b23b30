"""Reading the set: ``list``, ``status``, ``log``, ``diff``, ``show``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from ..bounded import display, display_data
from ..errors import CrdtError
from ..query import history
from ..query.show import contribution_rows
from ..replicated.repo import Repo
from ..resolution import freshness
from .app import (
    JsonOpt,
    QuietOpt,
    app,
    byte_progress,
    emit_json,
    err,
    handle_errors,
    open_repo,
)
from .render import cell, human_bytes


def say_if_stale(repo: Repo) -> None:
    try:
        state = freshness.output_state(repo)
    except CrdtError:
        return
    if not state.ok:
        err.print(f"git-crdt: note: {state.message()}", markup=False, soft_wrap=True)


@app.command("list")
def list_(json_: JsonOpt = False) -> None:
    """The visible contributions, in canonical order."""
    with handle_errors():
        repo = open_repo()
        repo.require_initialized()
        rows = contribution_rows(repo)
    if json_:
        emit_json(rows)
        return
    say_if_stale(repo)
    table = Table("name", "id", "weight", "tensors", "size")
    for r in rows:
        size = "missing" if r["bytes"] is None else human_bytes(r["bytes"])
        table.add_row(cell(r["name"]), r["id"][:12], str(r["weight"]), str(r["tensors"]), size)
    err.print(table)


@app.command()
def status(json_: JsonOpt = False) -> None:
    """Merkle root, strategy, base, output and the visible contributions."""
    with handle_errors():
        repo = open_repo()
        repo.require_initialized()
        m = repo.read_manifest()
        data: dict[str, Any] = {
            "merkle_root": m.merkle_root(),
            "strategy": m.strategy(),
            "base": m.base(),
            "output": m.output(),
            "output_dtype": m.output_dtype(),
            "contributions": [{"name": n, "id": i} for i, n in m.visible_contributions()],
            "records": len(m.records),
        }
        state = freshness.output_state(repo, m)
        data["merged"] = state.as_dict()
    if json_:
        emit_json(data)
        return
    err.print(f"merkle root  {data['merkle_root']}")
    err.print(f"merged       {state.message()}", markup=False, soft_wrap=True)
    err.print(
        f"strategy     {m.strategy()['name']} {json.dumps(m.strategy()['params'], sort_keys=True)}",
        markup=False,
    )
    err.print(f"base         {data['base'] or '(none)'}")
    err.print(f"output       {display(data['output'])}/", markup=False)
    err.print(f"output dtype {data['output_dtype'] or 'keep'}")
    table = Table("name", "id", title=f"{len(data['contributions'])} contributions")
    for c in data["contributions"]:
        table.add_row(cell(c["name"]), c["id"][:12])
    err.print(table)


@app.command()
def log(
    rev: Annotated[str, typer.Argument(help="Revision to start from.")] = "HEAD",
    json_: JsonOpt = False,
) -> None:
    """Every manifest record with the commit that introduced it.

    --json: a list of {"commit", "subject", "record": the record as a JSON object, "line": its
    canonical text in the manifest}; commit is null for a record not committed yet."""
    with handle_errors():
        repo = open_repo()
        repo.require_initialized()
        entries = history.record_log(repo, rev)
    if json_:
        emit_json([e.as_dict() for e in entries])
        return
    from .render import log_table

    err.print(log_table([e.as_dict() for e in entries]))  # cells escaped there


@app.command()
def diff(
    rev_a: Annotated[str | None, typer.Argument(help="First state (default HEAD).")] = None,
    rev_b: Annotated[str | None, typer.Argument(help="Second state (default: work tree).")] = None,
    tensors: Annotated[
        bool,
        typer.Option(
            "--tensors",
            help="Per-tensor statistics between two models: each argument is a contribution "
            "(name or id), 'base', a model file or folder, or a revision (its merged model).",
        ),
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Contributions added and removed and register changes between two states; with
    --tensors, L2 distance, cosine similarity, max |difference| and fraction changed per
    tensor."""
    from .render import model_diff_table, print_state_diff

    with handle_errors():
        repo = open_repo()
        repo.require_initialized()
        if not tensors:
            from ..query.diff import state_diff

            data = state_diff(repo, rev_a or "HEAD", rev_b)
        else:
            from ..query import tensordiff as diffs

            a = diffs.open_model(repo, rev_a or "HEAD")
            b = diffs.open_model(repo, rev_b) if rev_b else diffs.work_tree_model(repo)
            with byte_progress("diff", not (json_ or quiet)) as (start, advance):
                start(diffs.model_bytes(a))
                data = diffs.model_diff(a, b, advance)
    if json_:
        emit_json(data)
    elif tensors:
        err.print(model_diff_table(display_data(data)))
    else:
        print_state_diff(err, display_data(data))


@app.command()
def show(
    name_or_id: Annotated[str, typer.Argument(help="Contribution name or id prefix, or 'base'.")],
    json_: JsonOpt = False,
) -> None:
    """A contribution's descriptor, tensors, sizes, extra inputs and the commit that added it."""
    from ..query.show import show as do_show
    from .render import print_show

    with handle_errors():
        repo = open_repo()
        data = do_show(repo, name_or_id)
    if json_:
        emit_json(data)
    else:
        print_show(err, display_data(data))
