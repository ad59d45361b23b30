"""Writing the set: contributions, weights, chunk size, base, strategy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import heap
from ..replicated import contributions
from ..replicated.store import DEFAULT_CHUNK_SIZE, MAX_OBJECT_BYTES
from .app import (
    JsonOpt,
    QuietOpt,
    app,
    emit_json,
    err,
    handle_errors,
    open_repo,
    run_reported,
    size_arg,
)
from .render import human_bytes

IncludeCodeOpt = Annotated[
    bool,
    typer.Option(
        help="Keep program code files (*.py ...) of the folder; merged/ then holds them, and "
        "from_pretrained(trust_remote_code=True) would run them (docs/security.md)."
    ),
]


def note_skipped(result: contributions.IngestResult) -> None:
    """One line naming the folder's files that were not kept (never dropped silently), and a
    warning naming the program code that was (--include-code)."""
    if result.skipped:
        err.print(f"not kept: {'; '.join(result.skipped)}", markup=False, soft_wrap=True)
    if result.code:
        err.print(
            f"git-crdt: warning: kept program code {', '.join(result.code)}: a merged model "
            "holding it runs it under from_pretrained(trust_remote_code=True)",
            markup=False,
            soft_wrap=True,
        )


EncodingOpt = Annotated[
    str | None,
    typer.Option(
        "--encoding",
        help="How chunks are stored: raw, planes-zstd (byte planes + zstd), xor-planes-zstd "
        "(XOR against the base's tensor, then planes + zstd) or xor-sparse-zstd (only the "
        "elements that differ from the base, as planes + zstd; the smallest and fastest for "
        "a fine-tune); default: git config "
        "crdt.encoding, else raw. Never changes the id.",
    ),
]


@app.command("add-contribution")
def add_contribution(
    path: Annotated[Path, typer.Argument(help="A .safetensors file or a Hugging Face directory.")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Display name.")] = None,
    weight: Annotated[float | None, typer.Option("--weight", "-w", help="Merge weight.")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="A note.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept .bin/.pt/.pth/.ckpt.")] = False,
    chunk_size: Annotated[
        str | None,
        typer.Option(
            help="Largest object (a size: 50MB, 64MiB, bytes), instead of the repository's "
            "(see 'chunk-size'); never changes the id.",
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
    encoding: EncodingOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_nonfinite: Annotated[bool, typer.Option(help="Accept NaN or Inf values.")] = False,
    include_code: IncludeCodeOpt = False,
) -> None:
    """Store a fine-tuned model as a contribution (staged, like git add).

    A folder's non-weight files (config, tokenizer, README.md, ...) are kept with it; program
    code (*.py) only with --include-code, and what is left out is listed.  A PEFT LoRA
    adapter (adapter_model.safetensors + adapter_config.json) is checked against the base and
    the other adapters.  Extra inputs that some strategies need (Fisher diagonals, Gram
    matrices) are stored with it and become part of its content."""

    options = contributions.IngestOptions(
        allow_pickle,
        allow_nonfinite,
        include_code,
        size_arg(chunk_size, "--chunk-size", 1, MAX_OBJECT_BYTES),
        encoding,
    )

    def describe(result: contributions.IngestResult) -> None:
        what = "already present" if result.already_present else "added"
        err.print(
            f"{what}: {result.name} {result.id[:12]} ({result.tensors} tensors, "
            f"{human_bytes(result.bytes)}, {human_bytes(result.new_bytes)} new)",
            markup=False,
        )
        note_skipped(result)

    heap.keep_freed_buffers()  # same-sized buffers piece after piece: no page faults
    run_reported(
        "ingest",
        lambda start, advance: contributions.add_contribution(
            open_repo(tidy=True),
            path,
            name=name,
            weight=weight,
            message=message,
            options=options,
            on_start=start,
            progress=advance,
            extra_inputs=contributions.parse_extra_inputs(fisher=fisher, gram=gram, extra=extra),
        ),
        describe,
        json_=json_,
        quiet=quiet,
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
        str | None,
        typer.Argument(help="Bytes per chunk, e.g. 64MiB or 50MB (omit to show it)."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Show or set the repository's chunk size (a replicated register; default 64 MiB).

    A storage choice: contributions are named by their content, so a model added with any
    chunk size has the same id.  Sizes: KB=1000, KiB=1024 (docs/cli.md, "Sizes")."""
    bytes_ = size_arg(size, "chunk size", 1, MAX_OBJECT_BYTES)
    with handle_errors():
        repo = open_repo()
        if bytes_ is not None:
            contributions.set_chunk_size(repo, bytes_)
        current = repo.read_manifest().chunk_size()
    value = current or DEFAULT_CHUNK_SIZE
    if json_:
        emit_json({"chunk_size": value, "default": current is None})
    else:
        how = " (default)" if current is None else ""
        err.print(f"chunk size {value} bytes{how}", markup=False)


@app.command("output-dtype")
def output_dtype(
    dtype: Annotated[
        str | None,
        typer.Argument(help="bf16, fp16, fp32, fp64 or keep (omit to show it)."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Show or set the merged model's float dtype (a replicated register; default keep).

    keep: each tensor has its source's dtype (the base's, else the first contribution's).
    Merging computes in float32 (resolve --compute-dtype float64 for float64) and rounds
    once, to nearest even, to this dtype.  Integer tensors are never cast."""
    with handle_errors():
        repo = open_repo()
        if dtype is not None:
            contributions.set_output_dtype(repo, dtype)
        current = repo.read_manifest().output_dtype()
    if json_:
        emit_json({"output_dtype": current})
    else:
        err.print(f"output dtype {current or 'keep'}", markup=False)


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
    include_code: IncludeCodeOpt = False,
    encoding: EncodingOpt = None,
) -> None:
    """Store the base model and record it in the 'base' register.

    Its non-weight files are copied into the merged model (see add-contribution for which
    are kept)."""

    def describe(result: contributions.IngestResult) -> None:
        err.print(f"base set to {result.id[:12]} ({result.tensors} tensors)")
        note_skipped(result)

    heap.keep_freed_buffers()  # same-sized buffers piece after piece: no page faults
    run_reported(
        "ingest",
        lambda start, advance: contributions.set_base(
            open_repo(tidy=True),
            path,
            options=contributions.IngestOptions(
                allow_pickle, allow_nonfinite, include_code, encoding=encoding
            ),
            on_start=start,
            progress=advance,
        ),
        describe,
        json_=json_,
        quiet=quiet,
    )


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
                "weights_ignored": st.weights_ignored,
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
        weights = (
            "yes"
            if r["uses_weights"]
            else "no (ignored)"
            if r["weights_ignored"]
            else "no (refused)"
        )
        table.add_row(names, r["base"], inputs, weights, params, r["summary"])
    err.print(table)
    err.print("* per-contribution parameter", markup=False)
