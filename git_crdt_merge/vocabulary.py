"""Names both layers use, spelled once (no torch, no imports): Layer 1 stores and checks them,
Layer 2 computes with them, and neither may import the other's modules to learn them.
"""

from __future__ import annotations

EXTRA_INPUT_KINDS: dict[str, str] = {
    "fisher": "Fisher information diagonals: one tensor per model tensor, same shape, >= 0",
    "gram": "RegMean Gram matrices X^T X: keyed by a 2-D weight (out, in), shape (in, in)",
}
"""The kinds of extra inputs a contribution can carry (``add-contribution --KIND FILE``)."""

STRATEGY_REVISIONS: dict[str, int] = {
    "star": 2,
    "adarank": 2,
    "svd_knot_tying": 2,
    "knots": 2,
    "dual_projection": 2,
    "regression_mean": 2,
    "regmean": 2,
    "representation_surgery": 2,
}
"""Strategies (names and aliases) whose algorithm changed their output bytes since they were
first released, with their current revision (``Strategy.revision``; absent means 1).  The
revision is part of the cache key, so a clone never serves a result an earlier algorithm
computed; read here, without torch, on the cache-hit path.  Every declared revision other than 1
must be listed (tests/strategies/test_strategies.py checks it)."""

COMPUTE_DTYPE_NAMES: tuple[str, ...] = ("float32", "float64")
"""The dtypes strategies compute in (``resolve --compute-dtype``); the default is the first."""

OUTPUT_DTYPES: dict[str, str] = {
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
}
"""The output dtypes a repository may declare (register ``output_dtype``, ``git crdt
output-dtype``), mergekit's names, with their safetensors names."""

OUTPUT_DTYPE_ALIASES: dict[str, str | None] = {
    **{name: name for name in OUTPUT_DTYPES},
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "keep": None,
}
"""What ``git crdt output-dtype`` accepts, and the register value it writes (None: keep)."""
