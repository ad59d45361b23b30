"""The model card (``README.md``) of a merged model: what it is and how to make it again.

Generated from the plan and the resolution record only (no time, no path, no host), so it
is as deterministic as the weights: the same set gives the same bytes on every clone.  It
names the strategy and its parameters, each contribution by name, weight and id, the base,
the Merkle root and the tool version, the files taken from the inputs and those left out,
a mergekit-style recipe, and the commands that reproduce the set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .plan import CARD, Plan

__all__ = ["CARD", "model_card"]


def _q(value: Any) -> str:
    """A YAML scalar: JSON's spelling, which YAML reads as the same value."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def recipe(plan: Plan, record: Mapping[str, Any]) -> str:
    """The merge as a mergekit-style YAML recipe (models, parameters, merge_method, dtype)."""
    lines = [f"merge_method: {_q(plan.strategy.name)}"]
    if plan.base_id is not None:
        lines.append(f"base_model: {_q('base-' + plan.base_id[:12])}")
    lines.append("models:")
    for (cid, name), weight in zip(plan.contributions, plan.weights, strict=True):
        lines.append(f"  - model: {_q(name)}  # {cid}")
        lines.append("    parameters:")
        lines.append(f"      weight: {_q(weight)}")
    if plan.raw_params:
        lines.append("parameters:")
        for key, value in sorted(plan.raw_params.items()):
            lines.append(f"  {key}: {_q(value)}")
    dtypes = sorted({spec.dtype for spec in plan.specs})
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    if len(dtypes) == 1 and dtypes[0] in names:
        lines.append(f"dtype: {names[dtypes[0]]}")
    lines.append(f"# compute_dtype: {record['compute_dtype']}")
    return "\n".join(lines) + "\n"


def commands(plan: Plan) -> str:
    """Shell commands that rebuild this set in a new repository (paths are placeholders:
    the inputs' ids say which files they must be)."""
    lines = ["git init merge && cd merge && git crdt init"]
    if plan.base_id is not None:
        lines.append("git crdt set-base BASE_PATH  # id " + plan.base_id)
    for (cid, name), weight in zip(plan.contributions, plan.weights, strict=True):
        line = f"git crdt add-contribution {name.upper()}_PATH --name {_shell(name)}"
        if weight != 1.0:
            line += f" --weight {weight!r}"
        lines.append(f"{line}  # id {cid}")
    params = "".join(
        f" -p {_shell(f'{k}={_param_text(v)}')}" for k, v in sorted(plan.raw_params.items())
    )
    lines.append(f"git crdt strategy {plan.strategy.name}{params}")
    if plan.config_from is not None:
        lines.append(f"git crdt output --config-from {plan.config_from}")
    if plan.lowrank is not None and plan.lowrank.rank is not None:
        lines.append(f"git crdt output --adapter-rank {plan.lowrank.rank}")
    lines.append(f"git crdt resolve  # Merkle root {plan.root}")
    return "\n".join(lines) + "\n"


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _shell(text: str) -> str:
    """``text`` quoted for a POSIX shell (single quotes)."""
    return "'" + text.replace("'", "'\\''") + "'"


def model_card(plan: Plan, record: Mapping[str, Any]) -> str:
    rank = None if plan.lowrank is None else plan.lowrank.rank
    adapter = rank is not None
    library = "peft" if adapter else "transformers"
    out = [
        "---",
        f"library_name: {library}",
        "tags:",
        "- merge",
        "- git-crdt-merge",
        "---",
        "",
        "# Merged model",
        "",
        f"Merged by {record['tool']} with strategy `{plan.strategy.name}` from "
        f"{len(plan.contributions)} contribution(s)"
        + (" over a base model" if plan.base_id is not None else "")
        + (f", written as a LoRA adapter of rank {rank}" if adapter else "")
        + " (`"
        + ("PeftModel.from_pretrained(base, PATH)" if adapter else "from_pretrained(PATH)")
        + "` loads it).",
        "",
        "| | |",
        "| --- | --- |",
        f"| strategy | `{plan.strategy.name}` |",
        f"| parameters | `{_cell(json.dumps(plan.raw_params, sort_keys=True))}` |",
        f"| base | {'`' + plan.base_id + '`' if plan.base_id else 'none'} |",
        f"| Merkle root | `{plan.root}` |",
        f"| seed | `{record['seed']}` |",
        f"| compute dtype | {record['compute_dtype']} |",
        f"| tool | {record['tool']} |",
        "",
        "## Contributions",
        "",
        "In canonical order (by id), which is the order the strategy sees them in.",
        "",
        "| name | kind | weight | id |",
        "| --- | --- | --- | --- |",
    ]
    for (cid, name), desc in zip(plan.contributions, plan.descriptors, strict=True):
        out.append(f"| {_cell(name)} | {desc.kind} | {desc.weight!r} | `{cid}` |")
    if plan.lowrank is not None:
        out += [
            "",
            "LoRA adapters enter as the models they stand for: `W + scaling * B @ A` per "
            "target module (scaling `lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).",
        ]
    out += ["", "## Files", ""]
    if plan.files:
        for fname, (_, source) in sorted(plan.files.items()):
            out.append(f"- `{_cell(fname)}` from {_cell(source)}")
    else:
        out.append("- no config or tokenizer file: none of the inputs has one")
    if plan.left_out:
        out += ["", "Left out:", ""]
        out += [f"- {_cell(line)}" for line in plan.left_out]
    out += [
        "",
        "## Recipe (mergekit style)",
        "",
        "```yaml",
        recipe(plan, record).rstrip("\n"),
        "```",
        "",
        "## Reproduce",
        "",
        "In a clone of the repository that holds this set, `git crdt resolve` writes these "
        "bytes again (they are cached under the Merkle root).  From the input files:",
        "",
        "```sh",
        commands(plan).rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(out)
