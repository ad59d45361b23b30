"""Merges that need data about each model: Fisher merging and RegMean.

Their extra inputs (Fisher diagonals, Gram matrices of layer inputs) come with the
contributions (``add-contribution --fisher / --gram``), stored like the weights; resolution
refuses to run without them rather than inventing them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from .registry import Param, Strategy, TensorInputs, register

__all__ = ["merge_fisher", "merge_regmean"]


def _positive_weights(name: str, inputs: TensorInputs) -> None:
    for cid, w in zip(inputs.contribution_ids, inputs.weights, strict=True):
        if not w > 0:
            raise ResolveError(
                f"strategy {name}: contribution {cid[:12]} has weight {w:g}; this method "
                "needs positive weights"
            )


def _present(name: str, inputs: TensorInputs, kind: str) -> list[torch.Tensor] | None:
    """The contributions' ``kind`` tensors for this name; None when no contribution has one
    (the tensor then falls back to the weighted average); an error when only some do."""
    items = inputs.extras.get(kind, [None] * len(inputs.tensors))
    have = [x is not None for x in items]
    if not any(have):
        return None
    if not all(have):
        missing = inputs.contribution_ids[have.index(False)]
        raise ResolveError(
            f"strategy {name}: tensor {inputs.name!r} has a {kind} input in some contributions "
            f"but not in {missing[:12]}; give it for all or for none"
        )
    return [x for x in items if x is not None]


def _weighted_average(inputs: TensorInputs) -> torch.Tensor:
    total = numerics.scalar(sum(inputs.weights), inputs.tensors[0])
    return numerics.weighted_sum_(inputs.tensors, inputs.weights) / total


# -- Fisher merging -----------------------------------------------------------------------------

_FISHER_SOURCES = ("data", "squared_weights")


def _fisher_extras(params: Mapping[str, Any]) -> tuple[str, ...]:
    source = params["fisher_source"]
    if source not in _FISHER_SOURCES:
        raise ResolveError(
            f"strategy fisher_merge: parameter fisher_source must be one of "
            f"{', '.join(_FISHER_SOURCES)}, got {source!r}"
        )
    return ("fisher",) if source == "data" else ()


def merge_fisher(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """theta* = sum_i w_i F~_i theta_i / sum_i w_i F~_i   (elementwise),   F~_i = F_i + epsilon

    Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS
    2022): the mode of the product of the models' Laplace posteriors, each a diagonal Gaussian
    with precision F_i, the diagonal Fisher information that the contribution carries as its
    ``fisher`` extra input.  ``epsilon`` (>= 0) is added to every Fisher value, so an element
    where every F_i = 0 gets the weighted average; weights w_i (> 0) are the paper's model
    coefficients lambda_i.  A tensor for which no contribution has a Fisher diagonal is the
    weighted average sum_i w_i theta_i / sum_i w_i; one for which only some have one is an
    error.  fisher_source="squared_weights" replaces F_i by theta_i^2 (a data-free proxy, NOT
    the paper's method).  Products and sums are single roundings in canonical order."""
    _positive_weights("fisher_merge", inputs)
    _fisher_extras(params)
    eps: float = params["epsilon"]
    if not eps >= 0:
        raise ResolveError(f"strategy fisher_merge: parameter epsilon must be >= 0, got {eps}")
    if params["fisher_source"] == "squared_weights":
        fishers: Sequence[torch.Tensor] | None = [t * t for t in inputs.tensors]
    else:
        fishers = _present("fisher_merge", inputs, "fisher")
    if fishers is None:
        return _weighted_average(inputs)
    like = inputs.tensors[0]
    scaled: list[torch.Tensor] = []
    for f, w in zip(fishers, inputs.weights, strict=True):
        f = f.reshape(like.shape)
        if eps != 0:
            f = f + numerics.scalar(eps, f)
        scaled.append(f * numerics.scalar(w, f))
    den = numerics.ordered_sum(scaled)
    for t, s in zip(inputs.tensors, scaled, strict=True):
        t.mul_(s)
    num = numerics.ordered_sum(inputs.tensors)
    if bool((den == 0).any()):
        raise ResolveError(
            f"strategy fisher_merge: tensor {inputs.name!r} has elements where every Fisher "
            "value is 0; set epsilon > 0"
        )
    return num / den


register(
    Strategy(
        name="fisher_merge",
        params=(
            Param("epsilon", float, 1e-8, help="added to every Fisher value (>= 0)"),
            Param(
                "fisher_source",
                str,
                "data",
                help="data: the contributions' --fisher inputs (the paper); squared_weights: "
                "theta^2, a data-free proxy",
            ),
        ),
        base="ignored",
        stochastic=False,
        merge=merge_fisher,
        summary="Fisher merging: average weighted elementwise by each model's Fisher diagonal",
        extra_inputs=("fisher",),
        required_extras=_fisher_extras,
    )
)


# -- RegMean ------------------------------------------------------------------------------------


def merge_regmean(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """W* = (sum_i w_i W_i G~_i) (sum_i w_i G~_i)^-1,   G~_i = alpha G_i + (1 - alpha) diag(G_i)

    RegMean (Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights
    of Language Models", ICLR 2023): for a linear layer y = W x with weight W (out, in) and the
    Gram matrix G_i = X_i^T X_i (in, in) of its inputs in model i (the ``gram`` extra input),
    W* minimises sum_i ||X_i W^T - X_i W_i^T||^2; alpha in [0, 1] scales the off-diagonal
    entries of every G_i (the paper's regularisation; alpha = 1 is plain RegMean, the diagonal is
    kept exactly).  Weights w_i (> 0; not in the paper, where all are 1) scale each model's
    Gram.  Tensors without Gram matrices (biases, norms, embeddings) are the weighted average
    sum_i w_i W_i / sum_i w_i, as in the paper.  Computed in float64: products through
    numerics.matmul, A and B the sums above in canonical order, B symmetrised as (B + B^T) / 2
    (exact halving), W*^T = B^-1 A^T by Cholesky (numerics.solve_spd: B is symmetric positive
    definite when every input feature is non-zero in some model's data, and alpha < 1 or the
    Grams have full rank; otherwise the LU solve)."""
    _positive_weights("regression_mean", inputs)
    alpha: float = params["alpha"]
    if not 0.0 <= alpha <= 1.0:
        raise ResolveError(
            f"strategy regression_mean: parameter alpha must be in [0, 1], got {alpha}"
        )
    grams = _present("regression_mean", inputs, "gram")
    if grams is None:
        return _weighted_average(inputs)
    like = inputs.tensors[0]
    if like.dim() != 2:  # pragma: no cover - checked when the contribution was added
        raise ResolveError(f"strategy regression_mean: tensor {inputs.name!r} is not 2-D")
    inner = like.shape[1]
    a: torch.Tensor | None = None  # sum_i W_i G~_i, accumulated in canonical order
    b: torch.Tensor | None = None  # sum_i G~_i
    for w, g, t in zip(inputs.weights, grams, inputs.tensors, strict=True):
        # G~_i in place on a float64 copy: where(eye, G, G * alpha) * w, the same roundings
        g_reg = g.reshape(inner, inner).to(torch.float64, copy=True)
        if alpha != 1.0:
            diagonal = g_reg.diagonal().clone()
            g_reg.mul_(alpha)
            g_reg.diagonal().copy_(diagonal)  # the diagonal kept exactly
        if w != 1.0:  # x * 1.0 is x: skipped
            g_reg.mul_(w)
        product = numerics.matmul(t, g_reg)
        a = product if a is None else a.add_(product)  # ((p0 + p1) + p2) + ...
        b = g_reg if b is None else b.add_(g_reg)
        del product, g_reg
    assert a is not None and b is not None
    b = (b + b.T).mul_(0.5)  # exact halving; no change for symmetric Gram matrices
    try:
        merged_t = numerics.solve_spd(b, a.T)  # a's rows are B^-1's right-hand sides
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        raise ResolveError(
            f"strategy regression_mean: tensor {inputs.name!r}: the summed Gram matrix is "
            "singular (an input feature is zero in every model's data)"
        ) from None
    return merged_t.T.to(like.dtype)


register(
    Strategy(
        name="regression_mean",
        aliases=("regmean",),
        params=(
            Param("alpha", float, 0.9, help="scale of the Gram matrices' off-diagonal entries"),
        ),
        base="ignored",
        stochastic=False,
        merge=merge_regmean,
        summary="RegMean: least-squares merge of linear layers from their inputs' Gram matrices",
        revision=2,  # Cholesky solve in MKL's AVX2 branch (was: LU, COMPATIBLE)
        compute_bound=True,
        float64_scratch=(3, 0, 3),  # A, a product, the solve's copy; B, B + B^T, its factor
        extra_inputs=("gram",),
    )
)
