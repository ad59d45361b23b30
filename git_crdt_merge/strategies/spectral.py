"""The paper's data-free spectral methods: STAR, AdaRank, KnOTS and dual projection.

STAR and AdaRank truncate each task matrix's SVD (different keep rules); KnOTS (svd_knot_tying)
takes one SVD of the concatenated task updates and merges in the shared basis; dual_projection
splits every task vector into its part in the contributions' shared subspace and the rest, from
the exact K x K Gram matrix (no large SVD).  Matrices are tensors of 2 or more dimensions, seen
as (shape[0], rest); 0-d and 1-D tensors have no spectrum and take each method's documented
fallback.  Decompositions go through :func:`numerics.svd` / :func:`numerics.eigh` (float64, one
thread, MKL's AVX2 branch); everything elementwise is one rounding per operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from ..numerics import spectral as lowrank
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
    # fraction in (0, 1] (validated), so fraction * total <= total and r = len(values) qualifies
    r = lowrank.prefix_rank(values, fraction * total)
    return len(values) if r is None else r


Truncation = Callable[[torch.Tensor, str], torch.Tensor]
"""T(m, key): the float64 truncation of matrix ``m``; ``key`` names the (tensor, contribution)
pair, the address of the range finder's test matrices."""

_F64 = torch.float64
_STAR_ANGLE = 2.0**-26
"""STAR's subspace iteration is accepted when it certifies sin(angle) <= this to the exact
leading eigenspace of the Gram (Davis-Kahan)."""
_STAR_ITERATIONS = 20


