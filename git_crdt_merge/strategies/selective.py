"""The standard toolkit's selective merges: sce, ram, ramplus_tl, nearswap, arcee_fusion.

Each decides, element by element, which task-vector entries reach the base (selection by
variance, sign, overlap, distance or importance) and how they are scaled.  Selections use the
exact rules of :mod:`git_crdt_merge.numerics` (top-k with a lowest-index tie rule, exact order
statistics instead of sampled quantiles), reductions are reproducible float64 sums, and the
softmax/KL of arcee_fusion uses ``numerics.exp``/``numerics.log`` (no platform libm).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from ..numerics import keep_where_, ordered_sum, scalar
from .registry import REQUIRED, Param, Strategy, TensorInputs, register

__all__ = [
    "merge_arcee_fusion",
    "merge_nearswap",
    "merge_ram",
    "merge_ramplus_tl",
    "merge_sce",
]


def _require_base(inputs: TensorInputs, name: str) -> torch.Tensor:
    if inputs.base is None:  # pragma: no cover - the contract requires a base
        raise ResolveError(f"strategy {name} requires a base model")
    return inputs.base


def _task_vectors(inputs: TensorInputs, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and tau_i = X_i - B, computed in place over the contributions."""
    base = _require_base(inputs, name)
    for x in inputs.tensors:
        x.sub_(base)
    return base, inputs.tensors


# ---------------------------------------------------------------------------------------------
# sce
# ---------------------------------------------------------------------------------------------


