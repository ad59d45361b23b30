"""Generalized task arithmetic: one implementation, eight strategies.

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and
della_linear differ only in the sparsifier, the consensus rule and the parameter defaults; each is
a row of :data:`VARIANTS`.  Parameter semantics follow the standard toolkit (mergekit 0.1.5).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ResolveError
from ..numerics import l1_norm, ordered_sum, scalar
from .registry import Param, Strategy, TensorInputs, register
from .sparsify import SPARSIFIERS, MaskKey, l1_rescale_in_place

__all__ = ["VARIANTS", "Variant", "generalized_task_arithmetic"]


@dataclass(frozen=True)
class Variant:
    """One task-arithmetic strategy: sparsifier x consensus x defaults."""

    name: str
    sparsifier: str | None  # key of SPARSIFIERS, None = no sparsification
    consensus: bool  # TIES sign election on the weighted sum
    normalize: bool
    rescale: bool
    summary: str
    closed_form: str  # the formula at the default parameters
    extra_default: float = 0.0


def _sparsify_in_place(
    variant: Variant,
    inputs: TensorInputs,
    params: Mapping[str, Any],
    index: int,
    delta: torch.Tensor,
) -> None:
    """delta <- sparsify(delta) (optionally L1-rescaled), overwriting ``delta``."""
    if variant.sparsifier is None:
        return
    sparsifier = SPARSIFIERS[variant.sparsifier]
    density: float = params["density"][index]
    extra: float = params[sparsifier.extra_param][index] if sparsifier.extra_param else 0.0
    if sparsifier.name == "della_magprune" and 0 < density < 1:
        if not (density - extra > 0 and density + extra < 1):
            raise ResolveError(
                f"strategy {variant.name}: parameter epsilon={extra} with density={density} "
                f"(contribution {inputs.contribution_ids[index]}) needs density - epsilon > 0 "
                "and density + epsilon < 1"
            )
    key = MaskKey(inputs.rng, inputs.name, inputs.contribution_ids[index])
    mask = sparsifier.mask(delta, density, extra, key)
    if mask is None:
        return
    full_l1 = l1_norm(delta) if params.get("rescale", False) else 0.0
    delta.masked_fill_(~mask, 0.0)
    del mask
    if params.get("rescale", False):
        l1_rescale_in_place(delta, full_l1)


def generalized_task_arithmetic(
    variant: Variant, inputs: TensorInputs, params: Mapping[str, Any]
) -> torch.Tensor:
    """out = B + lambda * num [/ den]

    with delta_i = X_i - B, d_i = sparsify(delta_i, density_i) (optionally L1-rescaled:
    d_i * ||delta_i||_1 / ||d_i||_1), D_i = w_i * d_i, and

    * consensus (TIES sign election): S = sum_i D_i, s = +1 where S >= 0 else -1,
      m_i = [sign(D_i) == s] (pruned zeros never agree); num = sum_i m_i D_i,
      den = sum_i m_i w_i elementwise (1 where it is 0);
    * no consensus: num = sum_i D_i, den = sum_i w_i (1 if |den| < 1e-8).

    Division only if ``normalize``; lambda multiplies after it.  Sums over contributions run in
    canonical order, two-operand adds, never fused.  The contributions' tensors are overwritten
    (they belong to this call), so memory stays near K + 3 tensors."""
    base = inputs.base
    if base is None:  # pragma: no cover - the contract requires a base
        raise ResolveError(f"strategy {variant.name} requires a base model")
    if not inputs.tensors:
        return base.clone()
    weighted = inputs.tensors
    for index, d in enumerate(weighted):
        d.sub_(base)  # delta_i, in place
        _sparsify_in_place(variant, inputs, params, index, d)
        if inputs.weights[index] != 1.0:  # x * 1 is x exactly: skip the pass
            d.mul_(scalar(inputs.weights[index], d))
    one = scalar(1.0, base)
    if variant.consensus:
        positive = ordered_sum(weighted) >= 0  # the elected sign s (exact 0 counts as +)
        den = None
        if params["normalize"]:
            den = torch.zeros_like(base)
        for d, w in zip(weighted, inputs.weights, strict=True):
            # m_i: D_i has the elected sign; pruned zeros never agree.
            agree = torch.where(positive, d > 0, d < 0)
            d.masked_fill_(~agree, 0.0)
            if den is not None:
                den.add_(agree.to(den.dtype).mul_(scalar(w, den)))
        del positive
        num = ordered_sum(weighted)
        if den is not None:
            num.div_(torch.where(den == 0, one, den))
    else:
        num = ordered_sum(weighted)
        if params["normalize"]:
            total = math.fsum(inputs.weights)
            num.div_(scalar(1.0 if abs(total) < 1e-8 else total, num))
    lam: float = params["lambda"]
    if lam != 1.0:
        num.mul_(scalar(lam, num))
    return num.add_(base)


def _params(variant: Variant) -> tuple[Param, ...]:
    params: list[Param] = []
    if variant.sparsifier is not None:
        params.append(
            Param("density", float, 1.0, True, "fraction of each task vector kept (>= 1: all)")
        )
        extra = SPARSIFIERS[variant.sparsifier].extra_param
        if extra == "gamma":
            params.append(
                Param(
                    "gamma",
                    float,
                    variant.extra_default,
                    True,
                    "fraction of largest |delta| dropped",
                )
            )
        elif extra == "epsilon":
            params.append(
                Param(
                    "epsilon",
                    float,
                    variant.extra_default,
                    True,
                    "half-width of the keep-probability range around density",
                )
            )
    params.append(Param("lambda", float, 1.0, False, "scale of the merged task vector"))
    params.append(
        Param("normalize", bool, variant.normalize, False, "divide by the sum of the weights")
    )
    if variant.sparsifier is not None:
        params.append(
            Param(
                "rescale",
                bool,
                variant.rescale,
                False,
                "L1-norm rescale of each sparsified task vector",
            )
        )
    return tuple(params)


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "task_arithmetic",
        None,
        False,
        False,
        False,
        "base plus the weighted task vectors",
        "out = B + lambda * sum_i w_i (X_i - B)",
    ),
    Variant(
        "ties",
        "magnitude",
        True,
        True,
        False,
        "TIES: magnitude trim, sign election, disjoint mean",
        "out = B + lambda * sum_i w_i m_i T_k(delta_i) / sum_i w_i m_i   (T_k: top-k |delta|)",
    ),
    Variant(
        "dare_linear",
        "random",
        False,
        False,
        True,
        "DARE: random drop, L1 rescale, weighted sum",
        "out = B + lambda * sum_i w_i R(M_density . delta_i)   (M: Bernoulli mask, R: L1 rescale)",
    ),
    Variant(
        "dare_ties",
        "random",
        True,
        False,
        True,
        "DARE with TIES sign election (no division by default)",
        "out = B + lambda * sum_i w_i m_i R(M_density . delta_i)",
    ),
    Variant(
        "breadcrumbs",
        "magnitude_outliers",
        False,
        False,
        False,
        "Model Breadcrumbs: drop the smallest and the largest |delta|",
        "out = B + lambda * sum_i w_i O(delta_i)   (O: keep a middle band of |delta|)",
        0.01,
    ),
    Variant(
        "breadcrumbs_ties",
        "magnitude_outliers",
        True,
        False,
        False,
        "Model Breadcrumbs with TIES sign election",
        "out = B + lambda * sum_i w_i m_i O(delta_i)",
        0.01,
    ),
    Variant(
        "della",
        "della_magprune",
        True,
        True,
        True,
        "DELLA: rank-based random drop, sign election, disjoint mean",
        "out = B + lambda * sum_i w_i m_i R(M_p . delta_i) / sum_i w_i m_i   (p from row ranks)",
        0.15,
    ),
    Variant(
        "della_linear",
        "della_magprune",
        False,
        False,
        True,
        "DELLA: rank-based random drop, weighted sum",
        "out = B + lambda * sum_i w_i R(M_p . delta_i)",
        0.15,
    ),
)


def _make_merge(variant: Variant) -> Any:
    def merge(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        return generalized_task_arithmetic(variant, inputs, params)

    merge.__name__ = f"merge_{variant.name}"
    general = inspect.getdoc(generalized_task_arithmetic) or ""
    merge.__doc__ = f"{variant.closed_form}\n\nIn general (any parameters):\n\n{general}"
    return merge


for _variant in VARIANTS:
    register(
        Strategy(
            name=_variant.name,
            aliases=(),
            params=_params(_variant),
            base="required",
            min_inputs=1,
            max_inputs=None,
            stochastic=_variant.sparsifier is not None
            and SPARSIFIERS[_variant.sparsifier].stochastic,
            merge=_make_merge(_variant),
            summary=_variant.summary,
        )
    )
