"""The standard toolkit's spherical family: nuslerp, multislerp and karcher.

All three move along great circles instead of straight lines.  Norms, dot products and Gram
matrices are reproducible float64 reductions (:mod:`git_crdt_merge.numerics`); angles come from
``numerics.acos``/``sin``/``cos`` on float64 scalars, never from the platform's libm.  The result
is always a combination ``sum_i c_i v_i`` of the input vectors with float64 coefficients computed
from those exact scalars, each coefficient rounded once to the compute dtype: the iterations of
multislerp and karcher run on the K x K Gram matrix, not on whole tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from .common import gram
from .registry import Param, Strategy, TensorInputs, register

__all__ = ["merge_karcher", "merge_multislerp", "merge_nuslerp"]


def _quadratic(g: list[list[float]], a: Sequence[float], b: Sequence[float]) -> float:
    """a^T G b, summed with math.fsum (correctly rounded sum of the rounded products)."""
    return math.fsum(a[i] * g[i][j] * b[j] for i in range(len(a)) for j in range(len(b)))


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


# ---------------------------------------------------------------------------------------------
# nuslerp
# ---------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """The 2-D view whose rows are the vectors nuslerp interpolates."""
    if flatten or x.dim() == 0:
        return x.reshape(1, -1)
    if row_wise:  # vectors along dim 0
        return x.movedim(0, -1).reshape(-1, x.shape[0])
    return x.reshape(-1, x.shape[-1])


def _unrows(rows: torch.Tensor, shape: torch.Size, flatten: bool, row_wise: bool) -> torch.Tensor:
    if flatten or len(shape) == 0:
        return rows.reshape(shape)
    if row_wise:
        moved = (*shape[1:], shape[0])
        return rows.reshape(moved).movedim(-1, 0)
    return rows.reshape(shape)


def _slerp_coefficients(c: float, t: float) -> tuple[float, float]:
    """(s0, s1) with slerp = s0 v0 + s1 v1 for the cosine c of the angle between v0 and v1."""
    if 1.0 - c * c <= 1e-16:  # colinear: linear interpolation
        return 1.0 - t, t
    theta = numerics.acos(c)
    sin_theta = numerics.sin(theta)
    return numerics.sin((1.0 - t) * theta) / sin_theta, numerics.sin(t * theta) / sin_theta


def merge_nuslerp(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + s0 (X_1 - B) + s1 (X_2 - B)   (without a base: s0 X_1 + s1 X_2)

    t = w_2 / (w_1 + w_2) from the two contributions' weights in canonical order (0.5 if
    |w_1 + w_2| < 1e-6); v_j = X_j - B (or X_j); c = clamp(<v_1, v_2> / (max(||v_1||, 1e-7)
    max(||v_2||, 1e-7)), -1, 1); if 1 - c^2 <= 1e-16: s0 = 1 - t, s1 = t; otherwise
    theta = acos c, s0 = sin((1-t) theta) / sin theta, s1 = sin(t theta) / sin theta.
    Vectors: the whole tensor (nuslerp_flatten=true), else each row along the last dim, or with
    nuslerp_row_wise=true each vector along dim 0 (mergekit's naming).  Source: mergekit's
    nuslerp (Goddard et al. 2024), SLERP after Shoemake (1985) on task vectors."""
    w1, w2 = inputs.weights
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    flatten: bool = params["nuslerp_flatten"]
    row_wise: bool = params["nuslerp_row_wise"]
    base = inputs.base
    v0, v1 = inputs.tensors
    if base is not None:
        v0.sub_(base)  # task vectors, in place (the tensors belong to this call)
        v1.sub_(base)
    shape = v0.shape
    r0, r1 = _rows(v0, flatten, row_wise), _rows(v1, flatten, row_wise)
    if r0.shape[0] == 1:
        d00, d11, d01 = [numerics.dot(r0, r0)], [numerics.dot(r1, r1)], [numerics.dot(r0, r1)]
    else:
        d00 = numerics.dot_rows(r0, r0).tolist()
        d11 = numerics.dot_rows(r1, r1).tolist()
        d01 = numerics.dot_rows(r0, r1).tolist()
    s0s: list[float] = []
    s1s: list[float] = []
    cache: dict[float, tuple[float, float]] = {}
    for a, b, ab in zip(d00, d11, d01, strict=True):
        c = _clamp(ab / (max(math.sqrt(a), 1e-7) * max(math.sqrt(b), 1e-7)), -1.0, 1.0)
        if c not in cache:
            cache[c] = _slerp_coefficients(c, t)
        s0, s1 = cache[c]
        s0s.append(s0)
        s1s.append(s1)
    dtype = v0.dtype
    c0 = torch.tensor(s0s, dtype=torch.float64).to(dtype).unsqueeze(1)  # one rounding each
    c1 = torch.tensor(s1s, dtype=torch.float64).to(dtype).unsqueeze(1)
    out = r0 * c0
    out.add_(r1 * c1)
    merged = _unrows(out, shape, flatten, row_wise)
    if base is not None:
        merged = merged + base
    return merged


