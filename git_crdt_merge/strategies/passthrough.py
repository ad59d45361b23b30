"""passthrough: one contribution, optionally scaled (the toolkit's building block for
layer-stacking merges)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..numerics import scalar
from .registry import Param, Strategy, TensorInputs, register

__all__ = ["merge_passthrough"]


def merge_passthrough(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = scale * X   (scale = 1: X unchanged, bit for bit)

    Exactly one contribution; the base is ignored; scale is rounded once to the compute dtype.
    Source: the toolkit's (mergekit's) passthrough, whose ``scale`` defaults to "none", the same
    as 1 here.  No per-contribution weights."""
    x = inputs.tensors[0]
    scale: float = params["scale"][0]
    if scale != 1.0:  # x * 1 is x exactly: skipped
        x.mul_(scalar(scale, x))
    return x


register(
    Strategy(
        name="passthrough",
        params=(
            Param(
                "scale",
                float,
                1.0,
                per_contribution=True,
                help="factor applied to the contribution",
            ),
        ),
        base="ignored",
        max_inputs=1,
        stochastic=False,
        merge=merge_passthrough,
        summary="the one contribution unchanged, or multiplied by scale",
        uses_weights=False,
    )
)
