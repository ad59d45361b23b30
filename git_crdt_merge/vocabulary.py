"""Names both layers use, spelled once (no torch, no imports): Layer 1 stores and checks them,
Layer 2 computes with them, and neither may import the other's modules to learn them.
"""

from __future__ import annotations

EXTRA_INPUT_KINDS: dict[str, str] = {
    "fisher": "Fisher information diagonals: one tensor per model tensor, same shape, >= 0",
    "gram": "RegMean Gram matrices X^T X: keyed by a 2-D weight (out, in), shape (in, in)",
}
"""The kinds of extra inputs a contribution can carry (``add-contribution --KIND FILE``)."""

COMPUTE_DTYPE_NAMES: tuple[str, ...] = ("float32", "float64")
"""The dtypes strategies compute in (``resolve --compute-dtype``); the default is the first."""
