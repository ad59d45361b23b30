"""``recipe`` and ``merge``: mergekit-style YAML recipes, in a repository and outside one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..resolution.cache import DEFAULT_MAX_SHARD
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
)
from .render import print_plan


@app.command()
def recipe(
    action: Annotated[str, typer.Argument(help="import or export.")],
    path: Annotated[
        Path | None,
        typer.Argument(
            help="The YAML recipe to import; for export, the file to write (stdout without it)."
        ),
    ] = None,
    base_model: Annotated[
        str, typer.Option(help="export: the base_model to write (the repository knows no path).")
    ] = "base",
    json_: JsonOpt = False,
) -> None:
    """Import a mergekit YAML recipe into the registers, or export them as one.

    import sets the strategy, its parameters (gradients and filters included) and each
    contribution's weight from merge_method, parameters and models (matched to contributions
    by name or path); export writes the current ones (docs/recipes.md)."""
    from ..resolution import recipe as recipes

    if action not in ("import", "export"):
        raise fail(UsageError(f"recipe: unknown action {action!r} (valid: import, export)"))
    if action == "import":
        if path is None:
            raise fail(UsageError("recipe import: give the recipe file"))
        with handle_errors():
            result = recipes.import_recipe(open_repo(), path)
        if json_:
            emit_json(result.as_dict())
            return
        what = ", ".join(result.changed) or "nothing (already set)"
        err.print(
            f"strategy {result.strategy['name']} "
            f"{json.dumps(result.strategy['params'], sort_keys=True)}; written: {what}",
            markup=False,
            soft_wrap=True,
        )
        for key in result.ignored:
            err.print(f"ignored: {key} ({recipes.IGNORED_PARAMS[key]})", markup=False)
        return
    with handle_errors():
        text = recipes.export_recipe(open_repo(), base_model=base_model)
    if path is not None:
        with handle_errors():
            try:
                path.write_text(text)
            except OSError as exc:
                raise UsageError(f"{path}: {exc.strerror}") from None
    if json_:
        emit_json({"recipe": text, "path": None if path is None else str(path)})
    elif path is None:
        sys.stdout.write(text)
    else:
        err.print(f"recipe written to {path}", markup=False)


@app.command("merge")
def merge_cmd(
    recipe_file: Annotated[Path, typer.Argument(help="A mergekit-style YAML recipe.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan; write nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an earlier merge in OUT.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    compute_dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    max_shard_size: Annotated[
        int, typer.Option(min=1, help="Largest output shard in bytes.")
    ] = DEFAULT_MAX_SHARD,
    allow_pickle: Annotated[bool, typer.Option(help="Accept .bin/.pt/.pth/.ckpt.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge the loose models of a recipe into OUT, no repository needed.

    The same engine as resolve: the output equals what a repository holding these models
    (added by path, with the recipe imported) resolves to, bytes and Merkle root alike."""
    from ..resolution.oneshot import OneShot, merge

    if device not in ("cpu", "cuda"):
        raise fail(UsageError(f"--device must be cpu or cuda, not {device!r}"))

    def describe(result: OneShot) -> None:
        if result.plan is not None:
            print_plan(err, result.plan)
        else:
            err.print(f"merged model (root {result.root[:12]}) in {result.output}", markup=False)

    run_reported(
        "merge",
        lambda start, advance: merge(
            recipe_file,
            output,
            dry_run=dry_run,
            force=force,
            device=device,
            compute_dtype=compute_dtype,
            max_shard=max_shard_size,
            allow_pickle=allow_pickle,
            on_start=start,
            progress=advance,
        ),
        describe,
        json_=json_,
        quiet=quiet,
        show=False if dry_run else None,
    )
