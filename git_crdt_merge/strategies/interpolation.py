"""Interpolation strategies: linear (weighted average) and SLERP."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from .registry import REQUIRED, Param, Strategy, TensorInputs, register

__all__ = ["DOT_THRESHOLD", "merge_linear", "merge_slerp"]

DOT_THRESHOLD = 0.9995  # above this |cos| SLERP falls back to linear interpolation


def merge_linear(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = sum_i w_i X_i / sum_i w_i   (normalize=true; without it: out = sum_i w_i X_i)

    w_i is each contribution's weight; the base is ignored.  The weighted sum is accumulated in
    canonical order with a rounded product and a rounded add per term, then divided once by the
    correctly rounded sum of the weights.  A zero weight sum with normalize=true is an error."""
    total = math.fsum(inputs.weights)
    if params["normalize"] and total == 0:
        raise ResolveError("strategy linear: parameter normalize=true but the weights sum to 0")
    # in place on the contributions (they belong to this call): no new tensor at all
    acc = numerics.weighted_sum_(inputs.tensors, inputs.weights)
    if params["normalize"]:
        acc.div_(numerics.scalar(total, acc))
    return acc


def merge_slerp(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1

    v0 = base, v1 = the contribution, both flattened over the whole tensor;
    n_j = ||v_j|| (1 where <= 1e-8); c = clamp(<v0, v1> / (n0 n1), -1, 1); theta = acos(c).
    If |c| > 0.9995: out = (1-t) v0 + t v1.  t = 0 gives the base.  Norms and the dot product
    are reproducible float64 reductions, acos and sin come from numerics (no libm); the two
    coefficients are rounded once to the compute dtype.  Contribution weights are not used."""
    base = inputs.base
    if base is None:  # pragma: no cover - the contract requires a base
        raise ResolveError("strategy slerp requires a base model")
    t: float = params["t"]
    v0, v1 = base, inputs.tensors[0]
    n0 = numerics.l2_norm(v0)
    n1 = numerics.l2_norm(v1)
    n0 = 1.0 if n0 <= 1e-8 else n0
    n1 = 1.0 if n1 <= 1e-8 else n1
    c = min(1.0, max(-1.0, numerics.dot(v0, v1) / (n0 * n1)))
    if abs(c) > DOT_THRESHOLD:
        s0, s1 = 1.0 - t, t
    else:
        theta = numerics.acos(c)
        sin_theta = numerics.sin(theta)
        s0 = numerics.sin((1.0 - t) * theta) / sin_theta
        s1 = numerics.sin(t * theta) / sin_theta
    return v0 * numerics.scalar(s0, v0) + v1 * numerics.scalar(s1, v1)


register(
    Strategy(
        name="linear",
        aliases=("weight_average",),
        params=(Param("normalize", bool, True, help="divide by the sum of the weights"),),
        base="ignored",
        stochastic=False,
        merge=merge_linear,
        summary="weighted average of the contributions",
    )
)

register(
    Strategy(
        name="slerp",
        params=(Param("t", float, REQUIRED, help="interpolation factor: 0 = base, 1 = other"),),
        base="required",
        max_inputs=1,
        stochastic=False,
        merge=merge_slerp,
        summary="spherical interpolation between the base and one contribution",
        uses_weights=False,
        weights_ignored=True,
    )
)
