"""The paper's data-free consensus and selection methods, one merge function each.

emr (EMR-Merging), negative_merge (task-vector negation), split_unlearn_merge (the merge step of
SPUNGE), weight_scope_alignment, safe_merge (variance-based freezing) and led_merge
(Locate-Elect-Disjoint with magnitude importance).  Where a source paper needs data (gradients,
activations, unlearning sets) the docstring says what is computed instead; ``docs/strategies.md``
("The paper's data-free methods") gives the details.  All numerics go through
:mod:`git_crdt_merge.numerics`: elementwise single roundings, sums over contributions in
canonical order, exact reductions for norms and means, exact top-k selection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from .common import (
    LAMBDA,
    check_fraction,
    require_base,
    task_vectors,
    top_fraction_mask,
    weight_total,
)
from .registry import Param, Strategy, TensorInputs, register
from .task_arithmetic import VARIANTS, generalized_task_arithmetic

__all__ = [
    "LAMBDA",
    "merge_emr",
    "merge_led",
    "merge_negative",
    "merge_safe",
    "merge_split_unlearn",
    "merge_weight_scope_alignment",
    "task_vectors",
    "top_fraction_mask",
    "weight_total",
]


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype))


# ---------------------------------------------------------------------------------------------
# EMR-Merging
# ---------------------------------------------------------------------------------------------


def merge_emr(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """EMR-Merging (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free High-Performance Model
    Merging"), producing one model.

    tau_i = X_i - B.  Elect the unified task vector: gamma = sign(sum_i w_i tau_i) elementwise;
    eps = max_i |tau_i| over the i with tau_i * gamma > 0 (0 if none); tau_uni = gamma * eps.
    Task masks M_i = [tau_i * tau_uni > 0]; rescalers
    lambda_i = ||tau_i||_1 / ||M_i . tau_uni||_1 (0 if the denominator is 0).
    The paper keeps K task-specific models B + lambda_i M_i . tau_uni and picks one per task at
    inference; one merged model has to choose:

    * mode "average" (default): the weighted mean of those K models,
      out = B + (sum_i w_i lambda_i M_i / sum_i w_i) . tau_uni;
    * mode "unified": out = B + (sum_i w_i lambda_i / sum_i w_i) * tau_uni.

    Weights also enter the sign election (the paper has none: w_i = 1 gives its sign).  The L1
    norms are exact reductions; the coefficients w_i lambda_i / sum w are rounded once."""
    base = require_base(inputs, "emr")
    mode: str = params["mode"]
    if mode not in ("average", "unified"):
        raise ResolveError(
            f"strategy emr: parameter mode must be 'average' or 'unified', got {mode!r}"
        )
    total = weight_total("emr", inputs.weights)
    taus = task_vectors(inputs, "emr")
    gamma = torch.sign(numerics.weighted_sum(taus, inputs.weights))
    eps = torch.zeros_like(base)
    for tau in taus:
        eps = torch.maximum(eps, _masked(torch.abs(tau), (tau * gamma) > 0))
    unified = gamma * eps  # exact: gamma is -1, 0 or +1
    coefficients: list[float] = []
    masks: list[torch.Tensor] = []
    for tau, w in zip(taus, inputs.weights, strict=True):
        mask = (tau * unified) > 0
        kept = numerics.l1_norm(_masked(unified, mask))
        rescaler = numerics.l1_norm(tau) / kept if kept > 0 else 0.0
        coefficients.append(w * rescaler / total)
        masks.append(mask)
    if mode == "unified":
        return base + unified * numerics.scalar(math.fsum(coefficients), base)
    scale = numerics.weighted_sum([m.to(base.dtype) for m in masks], coefficients)
    return base + scale * unified


# ---------------------------------------------------------------------------------------------
# negation and unlearning
# ---------------------------------------------------------------------------------------------


def merge_negative(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """Task arithmetic with negation (Ilharco et al., ICLR 2023, "Editing Models with Task
    Arithmetic"): forgetting by subtracting a task vector.

    out = B + sum_i c_i tau_i,  tau_i = X_i - B,  c_i = -lambda w_i if negate_i else +lambda w_i.

    ``negate`` is per contribution (default true: every contribution is a task to forget, the
    paper's B - lambda tau); contributions with negate=false are added as in task arithmetic.
    Each c_i is rounded once; products and adds in canonical order, never fused."""
    base = require_base(inputs, "negative_merge")
    lam: float = params["lambda"]
    negate: list[bool] = params["negate"]
    taus = task_vectors(inputs, "negative_merge")
    coefficients = [
        (-lam if flip else lam) * w for flip, w in zip(negate, inputs.weights, strict=True)
    ]
    return base + numerics.weighted_sum(taus, coefficients)


_SPUNGE_METHODS = {v.name: v for v in VARIANTS if v.name in ("ties", "task_arithmetic")}


def merge_split_unlearn(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """The merge step of SPUNGE (Kadhe et al., 2024, "Split, Unlearn, Merge: Leveraging Data
    Attributes for More Effective Unlearning in LLMs").

    SPUNGE splits the unlearning data by an attribute, unlearns each split separately from the
    base model B (the model to be cleaned) and merges the K unlearned models.  Splitting and
    unlearning need the data and happen outside; the contributions are the K results.

    * negate=false (default): contributions are unlearned models X_i;
      out = B + lambda * merge(tau_1 .. tau_K), tau_i = X_i - B.
    * negate=true: contributions are models fine-tuned on each split's forget data, unlearned by
      task-vector negation (the paper's TVN): out = B - lambda * merge(tau_1 .. tau_K).

    merge = TIES-Merging (method "ties": top-density trim per tau_i, sign election on
    sum_i w_i tau_i, disjoint weighted mean; see ``ties``) or the weighted sum (method
    "task_arithmetic").  Uses the generalized task-arithmetic core."""
    method: str = params["method"]
    if method not in _SPUNGE_METHODS:
        raise ResolveError(
            "strategy split_unlearn_merge: parameter method must be 'ties' or "
            f"'task_arithmetic', got {method!r}"
        )
    variant = _SPUNGE_METHODS[method]
    if variant.sparsifier is None and any(d != 1.0 for d in params["density"]):
        raise ResolveError(
            "strategy split_unlearn_merge: parameter density applies to method 'ties' only"
        )
    sign = -1.0 if params["negate"] else 1.0
    core = {
        "density": params["density"],
        "lambda": sign * params["lambda"],
        "normalize": variant.normalize,
        "rescale": False,
    }
    return generalized_task_arithmetic(variant, inputs, core)


# ---------------------------------------------------------------------------------------------
# weight scope alignment
# ---------------------------------------------------------------------------------------------


def _scope(x: torch.Tensor) -> tuple[float, float]:
    """(mean, population standard deviation) of all elements: exact reductions in float64."""
    mu = numerics.mean(x)
    centred = x.to(torch.float64) - mu
    return mu, math.sqrt(numerics.dot(centred, centred) / x.numel())


def merge_weight_scope_alignment(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """Weight scope alignment (Xu et al., 2024, "Weight Scope Alignment: A Frustratingly Easy
    Method for Model Merging"), data-free post-hoc form.

    Per tensor, the scope of X_i is (mu_i, sigma_i) = mean and population standard deviation of
    its elements.  The target scope is (mu*, sigma*) = (sum_i w_i mu_i, sum_i w_i sigma_i) /
    sum_i w_i (target "mean", default) or the base's scope (target "base").  Each contribution
    is mapped affinely onto it, A_i = (X_i - mu_i) * (sigma*/sigma_i) + mu* (ratio 1 when
    sigma_i = 0), and out = sum_i w_i A_i / sum_i w_i.

    The paper aligns scopes during fine-tuning with a regulariser toward the target, then
    averages; without training data the alignment is this affine map at merge time.  Scopes are
    exact float64 reductions; each elementwise step is rounded once."""
    target: str = params["target"]
    if target not in ("mean", "base"):
        raise ResolveError(
            "strategy weight_scope_alignment: parameter target must be 'mean' or 'base', "
            f"got {target!r}"
        )
    total = weight_total("weight_scope_alignment", inputs.weights)
    scopes = [_scope(x) for x in inputs.tensors]
    if target == "base":
        if inputs.base is None:
            raise ResolveError(
                "strategy weight_scope_alignment: parameter target='base' needs a base model; "
                "none is configured"
            )
        mu_t, sigma_t = _scope(inputs.base)
    else:
        mu_t = math.fsum(w * mu for w, (mu, _) in zip(inputs.weights, scopes, strict=True)) / total
        sigma_t = math.fsum(w * s for w, (_, s) in zip(inputs.weights, scopes, strict=True)) / total
    for x, (mu, sigma) in zip(inputs.tensors, scopes, strict=True):
        x.sub_(numerics.scalar(mu, x))
        if sigma > 0:
            x.mul_(numerics.scalar(sigma_t / sigma, x))
        x.add_(numerics.scalar(mu_t, x))
    out = numerics.weighted_sum_(inputs.tensors, inputs.weights)
    return out.div_(numerics.scalar(total, out))


# ---------------------------------------------------------------------------------------------
# safety-aware freezing
# ---------------------------------------------------------------------------------------------


def merge_safe(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """Safety-aware merge: keep the base where the contributions disagree most.

    m = sum_i w_i X_i / sum_i w_i; v = sum_i w_i (X_i - m)^2 / sum_i w_i (weighted variance,
    elementwise); F = the k = floor(fraction * n) entries of largest v (ties: lowest flat index),
    restricted to v > 0; out = B on F, m elsewhere.

    Rationale (docs): the safety-preserving merges of the literature (SafeMerge, Djuhera et al.
    2025; Safe LoRA) keep the aligned model's weights where the fine-tuned updates drift; they
    need an aligned/unaligned model pair or harmful-prompt data, which a contribution set does not
    carry.  Disagreement between contributions is the data-free signal used instead.  Every
    elementwise step is rounded once; sums over contributions in canonical order."""
    base = require_base(inputs, "safe_merge")
    fraction: float = params["fraction"]
    check_fraction("safe_merge", "fraction", fraction)
    total = weight_total("safe_merge", inputs.weights)
    mean = numerics.weighted_sum(inputs.tensors, inputs.weights)
    mean.div_(numerics.scalar(total, mean))
    spread = []
    for x in inputs.tensors:
        d = x - mean
        spread.append(d * d)
    variance = numerics.weighted_sum(spread, inputs.weights)
    variance.div_(numerics.scalar(total, variance))
    del spread
    k = math.floor(fraction * variance.numel())
    frozen = numerics.topk_mask(torch.nan_to_num(variance, nan=0.0), k) & (variance > 0)
    return torch.where(frozen, base, mean)


# ---------------------------------------------------------------------------------------------
# LED-Merging
# ---------------------------------------------------------------------------------------------


def merge_led(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """LED-Merging (Ma et al., ACL 2025, "LED-Merging: Mitigating Safety-Utility Conflicts in
    Model Merging with Location-Election-Disjoint"), with magnitude importance.

    tau_i = X_i - B.
    Locate: L_i = the max(1, floor(density_i * n)) entries of largest |tau_i| (ties: lowest flat
    index; density_i >= 1: all).
    Elect: E_i = L_i and T, T = the max(1, floor(base_density * n)) entries of largest |B|
    (base_density >= 1: T is everything, the default).
    Disjoint: D_i = E_i minus every entry elected by another contribution.
    out = B + lambda * sum_i w_i D_i . tau_i.

    The paper scores importance with gradients on task data (|theta . grad L| for the base and
    each fine-tuned model); without data the scores are magnitudes: |tau_i| for what a
    contribution changed, |B| for what the base relies on."""
    base = require_base(inputs, "led_merge")
    densities: list[float] = params["density"]
    base_density: float = params["base_density"]
    lam: float = params["lambda"]
    check_fraction("led_merge", "base_density", base_density, open_low=True)
    for density in densities:
        check_fraction("led_merge", "density", density, open_low=True)
    taus = task_vectors(inputs, "led_merge")
    important = None if base_density >= 1 else top_fraction_mask(torch.abs(base), base_density)
    elected: list[torch.Tensor] = []
    for tau, density in zip(taus, densities, strict=True):
        mask = top_fraction_mask(torch.abs(tau), density)
        elected.append(mask if important is None else mask & important)
    count = torch.zeros(base.shape, dtype=torch.int32)
    for mask in elected:
        count += mask
    alone = count == 1
    kept = [_masked(tau, mask & alone) for tau, mask in zip(taus, elected, strict=True)]
    coefficients = [lam * w for w in inputs.weights]
    return base + numerics.weighted_sum(kept, coefficients)


# ---------------------------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------------------------


register(
    Strategy(
        name="emr",
        params=(
            Param(
                "mode",
                str,
                "average",
                help="'average': mean of the task-specific models; 'unified': mean rescaler",
            ),
        ),
        base="required",
        stochastic=False,
        merge=merge_emr,
        summary="EMR-Merging: elected unified task vector with task masks and rescalers",
    )
)

register(
    Strategy(
        name="negative_merge",
        params=(
            Param(
                "negate",
                bool,
                True,
                per_contribution=True,
                help="subtract this contribution's task vector",
            ),
            LAMBDA,
        ),
        base="required",
        stochastic=False,
        merge=merge_negative,
        summary="task arithmetic with negation: forget the negated contributions",
    )
)

register(
    Strategy(
        name="split_unlearn_merge",
        params=(
            Param("method", str, "ties", help="'ties' or 'task_arithmetic'"),
            Param(
                "density",
                float,
                1.0,
                per_contribution=True,
                help="TIES: fraction of each task vector kept",
            ),
            LAMBDA,
            Param("negate", bool, False, help="contributions are forget-set fine-tunes: negate"),
        ),
        base="required",
        stochastic=False,
        merge=merge_split_unlearn,
        summary="SPUNGE merge step: merge per-split unlearned models",
    )
)

register(
    Strategy(
        name="weight_scope_alignment",
        params=(Param("target", str, "mean", help="'mean' of the scopes or the 'base' scope"),),
        base="optional",
        stochastic=False,
        merge=merge_weight_scope_alignment,
        summary="align each tensor's mean and spread to a target scope, then average",
    )
)

register(
    Strategy(
        name="safe_merge",
        params=(Param("fraction", float, 0.1, help="fraction of entries frozen to the base"),),
        base="required",
        stochastic=False,
        merge=merge_safe,
        summary="weighted mean, base kept where the contributions disagree most",
    )
)

register(
    Strategy(
        name="led_merge",
        params=(
            Param(
                "density",
                float,
                0.2,
                per_contribution=True,
                help="fraction of each task vector located",
            ),
            Param("base_density", float, 1.0, help="fraction of base weights deemed important"),
            LAMBDA,
        ),
        base="required",
        stochastic=False,
        merge=merge_led,
        summary="LED-Merging: locate, elect, keep updates no other contribution claims",
    )
)