def _variance_mask(taus: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Top floor(nnz(v) * select_topk) entries of the population variance v over the
    contributions (float64, canonical-order sums), lowest flat index first on ties.  Computed
    a block of elements at a time: one float64 tensor (v) beside the inputs, not K."""
    k = len(taus)
    flats = [t.reshape(-1) for t in taus]
    var = torch.empty(flats[0].numel(), dtype=torch.float64)
    for lo in range(0, var.numel(), _VAR_BLOCK):
        block = [f[lo : lo + _VAR_BLOCK].to(torch.float64) for f in flats]
        mean = ordered_sum(block) / float(k)
        acc = torch.zeros_like(mean)
        for b in block:
            dev = b - mean
            acc.add_(dev * dev)
        var[lo : lo + _VAR_BLOCK] = acc.div_(float(k))
    count = math.floor(int(torch.count_nonzero(var)) * select_topk)
    return numerics.topk_mask(var, count).reshape(taus[0].shape)


_VAR_BLOCK = 1 << 16


def merge_sce(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + sum_i omega_i m_i tau_i / max(sum_i omega_i m_i, 1e-6)

    tau_i = X_i - B.  Select (select_topk < 1): v = per-element population variance of the
    tau_i over the contributions; keep the floor(nnz(v) * select_topk) entries of largest v
    (one mask for all contributions, ties: lowest index) and zero the rest of every tau_i.
    Calculate: omega_i = mean(tau_i^2) / sum_j mean(tau_j^2) on the selected tau (1/N each if
    that sum is < 1e-6).  Erase: s = +1 where sum_i tau_i >= 0 else -1, m_i = [sign(tau_i) = s]
    (zeros never agree).  Source: SCE of FuseChat 2.0 (Wan et al. 2024), as the toolkit
    (mergekit) implements it.  No per-contribution weights."""
    select_topk: float = params["select_topk"]
    if not 0.0 <= select_topk <= 1.0:
        raise ResolveError(
            f"strategy sce: parameter select_topk must be in [0, 1], got {select_topk}"
        )
    base, taus = _task_vectors(inputs, "sce")
    if select_topk < 1.0:
        mask = _variance_mask(taus, select_topk)
        for t in taus:
            keep_where_(t, mask)
        del mask
    n = base.numel()
    energies = [numerics.dot(t, t) / n for t in taus]
    total = math.fsum(energies)
    k = len(taus)
    omegas = [1.0 / k] * k if total < 1e-6 else [e / total for e in energies]
    negative = ~(ordered_sum(taus) >= 0)  # s = -1 here (nan too), +1 elsewhere
    elected = torch.where(negative, -1.0, 1.0).to(base.dtype)
    den = torch.zeros_like(base)
    for t, omega in zip(taus, omegas, strict=True):
        agree = (t * elected) > 0
        t.mul_(scalar(omega, t))
        keep_where_(t, agree)
        den.add_(agree.to(den.dtype).mul_(scalar(omega, den)))
    num = ordered_sum(taus)
    num.div_(torch.clamp(den, min=scalar(1e-6, den)))
    return num.add_(base)


# ---------------------------------------------------------------------------------------------
# ram, ramplus_tl
# ---------------------------------------------------------------------------------------------


def _check_epsilon(name: str, epsilon: float) -> None:
    if epsilon < 0:
        raise ResolveError(f"strategy {name}: parameter epsilon must be >= 0, got {epsilon}")


def _changed(taus: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """nz_i = |tau_i| > epsilon, and c = sum_i nz_i (int32) per element."""
    changed = [t.abs() > epsilon for t in taus]
    count = torch.zeros(taus[0].shape, dtype=torch.int32)  # contributions: far below 2**31
    for nz in changed:
        count.add_(nz)
    return changed, count


def merge_ram(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + sum_i nz_i tau_i / max(c, 1)

    tau_i = X_i - B, nz_i = [|tau_i| > epsilon], c = sum_i nz_i: where one contribution changed
    an element its change is kept whole, where several did their mean, entries with
    |tau_i| <= epsilon count for nothing.  Source: Reinforced Agent Merging (RAM, Yuan et al.
    2026), as the toolkit implements it.  No per-contribution weights."""
    epsilon: float = params["epsilon"]
    _check_epsilon("ram", epsilon)
    base, taus = _task_vectors(inputs, "ram")
    changed, count = _changed(taus, epsilon)
    for t, nz in zip(taus, changed, strict=True):
        keep_where_(t, nz)
    num = ordered_sum(taus)
    num.div_(count.clamp(min=1).to(num.dtype))  # small integers: exact in any float dtype
    return num.add_(base)


def merge_ramplus_tl(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + sum_i nz_i tau_i * (lambda_i where c = 1, 1/c where c > 1)

    As ram (nz_i = [|tau_i| > epsilon], c = sum_i nz_i), with the unique entries of
    contribution i (nz_i and c = 1) scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha),
    rho_i = #(nz_i and c > 1) / max(#(nz_i and c = 1), epsilon) counted over this tensor
    ("tl": tensor level).  r = 0 gives ram.  Source: RAM+ of Reinforced Agent Merging
    (Yuan et al. 2026), as the toolkit implements it.  No per-contribution weights."""
    epsilon: float = params["epsilon"]
    r: float = params["r"]
    alpha: float = params["alpha"]
    _check_epsilon("ramplus_tl", epsilon)
    if alpha < 0:
        raise ResolveError(f"strategy ramplus_tl: parameter alpha must be >= 0, got {alpha}")
    base, taus = _task_vectors(inputs, "ramplus_tl")
    changed, count = _changed(taus, epsilon)
    unique_anywhere = count == 1
    shared_anywhere = count > 1
    lam = torch.zeros(base.shape, dtype=base.dtype)  # lambda of the one contribution that
    for t, nz in zip(taus, changed, strict=True):  # changed each unique entry
        unique = nz & unique_anywhere
        n_unique = int(torch.count_nonzero(unique))
        n_shared = int(torch.count_nonzero(nz & shared_anywhere))
        rho = n_shared / max(float(n_unique), epsilon)
        lam_i = 1.0 + r * min(max(rho, 0.0), alpha)
        lam.add_(unique.to(lam.dtype).mul_(scalar(lam_i, lam)))  # one non-zero term per entry
        keep_where_(t, nz)
    num = ordered_sum(taus)  # per entry: the unique change, or the sum of the shared ones
    shared = num / count.clamp(min=1).to(num.dtype)
    num.mul_(lam)
    out = torch.where(shared_anywhere, shared, num)
    return out.add_(base)


# ---------------------------------------------------------------------------------------------
# nearswap
# ---------------------------------------------------------------------------------------------


def merge_nearswap(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = w X + (1 - w) B,   w = clamp(t / max(|B - X|, 1e-6), 0, 1)   (elementwise)

    An element of the contribution within distance t of the base is taken outright; farther
    ones move the base toward it by t.  t = 0 gives the base.  Source: "nearswap" (alchemonaut,
    2024), as the toolkit (mergekit) implements it.  No per-contribution weights."""
    t: float = params["t"]
    if t < 0:
        raise ResolveError(f"strategy nearswap: parameter t must be >= 0, got {t}")
    base = _require_base(inputs, "nearswap")
    x = inputs.tensors[0]
    distance = (base - x).abs_()
    w = scalar(t, x) / torch.clamp(distance, min=scalar(1e-6, x))
    w.clamp_(0.0, 1.0)
    one = torch.ones((), dtype=x.dtype)
    out = x * w
    return out.add_(base * (one - w))


# ---------------------------------------------------------------------------------------------
# arcee_fusion
# ---------------------------------------------------------------------------------------------

_SOFTMAX_FLOOR = 1e-8
_ROW_BLOCK_ELEMENTS = 1 << 18  # rows of float64 temporaries that stay near the cache


def _softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """softmax along each row of a 2-D float64 tensor, + 1e-8: exp(x - max) / exact row sum."""
    shifted = x - x.amax(dim=1, keepdim=True)  # max is exact, the subtraction rounds once
    e = numerics.exp(shifted)
    total = numerics.exact_sum_rows(e)
    p = e / total.unsqueeze(1)
    return p.add_(_SOFTMAX_FLOOR)


def _row_kl(x_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, P = softmax(x) + 1e-8, Q = softmax(b) + 1e-8, in float64, a block of
    rows at a time (bounded temporaries)."""
    rows, width = x_rows.shape
    step = max(1, _ROW_BLOCK_ELEMENTS // max(width, 1))
    out = torch.empty(rows, dtype=torch.float64)
    for lo in range(0, rows, step):
        p = _softmax_rows(x_rows[lo : lo + step].to(torch.float64))
        q = _softmax_rows(b_rows[lo : lo + step].to(torch.float64))
        terms = numerics.log(torch.div(p, q, out=q)).mul_(p)  # q is not needed after p / q
        out[lo : lo + step] = numerics.exact_sum_rows(terms, overwrite=True)
    return out


def merge_arcee_fusion(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + (X - B) [I >= median(I) + 1.5 (q3(I) - q1(I))]

    P = softmax(X) + 1e-8, Q = softmax(B) + 1e-8 along the last dim; KL = sum_last P log(P/Q),
    one value per row (a 0-d tensor is one row of one); I = |X - B| KL (float64).  The
    quantiles are exact order statistics of all of I: q_p = the value at ascending position
    floor(p (n - 1)).  Softmax, KL and I are float64 whatever the compute dtype (exp/log from
    numerics, row sums exact), so the mask does not depend on it.  Source: Arcee Fusion (Arcee
    AI, 2025), as the toolkit implements it, minus its random sampling (see docs).  No
    per-contribution weights."""
    base = _require_base(inputs, "arcee_fusion")
    x = inputs.tensors[0]
    width = base.shape[-1] if base.dim() >= 1 else 1
    kl = _row_kl(x.reshape(-1, width), base.reshape(-1, width))
    # I from the float64 values of X and B, so that it (and the mask) depends only on the
    # stored values, not on the compute dtype
    importance = x.reshape(-1, width).to(torch.float64, copy=True)
    importance = importance.sub_(base.reshape(-1, width)).abs_().mul_(kl.unsqueeze(1))
    diff = x.sub_(base)  # X - B in the compute dtype, in place
    flat = importance.reshape(-1)
    n = flat.numel()
    # the values at 0-based positions floor(p (n - 1)) of the ascending order (exact; the sign
    # of a zero quartile cannot change the mask)
    q1, median, q3 = numerics.order_statistics(
        flat, [(n - 1) // 4 + 1, (n - 1) // 2 + 1, (3 * (n - 1)) // 4 + 1]
    )
    threshold = median + 1.5 * (q3 - q1)
    keep = (importance >= threshold).reshape(diff.shape)
    del importance, flat
    keep_where_(diff, keep)
    return diff.add_(base)


register(
    Strategy(
        name="sce",
        params=(
            Param("select_topk", float, 1.0, help="fraction of highest-variance entries kept"),
        ),
        base="required",
        stochastic=False,
        merge=merge_sce,
        summary="SCE: select by variance, energy coefficients, erase minority signs",
        compute_bound=True,
        uses_weights=False,
    )
)

register(
    Strategy(
        name="ram",
        params=(Param("epsilon", float, 1e-5, help="|delta| at or below this is unchanged"),),
        base="required",
        stochastic=False,
        merge=merge_ram,
        summary="RAM: unique changes kept whole, shared changes averaged",
        uses_weights=False,
    )
)

register(
    Strategy(
        name="ramplus_tl",
        params=(
            Param("r", float, 0.1, help="strength of the unique-change rescale"),
            Param("alpha", float, 0.2, help="cap on the overlap ratio rho"),
            Param("epsilon", float, 1e-5, help="|delta| at or below this is unchanged"),
        ),
        base="required",
        stochastic=False,
        merge=merge_ramplus_tl,
        summary="RAM+: as ram, unique changes rescaled by the tensor's overlap ratio",
        uses_weights=False,
    )
)

register(
    Strategy(
        name="nearswap",
        params=(Param("t", float, REQUIRED, help="distance within which X replaces B"),),
        base="required",
        max_inputs=1,
        stochastic=False,
        merge=merge_nearswap,
        summary="take the contribution where it is near the base, step toward it elsewhere",
        uses_weights=False,
    )
)

register(
    Strategy(
        name="arcee_fusion",
        params=(),
        base="required",
        max_inputs=1,
        stochastic=False,
        merge=merge_arcee_fusion,
        summary="Arcee Fusion: keep the changes whose KL-weighted size is an outlier",
        compute_bound=True,
        uses_weights=False,
    )
)
