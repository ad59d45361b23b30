"""Helpers shared by the strategy families (task vectors, weights, fractions, masks, Gram matrix).

The base guard, task vectors tau_i = X_i - B computed in place, the weight total, fraction
checks, an exact top-fraction mask, the exact Gram matrix of whole tensors (spherical, search)
and the shared ``lambda`` parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import numerics
from ..errors import ResolveError
from .registry import Param, TensorInputs

__all__ = [
    "LAMBDA",
    "check_fraction",
    "gram",
    "require_base",
    "task_vectors",
    "top_fraction_mask",
    "weight_total",
]

LAMBDA = Param("lambda", float, 1.0, help="scale of the merged task vector")


def require_base(inputs: TensorInputs, strategy: str) -> torch.Tensor:
    """The base (the contract requires one; this guards direct calls)."""
    if inputs.base is None:  # pragma: no cover - check_contract runs first
        raise ResolveError(f"strategy {strategy} requires a base model")
    return inputs.base


def task_vectors(inputs: TensorInputs, strategy: str) -> list[torch.Tensor]:
    """tau_i = X_i - B, computed in place over the contributions (they belong to the call)."""
    base = require_base(inputs, strategy)
    for t in inputs.tensors:
        t.sub_(base)
    return inputs.tensors


def weight_total(strategy: str, weights: Sequence[float]) -> float:
    """sum_i w_i (correctly rounded); an error when it is 0 and a strategy divides by it."""
    total = math.fsum(weights)
    if total == 0:
        raise ResolveError(f"strategy {strategy}: the contribution weights sum to 0")
    return total


def check_fraction(strategy: str, name: str, value: float, *, open_low: bool = False) -> None:
    """A parameter that is a fraction: in [0, 1] (or (0, 1] with ``open_low``)."""
    if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ResolveError(
            f"strategy {strategy}: parameter {name} must be in {interval}, got {value}"
        )


def gram(vectors: Sequence[torch.Tensor]) -> list[list[float]]:
    """The K x K matrix of reproducible float64 dot products of whole tensors (symmetric; each
    pair computed once, the pairs side by side on the cores: each dot is exact, so the
    schedule changes no bit)."""
    k = len(vectors)
    g = [[0.0] * k for _ in range(k)]
    pairs = [(i, j) for i in range(k) for j in range(i, k)]

    def one(p: int) -> None:
        i, j = pairs[p]
        g[i][j] = g[j][i] = numerics.dot(vectors[i], vectors[j])

    numerics.run_side_by_side(one, range(len(pairs)))
    return g


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the k = max(1, floor(fraction * n)) largest ``scores`` (ties: lowest flat index);
    fraction >= 1 selects everything, fraction <= 0 nothing."""
    n = scores.numel()
    if fraction >= 1:
        return torch.ones(scores.shape, dtype=torch.bool)
    if fraction <= 0 or n == 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    return numerics.topk_mask(scores, max(1, math.floor(fraction * n)))
