"""The ``git crdt`` command line: parse, call the core, render.

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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..bounded import display, display_data
from ..errors import CrdtError, UsageError
from ..git import commands as gitops
from ..integration import install as installer
from ..query import history
from ..query.show import contribution_rows
from ..replicated import contributions, invariants
from ..replicated.manifest import MANIFEST_PATH
from ..replicated.repo import Repo
from ..replicated.store import DEFAULT_CHUNK_SIZE, MAX_OBJECT_BYTES
from ..resolution import freshness
from ..resolution.cache import DEFAULT_MAX_SHARD
from . import render
from .render import cell, human_bytes

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


def open_repo(*, tidy: bool = False) -> Repo:
    """The repository of the current directory; ``tidy`` (commands that write the set or the
    model) first takes chunk files a ``git stash pop`` left in the work tree out again."""
    repo = Repo.open(Path.cwd())
    if tidy:
        installer.drop_chunk_files(repo.root)
    return repo


# -- set-up ------------------------------------------------------------------------------------
@app.command()
def init(quiet: QuietOpt = False) -> None:
    """Set up this repository: .crdt/, the .gitattributes binding, driver and hooks."""
    with handle_errors():
        notes = installer.init(Path.cwd())
    if not quiet:
        for note in notes:
            err.print(note, markup=False)
        err.print("initialised git-crdt in this repository")


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
    if not quiet:
        for note in notes:
            err.print(note, markup=False)
        err.print("git-crdt installed")


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
    with handle_errors(), byte_progress("resolve", show) as (start, advance):
        result = do_clone(
            url,
            directory,
            cwd=Path.cwd(),
            clone_args=args,
            resolve=not no_resolve,
            show_progress=show,
            on_start=start,
            progress=advance,
        )
    if json_:
        emit_json(result.as_dict())
    elif not quiet:
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


# -- writing the set ---------------------------------------------------------------------------
@app.command("add-contribution")
def add_contribution(
    path: Annotated[Path, typer.Argument(help="A .safetensors file or a Hugging Face directory.")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Display name.")] = None,
    weight: Annotated[float | None, typer.Option("--weight", "-w", help="Merge weight.")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="A note.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept .bin/.pt/.pth/.ckpt.")] = False,
    chunk_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_OBJECT_BYTES,
            help="Largest object in bytes, instead of the repository's (see 'chunk-size'); "
            "never changes the id.",
        ),
    ] = None,
    fisher: Annotated[
        Path | None, typer.Option("--fisher", help="Fisher diagonals (.safetensors).")
    ] = None,
    gram: Annotated[
        Path | None, typer.Option("--gram", help="RegMean Gram matrices (.safetensors).")
    ] = None,
    extra: Annotated[
        list[str] | None, typer.Option("--extra", help="Extra input KIND=FILE.safetensors")
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_nonfinite: Annotated[bool, typer.Option(help="Accept NaN or Inf values.")] = False,
) -> None:
    """Store a fine-tuned model as a contribution (staged, like git add).

    Extra inputs that some strategies need (Fisher diagonals, Gram matrices) are stored with
    it and become part of its content."""
    with handle_errors(), byte_progress("ingest", not (json_ or quiet)) as (start, advance):
        extra_inputs = contributions.parse_extra_inputs(fisher=fisher, gram=gram, extra=extra)
        result = contributions.add_contribution(
            open_repo(tidy=True),
            path,
            name=name,
            weight=weight,
            message=message,
            allow_pickle=allow_pickle,
            chunk_size=chunk_size,
            on_start=start,
            progress=advance,
            extra_inputs=extra_inputs,
            allow_nonfinite=allow_nonfinite,
        )
    if json_:
        emit_json(result.as_dict())
    elif not quiet:
        what = "already present" if result.already_present else "added"
        err.print(
            f"{what}: {result.name} {result.id[:12]} ({result.tensors} tensors, "
            f"{human_bytes(result.bytes)}, {human_bytes(result.new_bytes)} new)",
            markup=False,
        )


@app.command("set-weight")
def set_weight(
    name_or_id: Annotated[str, typer.Argument(help="Contribution name or id prefix.")],
    weight: Annotated[float, typer.Argument(help="The new merge weight.")],
    json_: JsonOpt = False,
) -> None:
    """Change a contribution's weight without storing its tensors again.

    Records an observed remove of the old contribution and an add of a new descriptor that
    reuses its chunks; the id changes, since the weight is part of the content."""
    with handle_errors():
        old, new = contributions.set_weight(open_repo(), name_or_id, weight)
    if json_:
        emit_json({"old": old, "new": new, "weight": weight})
    elif old == new:
        err.print(f"{old[:12]} already has weight {weight:g}", markup=False)
    else:
        err.print(f"weight {weight:g}: {old[:12]} -> {new[:12]}", markup=False)


@app.command("chunk-size")
def chunk_size(
    size: Annotated[
        int | None,
        typer.Argument(min=1, max=MAX_OBJECT_BYTES, help="Bytes per chunk (omit to show it)."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Show or set the repository's chunk size (a replicated register; default 64 MiB).

    A storage choice: contributions are named by their content, so a model added with any
    chunk size has the same id."""
    with handle_errors():
        repo = open_repo()
        if size is not None:
            contributions.set_chunk_size(repo, size)
        current = repo.read_manifest().chunk_size()
    value = current or DEFAULT_CHUNK_SIZE
    if json_:
        emit_json({"chunk_size": value, "default": current is None})
    else:
        how = " (default)" if current is None else ""
        err.print(f"chunk size {value} bytes{how}", markup=False)


