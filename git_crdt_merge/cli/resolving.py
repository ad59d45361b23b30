"""``resolve`` and ``output``: the merged model and where it goes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..replicated import contributions
from .app import (
    JsonOpt,
    QuietOpt,
    app,
    emit_json,
    err,
    fail,
    handle_errors,
    open_repo,
    run_reported,
    size_arg,
)
from .render import print_plan


@app.command()
def resolve(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder (default: the register).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    compute_dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    max_shard_size: Annotated[
        str | None,
        typer.Option(help="Largest output shard, e.g. 2GB (default: crdt.maxShardSize, else 5GB)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the plan (tensors, inputs, parameters, estimates).")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes resolving tensors side by side (default: crdt.workers, else all "
            "cores for compute-bound strategies, as many as memory holds, 1 for the others); "
            "same bytes for any number.",
        ),
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute the merged model of the visible set (a no-op on a cache hit).

    --dry-run prints the plan instead: every tensor with its parameters after gradients and
    filters, the inputs, and estimated memory and time; nothing is read or written."""
    from ..resolution.resolve import Outcome, plan_only
    from ..resolution.resolve import resolve as do_resolve

    max_shard = size_arg(max_shard_size, "--max-shard-size", 1)
    if device not in ("cpu", "cuda"):
        raise fail(UsageError(f"--device must be cpu or cuda, not {device!r}"))
    if dry_run:
        with handle_errors():
            plan = plan_only(open_repo())
        if json_:
            emit_json(plan)
        elif plan["empty"]:
            err.print("no visible contributions: nothing to resolve (dry run)")
        elif not quiet:
            print_plan(err, plan)
        return

    def describe(outcome: Outcome) -> None:
        if outcome.empty:
            err.print("no visible contributions: nothing to resolve")
        else:
            how = "cache hit" if outcome.cache_hit else "computed"
            err.print(f"merged model ({how}, root {outcome.root[:12]}) in {outcome.output}")

    run_reported(
        "resolve",
        lambda start, advance: do_resolve(
            open_repo(tidy=True),
            output=output,
            device=device,
            compute_dtype=compute_dtype,
            max_shard=max_shard,
            on_start=start,
            progress=advance,
            workers=workers,
        ),
        describe,
        json_=json_,
        quiet=quiet,
    )


@app.command()
def output(
    path: Annotated[
        str | None, typer.Argument(help="Work-tree folder for the merged model.")
    ] = None,
    config_from: Annotated[
        str | None,
        typer.Option(
            help="Take config.json and the tokenizer from this contribution (name or id; "
            "'' for the default: the base, else the first contribution that has them)."
        ),
    ] = None,
    adapter_rank: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Write a merge of LoRA adapters as an adapter of this rank (0: as full "
            "weights, the default).",
        ),
    ] = None,
) -> None:
    """Set where and how the merged model is written (replicated registers).

    PATH: the folder (default 'merged').  --config-from and --adapter-rank change the output,
    so they are part of the resolution's Merkle root."""
    if path is None and config_from is None and adapter_rank is None:
        raise fail(UsageError("give PATH, --config-from or --adapter-rank"))
    with handle_errors():
        repo = open_repo()
        if path is not None:
            contributions.set_register(repo, "output", path)
            err.print(f"output set to {path}")
        if config_from is not None:
            cid = contributions.set_config_from(repo, config_from)
            err.print(f"config and tokenizer from {cid[:12] if cid else 'the default'}")
        if adapter_rank is not None:
            contributions.set_register(repo, "adapter_rank", adapter_rank or None)
            how = f"a LoRA adapter of rank {adapter_rank}" if adapter_rank else "full weights"
            err.print(f"LoRA merges written as {how}")
