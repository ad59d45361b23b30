"""Model Stock: interpolate between the base and the contributions' mean by their angle."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from .registry import Param, Strategy, TensorInputs, register

__all__ = ["merge_model_stock"]


def _ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = n cos / (1 + (n-1) cos), 0 where |1 + (n-1) cos| < 1e-6 (float64, not clamped)."""
    den = cos * float(n - 1) + 1.0
    safe = torch.where(den.abs() < 1e-6, torch.ones_like(den), den)
    return torch.where(den.abs() < 1e-6, torch.zeros_like(den), (cos * float(n)) / safe)


def merge_model_stock(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = t * mean_i(X_i) + (1 - t) * B,   t = N cos / (1 + (N-1) cos)

    d_i = X_i - B; cos = mean over pairs i < j of clamp(<d_i, d_j> / max(||d_i|| ||d_j||, 1e-6),
    -1, 1); N = number of contributions; t = 0 where |1 + (N-1) cos| < 1e-6 and t is not clamped.
    With filter_wise=true the vectors are the rows along the last dim (one t per row; a 0-d or
    1-D tensor is one row), otherwise the whole tensor.  Dot products and norms are reproducible
    float64 reductions; t is rounded once to the compute dtype.  Contribution weights are not
    used."""
    base = inputs.base
    if base is None:  # pragma: no cover - the contract requires a base
        raise ResolveError("strategy model_stock requires a base model")
    n = len(inputs.tensors)
    filter_wise: bool = params["filter_wise"]
    shape = base.shape
    if filter_wise:
        rows = base.reshape(-1, shape[-1]) if base.dim() >= 1 else base.reshape(1, 1)
    else:
        rows = base.reshape(1, -1)
    deltas = [(x - base).reshape(rows.shape) for x in inputs.tensors]
    norms = [torch.sqrt(numerics.dot_rows(d, d)) for d in deltas]
    pair_cos: list[torch.Tensor] = []
    for i, j in itertools.combinations(range(n), 2):
        den = torch.clamp(norms[i] * norms[j], min=1e-6)
        pair_cos.append(torch.clamp(numerics.dot_rows(deltas[i], deltas[j]) / den, -1.0, 1.0))
    cos = numerics.ordered_sum(pair_cos) / float(len(pair_cos))
    t = _ratio(cos, n).to(base.dtype)  # one rounding of each float64 ratio
    t_rows = t.reshape(-1, 1)
    mean = numerics.ordered_sum(inputs.tensors) / numerics.scalar(float(n), base)
    one = torch.ones((), dtype=base.dtype)
    out = mean.reshape(rows.shape) * t_rows + rows * (one - t_rows)
    return out.reshape(shape)


register(
    Strategy(
        name="model_stock",
        params=(Param("filter_wise", bool, False, help="one ratio per row (last dim)"),),
        base="required",
        min_inputs=2,
        stochastic=False,
        merge=merge_model_stock,
        summary="Model Stock: move from the base toward the mean by the task vectors' angle",
        uses_weights=False,
        weights_ignored=True,
    )
)