def _wide(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``m`` in float64 with no more rows than columns (transposed when tall), and whether it
    was transposed."""
    w = m.to(_F64)
    return (w, False) if w.shape[0] <= w.shape[1] else (w.T, True)


def _unwide(t: torch.Tensor, flipped: bool) -> torch.Tensor:
    return t.T.contiguous() if flipped else t


def _gram_projection(w: torch.Tensor, vectors: torch.Tensor, r: int) -> torch.Tensor:
    """U_r U_r^T w for the Gram eigenvectors ``vectors`` (columns, descending eigenvalues):
    through the kept r columns, or as w - U_rest U_rest^T w when fewer columns are dropped."""
    m = w.shape[0]
    if r >= m:
        return w.clone()
    if r <= m - r:
        kept = vectors[:, :r]
        return numerics.matmul(kept, numerics.matmul(kept.T, w))
    rest = vectors[:, r:]
    return w - numerics.matmul(rest, numerics.matmul(rest.T, w))


def _grow(r: int, step: int, top: int) -> tuple[int, int]:
    return min(top, r + step), step * 2


def _energy_exact(w: torch.Tensor, target: float) -> torch.Tensor:
    """AdaRank's exact path: eigh of the m x m Gram; r from its eigenvalues (squared singular
    values), grown (by 1, 2, 4 ...) until the float64 result's exact energy reaches ``target``
    (only rounding can make it fall short; at r = m the result is w itself)."""
    m = w.shape[0]
    values, vectors = numerics.eigh(numerics.matmul_symmetric(w, w.T))
    vectors = vectors.flip(1)
    r = lowrank.prefix_rank(lowrank.gram_spectrum(values), target)
    r = m if r is None else max(r, 1)
    step = 1
    while True:
        t = _gram_projection(w, vectors, r)
        if r >= m or lowrank.holds_energy(t, target):
            return t
        r, step = _grow(r, step, m)


def _energy_sketched(w: torch.Tensor, target: float, key: str) -> torch.Tensor | None:
    """AdaRank's range-finder path, or None when the rank it needs exceeds a third of m.

    Grows Q by blocks of :func:`lowrank.block_size` columns (:func:`lowrank.range_finder`);
    after each block, B = Q^T w (kept as rows) and the eigenvalues of B B^T give the captured
    energies; r = the smallest count whose leading captured energy reaches ``target``, accepted
    once Q has at least one further block of columns (oversampling) and the projection of w on
    the r leading directions has exact energy >= ``target``.  The work stops early (None) when
    the energy still missing, spread over components no larger than the last captured one,
    would need more than m / 3 columns."""
    m = w.shape[0]
    b = lowrank.block_size(m)
    limit = m // 3
    if 2 * b > limit:
        return None
    q = torch.zeros(m, 0, dtype=_F64, device=w.device)
    rows = torch.zeros(0, w.shape[1], dtype=_F64, device=w.device)
    bb = torch.zeros(0, 0, dtype=_F64, device=w.device)
    block = 0
    while q.shape[1] + b <= limit:
        y = lowrank.range_finder(w, key, b, block, q)
        new = numerics.matmul(y.T, w)
        cross = numerics.matmul(new, rows.T)
        bb = torch.cat(
            [torch.cat([bb, cross.T], dim=1), torch.cat([cross, numerics.matmul(new, new.T)], 1)]
        )
        q = torch.cat([q, y], dim=1)
        rows = torch.cat([rows, new])
        k = q.shape[1]
        values, vectors = numerics.eigh(bb)
        sig2 = lowrank.gram_spectrum(values)
        vectors = vectors.flip(1)
        r = lowrank.prefix_rank(sig2, target)
        if r is not None:
            r, step = max(r, 1), 1
            while r + b <= k:
                t = lowrank.project(w, numerics.matmul(q, vectors[:, :r]))
                if lowrank.holds_energy(t, target):
                    return t
                r, step = _grow(r, step, k)
        if r is None and sig2[k - 1] > 0:
            r = k + math.ceil((target - math.fsum(sig2)) / sig2[k - 1])
        if r is None or r + b > limit:
            return None
        block += 1
    return None


def _star_truncation(eta: float) -> Truncation:
    def truncate(m: torch.Tensor, key: str) -> torch.Tensor:
        w, flipped = _wide(m)
        gram = numerics.matmul_symmetric(w, w.T)
        vectors: torch.Tensor | None = None
        if _flat(gram, key):  # the vectors will be needed: one eigh gives the values too
            values, vectors = numerics.eigh(gram)
        else:
            values = lowrank.eigvalsh(gram)
        lam = lowrank.gram_spectrum(values)
        floor = lam[0] * len(lam) * 2.0**-52 if lam else 0.0  # the Gram's rounding: s = 0
        sing = [math.sqrt(v) if v > floor else 0.0 for v in lam]
        r = keep_count(sing, eta)
        if r == 0:
            return torch.zeros(m.shape, dtype=_F64)
        scale = math.fsum(sing) / math.fsum(sing[:r])  # nuclear norm kept unchanged
        t = None if vectors is not None else _star_subspace(w, gram, lam, r, key)
        if t is None:
            if vectors is None:
                _, vectors = numerics.eigh(gram)
            t = _gram_projection(w, vectors.flip(1), r)
        return _unwide(t * scale, flipped)

    return truncate


def _flat(gram: torch.Tensor, key: str) -> bool:
    """Whether the spectrum looks too flat for the subspace iteration to pay: stable rank
    trace(G) / lambda_1 above m / 16, lambda_1 estimated by 8 power steps (a lower bound, so
    the stable rank is over-estimated).  Only chooses between two exact-enough paths."""
    m = gram.shape[0]
    if m < 48:
        return True
    v = lowrank.sketch(key, 0, m, 1, gram.device)
    for _ in range(8):
        v = numerics.matmul(gram, v)
        v = v / math.sqrt(lowrank.energy(v)) if lowrank.energy(v) > 0 else v
    top = lowrank.energy(numerics.matmul(gram, v))
    trace = numerics.exact_sum(torch.diagonal(gram))
    return top <= 0 or trace / math.sqrt(top) > m / 16


def _star_subspace(
    w: torch.Tensor, gram: torch.Tensor, lam: list[float], r: int, key: str
) -> torch.Tensor | None:
    """U_r U_r^T w by subspace iteration on the Gram G from a sketched start (k = r + block
    columns), or None when k exceeds a third of m, the r-th and (r+1)-th Gram eigenvalues are
    not separated, or :data:`_STAR_ITERATIONS` steps do not certify the subspace.

    After each step, Rayleigh-Ritz gives Ritz pairs (theta_j, x_j); the r leading ones are
    accepted when ||G X_r - X_r diag(theta_r)||_F <= :data:`_STAR_ANGLE` * (theta_r - l_{r+1}),
    l_{r+1} the exact (r+1)-th Gram eigenvalue: by Davis-Kahan's sin-theta theorem the sine of
    the largest angle between span X_r and the leading r-dimensional eigenspace of G is then at
    most :data:`_STAR_ANGLE`."""
    m = w.shape[0]
    k = r + lowrank.block_size(m)
    if k > m // 3:
        return None
    gap_below = lam[r] if r < len(lam) else 0.0
    gap = lam[r - 1] - gap_below
    rho = lam[k] / lam[r - 1] if k < len(lam) else 0.0  # the error's decrease per step
    if gap <= 0 or rho >= 1:
        return None
    if rho > 0:  # steps to reach the certificate from an O(1) start; each costs ~2 m^2 k
        steps = math.log(_STAR_ANGLE * gap / lam[0]) / math.log(rho)
        if steps > _STAR_ITERATIONS or steps * (2 * m * k + 4 * k * k) > 4 * m * m:
            return None
    y = lowrank.orthonormal(numerics.matmul(gram, lowrank.sketch(key, 0, m, k, gram.device)))
    for _ in range(_STAR_ITERATIONS):
        z = numerics.matmul(gram, y)
        values, vectors = numerics.eigh(numerics.matmul(y.T, z))
        theta = values.flip(0)[:r]
        kept = vectors.flip(1)[:, :r]
        x = numerics.matmul(y, kept)
        residual = numerics.matmul(z, kept) - x * theta
        gap = float(theta[-1]) - gap_below
        if gap > 0 and math.sqrt(lowrank.energy(residual)) <= _STAR_ANGLE * gap:
            return lowrank.project(w, x)
        y = lowrank.orthonormal(z)
    return None


def _energy_truncation(energy: float) -> Truncation:
    def truncate(m: torch.Tensor, key: str) -> torch.Tensor:
        w, flipped = _wide(m)
        total = numerics.dot(w, w)  # exact: float32 squares are exact in float64
        if total <= 0:
            return torch.zeros(m.shape, dtype=_F64)
        target = energy * total
        t = _energy_sketched(w, target, key)
        if t is None:
            t = _energy_exact(w, target)
        return _unwide(t, flipped)

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
    for tau, cid in zip(taus, inputs.contribution_ids, strict=True):
        m = matrix_view(tau)
        if m is not None:
            tau.copy_(
                truncate(m, f"{inputs.name}\n{cid}").reshape(tau.shape)
            )  # one rounding to the compute dtype
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


def _knots_basis(
    mats: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """U (m x r), s (r) and the blocks V_i (r x n) of [tau_1 .. tau_K] = U diag(s) [V_1 .. V_K],
    r = min(m, Kn).

    For m <= Kn: from eigh of the m x m Gram sum_i tau_i tau_i^T (the concatenation's, one
    product), s = sqrt(eigenvalue) and V_i = diag(1/s) U^T tau_i.  A direction whose eigenvalue
    is at most m * 2^-52 * s_1^2 (zero within the Gram's rounding) gets s = 0 and a zero V row:
    it adds nothing to the output (U diag(s) V_merged), as a zero singular value of the full SVD
    does, whose V row is an arbitrary unit vector of LAPACK's choosing.  For m > Kn (tall
    updates, few contributions) the full SVD of the concatenation, as before."""
    m = mats[0].shape[0]
    n = mats[0].shape[1]
    mats64 = [t.to(_F64) for t in mats]  # once: the Gram and the blocks read them
    concatenated = torch.cat(mats64, dim=1)
    if m > concatenated.shape[1]:
        u, s, vh = numerics.svd(concatenated)
        return u, s, [vh[:, i * n : (i + 1) * n].contiguous() for i in range(len(mats))]
    values, u = numerics.eigh(numerics.matmul_symmetric(concatenated, concatenated.T))
    del concatenated
    values, u = values.flip(0).clamp(min=0.0), u.flip(1)
    tol = float(values[0]) * m * 2.0**-52 if m else 0.0
    kept = values > tol
    s = torch.where(kept, values, 0.0).sqrt()
    divisor = torch.where(kept, s, 1.0).unsqueeze(1)
    zero = kept.logical_not().unsqueeze(1)
    dropped = not bool(kept.all())
    blocks = []
    for t in mats64:
        block = numerics.matmul(u.T, t).div_(divisor)  # a new tensor: divided in place
        if dropped:
            block.masked_fill_(zero, 0.0)
        blocks.append(block)
    return u, s, blocks


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
    u, s, blocks = _knots_basis([t.reshape(t.shape[0], -1) for t in taus])
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
        float64_scratch=(4, 0, 3),  # w, projections; Gram, eigenvectors (+ a flipped copy)
        revision=2,  # Gram / range-finder algorithms (was: full SVD)
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
        float64_scratch=(4, 0, 3),  # as star
        revision=2,  # Gram / range-finder algorithms (was: full SVD)
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
        float64_scratch=(2, 2, 3),  # the task matrices and blocks, the Gram and its vectors
        revision=2,  # Gram / range-finder algorithms (was: full SVD)
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
        revision=2,  # MKL's AVX2 reproducibility branch (was: COMPATIBLE)
    )
)