# ---------------------------------------------------------------------------------------------
# multislerp
# ---------------------------------------------------------------------------------------------


def merge_multislerp(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + (sum_i w_i n_i) cos(eps) mu / ||mu||,   mu = sum_i w_i Y_i / (n_i + eps)

    Y_i = X_i - B (X_i without a base), flattened; n_i = ||Y_i||; w = the contributions'
    weights, divided by their sum if normalize_weights.  This is mergekit's multislerp
    (barycentric interpolation on the hypersphere): U_i = Y_i / (n_i + eps), mu = sum_i w_i U_i,
    T = sum_i w_i (U_i - <U_i, mu^> mu^), R = mu^ cos r + T sin(r) / r with r = ||T|| + eps,
    out = (sum_i w_i n_i) R.  T is identically 0 (sum_i w_i <U_i, mu^> = ||mu||), so
    r = eps and R = cos(eps) mu^: computed exactly so, on the K x K Gram matrix of the Y_i.
    If ||mu|| < eps: with 2 contributions out = B + w_1 Y_1 + w_2 Y_2, with more an error.
    One contribution: out = X_1.  Normalised weights summing to 0 is an error."""
    xs = inputs.tensors
    if len(xs) == 1:
        return xs[0]
    eps: float = params["eps"]
    if eps < 0:
        raise ResolveError(f"strategy multislerp: parameter eps must be >= 0, got {eps}")
    weights = list(inputs.weights)
    if params["normalize_weights"]:
        total = math.fsum(weights)
        if total == 0:
            raise ResolveError(
                "strategy multislerp: parameter normalize_weights=true but the weights sum to 0"
            )
        weights = [w / total for w in weights]
    base = inputs.base
    if base is not None:
        for x in xs:
            x.sub_(base)
    g = gram(xs)
    norms = [math.sqrt(g[i][i]) for i in range(len(xs))]
    a = [w / (n + eps) for w, n in zip(weights, norms, strict=True)]
    mu_norm = math.sqrt(max(0.0, _quadratic(g, a, a)))
    if mu_norm < eps:
        if len(xs) != 2:
            raise ResolveError(
                f"strategy multislerp: tensor {inputs.name}: the contributions' directions "
                f"cancel (norm of their weighted mean {mu_norm:g} < eps)"
            )
        coefficients = weights
    else:
        scale = math.fsum(w * n for w, n in zip(weights, norms, strict=True))
        scale = scale * numerics.cos(eps) / mu_norm
        coefficients = [scale * ai for ai in a]
    out = numerics.weighted_sum_(xs, coefficients)
    if base is not None:
        out.add_(base)
    return out


# ---------------------------------------------------------------------------------------------
# karcher
# ---------------------------------------------------------------------------------------------


def merge_karcher(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = (1/N sum_i n_i) mu,   mu = the Karcher (Riemannian) mean of the U_i on the sphere

    n_i = ||X_i|| over the whole tensor; U_i = X_i / n_i for the n_i > tol (the others are left
    out, alpha_i = 1 / #valid); mu_0 = normalise(sum_i alpha_i U_i) (U_first if its norm is
    < tol).  Up to max_iter times: theta_i = acos(clamp(<mu, U_i>, -1, 1));
    T = sum_{theta_i >= tol} alpha_i theta_i / sin(theta_i) (U_i - cos(theta_i) mu)
    (the mean of the log maps); stop if ||T|| < tol; mu <- cos(||T||) mu + sin(||T||) T/||T||,
    renormalised.  All zeros if no n_i > tol.  mu stays in the span of the U_i, so it is carried
    as coefficients over the exact K x K Gram matrix.  Source: Karcher (1977), the gradient
    iteration of Buss and Fillmore (2001); mergekit's karcher.  No weights, base ignored."""
    xs = inputs.tensors
    max_iter: int = params["max_iter"]
    tol: float = params["tol"]
    if max_iter < 0:
        raise ResolveError(f"strategy karcher: parameter max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ResolveError(f"strategy karcher: parameter tol must be >= 0, got {tol}")
    g_raw = gram(xs)
    norms = [math.sqrt(g_raw[i][i]) for i in range(len(xs))]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    k = len(valid)
    # unit-vector Gram matrix over the valid inputs
    g = [[g_raw[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
    alpha = 1.0 / k
    c = [alpha] * k
    norm = math.sqrt(max(0.0, _quadratic(g, c, c)))
    if norm < tol:
        c = [1.0] + [0.0] * (k - 1)
    else:
        c = [ci / norm for ci in c]
    for _ in range(max_iter):
        projections = [_clamp(_quadratic(g, c, _unit(k, j)), -1.0, 1.0) for j in range(k)]
        tangent = [0.0] * k  # T = sum_j alpha f_j (U_j - p_j mu), as coefficients
        terms: list[list[float]] = []
        for j, p in enumerate(projections):
            theta = numerics.acos(p)
            if theta < tol:
                continue
            f = alpha * theta / numerics.sin(theta)
            terms.append([f * ((1.0 if i == j else 0.0) - p * c[i]) for i in range(k)])
        if terms:
            tangent = [math.fsum(term[i] for term in terms) for i in range(k)]
        t_norm = math.sqrt(max(0.0, _quadratic(g, tangent, tangent)))
        if t_norm < tol:
            break
        cos_t, sin_t = numerics.cos(t_norm), numerics.sin(t_norm)
        c = [cos_t * ci + sin_t * ti / t_norm for ci, ti in zip(c, tangent, strict=True)]
        norm = math.sqrt(max(0.0, _quadratic(g, c, c)))
        c = [ci / norm for ci in c]
    mean_norm = math.fsum(norms) / len(norms)
    coefficients = [mean_norm * ci / norms[i] for ci, i in zip(c, valid, strict=True)]
    return numerics.weighted_sum_([xs[i] for i in valid], coefficients)


def _unit(k: int, j: int) -> list[float]:
    return [1.0 if i == j else 0.0 for i in range(k)]


register(
    Strategy(
        name="nuslerp",
        params=(
            Param("nuslerp_flatten", bool, True, help="one vector per tensor (else per row)"),
            Param("nuslerp_row_wise", bool, False, help="with flatten=false: vectors along dim 0"),
        ),
        base="optional",
        min_inputs=2,
        max_inputs=2,
        stochastic=False,
        merge=merge_nuslerp,
        summary="SLERP of two contributions (or their task vectors), t from their weights",
    )
)

register(
    Strategy(
        name="multislerp",
        params=(
            Param("normalize_weights", bool, True, help="divide the weights by their sum"),
            Param("eps", float, 1e-8, help="guard against division by zero"),
        ),
        base="optional",
        stochastic=False,
        merge=merge_multislerp,
        summary="weighted spherical mean direction of the (task) vectors, weighted mean norm",
    )
)

register(
    Strategy(
        name="karcher",
        params=(
            Param("max_iter", int, 10, help="most iterations of the Riemannian mean"),
            Param("tol", float, 1e-5, help="convergence and zero-norm tolerance"),
        ),
        base="ignored",
        stochastic=False,
        merge=merge_karcher,
        summary="Karcher mean on the sphere of the contributions, scaled by their mean norm",
        uses_weights=False,
    )
)