@app.command("remove-contribution")
def remove_contribution(
    name_or_id: Annotated[str, typer.Argument(help="Contribution name or id prefix.")],
    json_: JsonOpt = False,
) -> None:
    """Remove a contribution (observed-remove: concurrent re-adds survive)."""
    with handle_errors():
        cid = contributions.remove_contribution(open_repo(tidy=True), name_or_id)
    if json_:
        emit_json({"removed": cid})
    else:
        err.print(f"removed {cid[:12]}")


@app.command("set-base")
def set_base(
    path: Annotated[Path, typer.Argument(help="The base model (file or directory).")],
    allow_pickle: Annotated[bool, typer.Option(help="Accept .bin/.pt/.pth/.ckpt.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_nonfinite: Annotated[bool, typer.Option(help="Accept NaN or Inf values.")] = False,
) -> None:
    """Store the base model and record it in the 'base' register."""
    with handle_errors(), byte_progress("ingest", not (json_ or quiet)) as (start, advance):
        result = contributions.set_base(
            open_repo(tidy=True),
            path,
            allow_pickle=allow_pickle,
            on_start=start,
            progress=advance,
            allow_nonfinite=allow_nonfinite,
        )
    if json_:
        emit_json(result.as_dict())
    elif not quiet:
        err.print(f"base set to {result.id[:12]} ({result.tensors} tensors)")


@app.command()
def strategy(
    name: Annotated[str, typer.Argument(help="Strategy name (see 'git crdt strategies').")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE")] = None,
) -> None:
    """Choose the merge strategy and its parameters (a replicated register).

    A per-contribution parameter takes one value for all (density=0.5) or a JSON object by
    contribution name or id (density='{"math": 0.3, "code": 0.7}')."""
    with handle_errors():
        from ..resolution.choice import choose_strategy

        value, warning = choose_strategy(open_repo(), name, param or [])
    err.print(
        f"strategy set to {value['name']} {json.dumps(value['params'], sort_keys=True)}",
        markup=False,
    )
    if warning:
        err.print(
            f"git-crdt: warning: {warning}: the current set cannot be resolved with it, and "
            "merged/ stays stale until the set or the strategy changes",
            markup=False,
            soft_wrap=True,
        )


@app.command()
def strategies(json_: JsonOpt = False) -> None:
    """The registered merge strategies, their parameters and input contracts."""
    from ..strategies import registry

    rows: list[dict[str, Any]] = []
    for st in registry.all_strategies():
        rows.append(
            {
                "name": st.name,
                "aliases": list(st.aliases),
                "base": st.base,
                "min_inputs": st.min_inputs,
                "max_inputs": st.max_inputs,
                "stochastic": st.stochastic,
                "uses_weights": st.uses_weights,
                "extra_inputs": list(st.extra_inputs),
                "statistics_pass": st.model_pass is not None,
                "side_output": st.side_output,
                "summary": st.summary,
                "params": [
                    {
                        "name": p.name,
                        "type": p.type.__name__,
                        "default": None if p.default is registry.REQUIRED else p.default,
                        "required": p.default is registry.REQUIRED,
                        "per_contribution": p.per_contribution,
                        "help": p.help,
                        **({"range": p.range_text()} if p.type in (int, float) else {}),
                    }
                    for p in st.params
                ],
            }
        )
    if json_:
        emit_json(rows)
        return
    table = Table("name", "base", "inputs", "weights", "parameters (default)", "summary")
    for r in rows:
        inputs = f"{r['min_inputs']}..{r['max_inputs'] or 'n'}"
        params = ", ".join(
            f"{p['name']}{'*' if p['per_contribution'] else ''}"
            f"={'REQUIRED' if p['required'] else p['default']}"
            for p in r["params"]
        )
        names = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        weights = "yes" if r["uses_weights"] else "no (refused)"
        table.add_row(names, r["base"], inputs, weights, params, r["summary"])
    err.print(table)
    err.print("* per-contribution parameter", markup=False)


@app.command()
def resolve(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder (default: the register).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    compute_dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    max_shard_size: Annotated[
        int, typer.Option(min=1, help="Largest output shard in bytes.")
    ] = DEFAULT_MAX_SHARD,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute the merged model of the visible set (a no-op on a cache hit)."""
    from ..resolution.resolve import resolve as do_resolve

    if device not in ("cpu", "cuda"):
        raise fail(UsageError(f"--device must be cpu or cuda, not {device!r}"))
    with handle_errors(), byte_progress("resolve", not (json_ or quiet)) as (start, advance):
        outcome = do_resolve(
            open_repo(tidy=True),
            output=output,
            device=device,
            compute_dtype=compute_dtype,
            max_shard=max_shard_size,
            on_start=start,
            progress=advance,
        )
    if json_:
        emit_json(outcome.as_dict())
    elif not quiet:
        if outcome.empty:
            err.print("no visible contributions: nothing to resolve")
        else:
            how = "cache hit" if outcome.cache_hit else "computed"
            err.print(f"merged model ({how}, root {outcome.root[:12]}) in {outcome.output}")


@app.command()
def output(
    path: Annotated[str, typer.Argument(help="Work-tree folder for the merged model.")],
) -> None:
    """Set where the merged model is written (a replicated register; default 'merged')."""
    with handle_errors():
        contributions.set_register(open_repo(), "output", path)
    err.print(f"output set to {path}")


# -- reading the set ---------------------------------------------------------------------------
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
    table = Table("name", "id", title=f"{len(data['contributions'])} contributions")
    for c in data["contributions"]:
        table.add_row(cell(c["name"]), c["id"][:12])
    err.print(table)


@app.command()
def log(
    rev: Annotated[str, typer.Argument(help="Revision to start from.")] = "HEAD",
    json_: JsonOpt = False,
) -> None:
    """Every manifest record with the commit that introduced it."""
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


@app.command()
def verify(
    staged: Annotated[bool, typer.Option("--staged", help="Check the index (pre-commit).")] = False,
    rev: Annotated[str | None, typer.Option("--rev", help="Check a commit instead.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Re-hash every object (blake3).")] = False,
    fetch: Annotated[
        bool,
        typer.Option("--fetch", help="Partial clone: fetch absent objects first."),
    ] = False,
    fast: Annotated[
        bool, typer.Option("--fast", help="Hash nothing: presence and sizes only.")
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check the manifest, every record, descriptor and object, the compatibility of the
    contributions and the strategy; exit 1 listing every problem (and how to fix it).

    By default every object that HEAD does not hold as the same git blob is re-hashed (what
    a fetch, merge or add brought in: '--rev FETCH_HEAD' checks a fetch before you merge
    it); --full re-hashes every object, the cache and the published output too.  In a
    partial clone, objects not fetched yet are named as absent (--fetch fetches them)."""
    from ..query.verify import verify as do_verify

    if staged and rev is not None:
        raise fail(UsageError("--staged and --rev are exclusive"))
    if full and fast:
        raise fail(UsageError("--full and --fast are exclusive"))
    with handle_errors(), byte_progress("verify", full and not (json_ or quiet)) as (st, adv):
        report = do_verify(
            open_repo(),
            ":" if staged else rev,
            full=full,
            resolvable=True,
            fetch=fetch,
            progress=adv,
            on_start=st,
            hash_new_against=None if fast else "HEAD",
        )
    if json_:
        emit_json(report.as_dict())
    else:
        for p in report.problems:
            err.print(
                f"problem: {display(p.message)}\n  fix: {p.fix}", markup=False, soft_wrap=True
            )
        if not quiet:
            for note in report.notes:
                err.print(f"note: {display(note)}", markup=False, soft_wrap=True)
            speed = report.bytes_hashed / max(report.hash_seconds, 1e-9) / 1e6
            hashed = f", {human_bytes(report.bytes_hashed)} hashed at {speed:.0f} MB/s"
            verdict = f"{len(report.problems)} problem(s)" if report.problems else "ok"
            err.print(
                f"{verdict}: {report.state}, {report.contributions} contributions, "
                f"{report.objects} objects{hashed if report.bytes_hashed else ''}",
                markup=False,
            )
    if report.problems:
        raise typer.Exit(1)


@app.command()
def gc(
    max_bytes: Annotated[
        str | None,
        typer.Option(
            "--max-bytes", help="Cache size budget, e.g. 20g (default: crdt.cacheMaxBytes)."
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Prune the result cache: entries that no ref reaches, then the least recently used
    beyond the size budget."""
    from ..resolution import cache

    with handle_errors():
        repo = open_repo()
        repo.require_initialized()
        budget = cache.parse_size(max_bytes) if max_bytes is not None else cache.cache_budget(repo)
        with repo.lock():
            result = cache.prune(repo, cache.reachable_roots(repo), budget)
    if json_:
        emit_json(result.as_dict())
        return
    err.print(
        f"removed {len(result.removed)} cache entries ({human_bytes(result.bytes_removed)}), "
        f"kept {len(result.kept)} ({human_bytes(result.bytes_kept)})"
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

    from ..demo import STEPS, run_demo
    from .render import demo_tables, step_progress

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so the temporary folder is removed on a closed terminal too

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupted)
    with handle_errors():
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


def run() -> None:
    if os.environ.get("NO_COLOR"):
        err.no_color = True
    app()
