"""The paper's data-free spectral methods: STAR, AdaRank, KnOTS and dual projection.

STAR and AdaRank truncate each task matrix's SVD (different keep rules); KnOTS (svd_knot_tying)
takes one SVD of the concatenated task updates and merges in the shared basis; dual_projection
splits every task vector into its part in the contributions' shared subspace and the rest, from
the exact K x K Gram matrix (no large SVD).  Matrices are tensors of 2 or more dimensions, seen
as (shape[0], rest); 0-d and 1-D tensors have no spectrum and take each method's documented
fallback.  Decompositions go through :func:`numerics.svd` / :func:`numerics.eigh` (float64, one
thread, MKL's compatible branch); everything elementwise is one rounding per operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from .common import LAMBDA, check_fraction, require_base, task_vectors, weight_total
from .registry import Param, Strategy, TensorInputs, register
from .task_arithmetic import VARIANTS, generalized_task_arithmetic

__all__ = [
    "keep_count",
    "merge_adarank",
    "merge_dual_projection",
    "merge_star",
    "merge_svd_knot_tying",
]


def matrix_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a (shape[0], rest) matrix, or None for 0-d and 1-D tensors."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else None


def keep_count(values: list[float], fraction: float) -> int:
    """The smallest r with fsum(values[:r]) >= fraction * fsum(values), for non-negative values
    in descending order (0 when they are all zero).  Exact prefix sums (math.fsum), found by
    bisection, so the count is a function of the values alone."""
    total = math.fsum(values)
    if total <= 0:
        return 0
    target = fraction * total  # fraction in (0, 1] (validated), so r = len(values) qualifies
    lo, hi = 1, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if math.fsum(values[:mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


Truncation = Callable[[torch.Tensor], torch.Tensor]


def _star_truncation(eta: float) -> Truncation:
    def truncate(m: torch.Tensor) -> torch.Tensor:
        u, s, vh = numerics.svd(m)
        values = s.tolist()
        r = keep_count(values, eta)
        if r == 0:
            return torch.zeros(m.shape, dtype=torch.float64)
        scale = math.fsum(values) / math.fsum(values[:r])  # nuclear norm kept unchanged
        return numerics.matmul(u[:, :r] * (s[:r] * scale), vh[:r])

    return truncate


def _energy_truncation(energy: float) -> Truncation:
    def truncate(m: torch.Tensor) -> torch.Tensor:
        u, s, vh = numerics.svd(m)
        r = keep_count((s * s).tolist(), energy)
        if r == 0:
            return torch.zeros(m.shape, dtype=torch.float64)
        return numerics.matmul(u[:, :r] * s[:r], vh[:r])

    return truncate


def _truncated_sum(
    inputs: TensorInputs, params: Mapping[str, Any], strategy: str, truncate: Truncation
) -> torch.Tensor:
    """out = B + sum_i c_i T(tau_i), c_i = lambda w_i [/ sum_j w_j]; T = ``truncate`` on
    matrices (its float64 result rounded once to the compute dtype), identity on 0-d/1-D."""
    base = require_base(inputs, strategy)
    lam: float = params["lambda"]
    total = weight_total(strategy, inputs.weights) if params["normalize"] else 1.0
    taus = task_vectors(inputs, strategy)
    for tau in taus:
        m = matrix_view(tau)
        if m is not None:
            tau.copy_(truncate(m).reshape(tau.shape))  # one rounding to the compute dtype
    coefficients = [lam * w / total for w in inputs.weights]
    return base + numerics.weighted_sum(taus, coefficients)


def merge_star(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """STAR: Spectral Truncation And Rescale (Lee et al., NAACL 2025, "STAR: Spectral Truncation
    and Rescale for Model Merging").

    For each matrix tau_i = X_i - B = U diag(s) V^T (s descending): keep the smallest r with
    s_1 + .. + s_r >= eta * ||tau_i||_* (nuclear norm), rescale the kept values by
    ||tau_i||_* / (s_1 + .. + s_r) so the nuclear norm is preserved:
    T(tau_i) = U_r diag(s_r * ||tau_i||_* / sum s_r) V_r^T.
    out = B + lambda * sum_i w_i T(tau_i) / sum_i w_i (normalize=true, default: the paper's
    average) or B + lambda * sum_i w_i T(tau_i).
    0-d and 1-D tensors (biases, norms) are not truncated: T(tau) = tau.  Tensors of more than 2
    dimensions are (shape[0], rest) matrices.  Data-free as in the paper."""
    eta: float = params["eta"]
    check_fraction("star", "eta", eta, open_low=True)
    return _truncated_sum(inputs, params, "star", _star_truncation(eta))


def merge_adarank(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """AdaRank (Lee et al., 2025, "AdaRank: Adaptive Rank Pruning for Enhanced Model Merging"),
    data-free rank rule.

    For each matrix tau_i = X_i - B = U diag(s) V^T: keep the smallest r with
    s_1^2 + .. + s_r^2 >= energy * sum_j s_j^2 (so each task vector and layer gets its own rank),
    T(tau_i) = U_r diag(s_r) V_r^T, no rescaling.
    out = B + lambda * sum_i w_i T(tau_i) [/ sum_i w_i with normalize=true].
    The paper learns a binary mask over each task vector's singular components by test-time
    entropy minimisation on unlabelled data; without data the mask keeps the leading components
    up to the energy threshold.  0-d and 1-D tensors are not truncated."""
    energy: float = params["energy"]
    check_fraction("adarank", "energy", energy, open_low=True)
    return _truncated_sum(inputs, params, "adarank", _energy_truncation(energy))


_KNOTS_METHODS = {"ties": "ties", "linear": "task_arithmetic"}
_VARIANTS = {v.name: v for v in VARIANTS}


def merge_svd_knot_tying(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """KnOTS (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS").

    For matrices: tau_i = X_i - B (m x n); one SVD of the concatenation
    [tau_1 .. tau_K] = U diag(s) [V_1 .. V_K] (m x Kn, V_i the r x n block of task i; r = rank
    of the thin SVD); merge the aligned blocks V_merged = merge(V_1 .. V_K) and map back:
    out = B + U diag(s) V_merged.
    merge = TIES (method "ties", default: top-density trim of each V_i, sign election on
    sum_i w_i V_i, disjoint weighted mean with normalize=true) or the weighted sum (method
    "linear", / sum w with normalize=true), times lambda.  The basis is shared by all
    contributions: no alignment to a first model, so the result is order-free.
    0-d and 1-D tensors have no basis: merge is applied to tau_i directly."""
    method: str = params["method"]
    if method not in _KNOTS_METHODS:
        raise ResolveError(
            f"strategy svd_knot_tying: parameter method must be 'ties' or 'linear', got {method!r}"
        )
    variant = _VARIANTS[_KNOTS_METHODS[method]]
    if variant.sparsifier is None and any(d != 1.0 for d in params["density"]):
        raise ResolveError(
            "strategy svd_knot_tying: parameter density applies to method 'ties' only"
        )
    if params["normalize"] and variant.sparsifier is None:
        weight_total("svd_knot_tying", inputs.weights)
    core = {
        "density": params["density"],
        "lambda": params["lambda"],
        "normalize": params["normalize"],
        "rescale": False,
    }
    base = require_base(inputs, "svd_knot_tying")
    if base.dim() < 2:
        return generalized_task_arithmetic(variant, inputs, core)
    taus = task_vectors(inputs, "svd_knot_tying")
    mats = [t.reshape(t.shape[0], -1) for t in taus]
    n = mats[0].shape[1]
    u, s, vh = numerics.svd(torch.cat(mats, dim=1))
    del mats
    blocks = [vh[:, i * n : (i + 1) * n].contiguous() for i in range(len(taus))]
    aligned = TensorInputs(
        name=inputs.name,
        base=torch.zeros(blocks[0].shape, dtype=torch.float64),
        tensors=blocks,
        contribution_ids=inputs.contribution_ids,
        weights=inputs.weights,
        rng=inputs.rng,
    )
    merged = generalized_task_arithmetic(variant, aligned, core)
    delta = numerics.matmul(u * s, merged).to(base.dtype)  # one rounding
    return base + delta.reshape(base.shape)


def merge_dual_projection(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """Dual projection: shared and task-specific parts of the task vectors.

    tau_i = X_i - B flattened; D = the K x d stack; P = projection onto the span of D's top-k
    right singular vectors, k = max(1, floor(rank_fraction * K)) (only directions with a
    non-zero singular value count).  With s = stability:
    out = B + sum_i w_i P tau_i + (1 - s) sum_i w_i (tau_i - P tau_i)   [/ sum_i w_i with
    normalize=true, default].
    Computed without an SVD of D: G = D D^T (K x K, exact dot products) = Q diag(l) Q^T, and
    P tau_i = sum_j C_ij tau_j with C = Q_k Q_k^T, so
    out = B + sum_j c_j tau_j,  c_j = (1 - s) w_j + s sum_i w_i C_ij  (/ sum w).
    The base is required (the task vectors are deltas from it)."""
    base = require_base(inputs, "dual_projection")
    rank_fraction: float = params["rank_fraction"]
    stability: float = params["stability"]
    check_fraction("dual_projection", "rank_fraction", rank_fraction, open_low=True)
    check_fraction("dual_projection", "stability", stability)
    total = weight_total("dual_projection", inputs.weights) if params["normalize"] else 1.0
    taus = task_vectors(inputs, "dual_projection")
    k_count = len(taus)
    gram = torch.zeros(k_count, k_count, dtype=torch.float64)
    for i in range(k_count):
        for j in range(i, k_count):
            gram[i, j] = gram[j, i] = numerics.dot(taus[i], taus[j])
    values, vectors = numerics.eigh(gram)  # ascending
    top = values.flip(0).tolist()
    tol = top[0] * k_count * 2.0**-52 if top and top[0] > 0 else 0.0
    k = min(max(1, math.floor(rank_fraction * k_count)), sum(1 for v in top if v > tol))
    q = vectors.flip(1)[:, :k]
    c_matrix = numerics.matmul(q, q.T).tolist()
    w = inputs.weights
    coefficients = [
        (
            (1.0 - stability) * w[j]
            + stability * math.fsum(w[i] * c_matrix[i][j] for i in range(k_count))
        )
        / total
        for j in range(k_count)
    ]
    return base + numerics.weighted_sum(taus, coefficients)


register(
    Strategy(
        name="star",
        params=(
            Param("eta", float, 0.4, help="fraction of each nuclear norm the kept values hold"),
            LAMBDA,
            Param("normalize", bool, True, help="divide by the sum of the weights"),
        ),
        base="required",
        stochastic=False,
        merge=merge_star,
        summary="STAR: spectral truncation of each task matrix, nuclear-norm rescale, average",
        compute_bound=True,
    )
)

register(
    Strategy(
        name="adarank",
        params=(
            Param("energy", float, 0.9, help="fraction of each spectrum's energy kept"),
            LAMBDA,
            Param("normalize", bool, False, help="divide by the sum of the weights"),
        ),
        base="required",
        stochastic=False,
        merge=merge_adarank,
        summary="AdaRank (data-free): per-task, per-layer rank by spectral energy, then sum",
        compute_bound=True,
    )
)

register(
    Strategy(
        name="svd_knot_tying",
        aliases=("knots",),
        params=(
            Param("method", str, "ties", help="merge in the shared basis: 'ties' or 'linear'"),
            Param(
                "density",
                float,
                1.0,
                per_contribution=True,
                help="TIES: fraction of each aligned block kept",
            ),
            LAMBDA,
            Param("normalize", bool, True, help="divide by the (agreeing) weights"),
        ),
        base="required",
        stochastic=False,
        merge=merge_svd_knot_tying,
        summary="KnOTS: one SVD of the concatenated updates, merge in the shared basis",
        compute_bound=True,
    )
)

register(
    Strategy(
        name="dual_projection",
        params=(
            Param("rank_fraction", float, 0.5, help="shared subspace rank as a fraction of K"),
            Param("stability", float, 0.5, help="damping of the task-specific parts"),
            Param("normalize", bool, True, help="divide by the sum of the weights"),
        ),
        base="required",
        stochastic=False,
        merge=merge_dual_projection,
        summary="shared-subspace part kept, task-specific parts damped by the stability",
    )
)
