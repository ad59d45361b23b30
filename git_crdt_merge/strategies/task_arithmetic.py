"""Generalized task arithmetic: one implementation, eight strategies.

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and
della_linear differ only in the sparsifier, the consensus rule and the parameter defaults; each is
a row of :data:`VARIANTS`.  Parameter semantics follow the standard toolkit (mergekit 0.1.5).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from ..numerics import FLOAT_BITS, keep_where_, l1_norm, ordered_sum, scalar
from .registry import Param, Strategy, TensorInputs, register
from .sparsify import SPARSIFIERS, MaskKey, l1_rescale_in_place

__all__ = ["VARIANTS", "Variant", "generalized_task_arithmetic"]


@dataclass(frozen=True)
class Variant:
    """One task-arithmetic strategy: sparsifier x consensus x defaults."""

    name: str
    _: KW_ONLY  # the rest by keyword, so that a row of VARIANTS reads as what it declares
    sparsifier: str | None  # key of SPARSIFIERS, None = no sparsification
    consensus: bool  # TIES sign election on the weighted sum
    normalize: bool
    rescale: bool
    summary: str
    closed_form: str  # the formula at the default parameters
    extra_default: float = 0.0
    aliases: tuple[str, ...] = ()  # other names of the same method (the paper's catalogue)


def _sparsify_in_place(
    variant: Variant,
    inputs: TensorInputs,
    params: Mapping[str, Any],
    index: int,
    delta: torch.Tensor,
) -> torch.Tensor | None:
    """Sparsify ``delta``.  With L1 rescaling the mask is applied here (the rescale needs the
    norm of what is kept) and None is returned; otherwise the keep-mask is returned (None: keep
    all) for the blocked pass to apply where the data is in cache."""
    if variant.sparsifier is None:
        return None
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
    rescale = params.get("rescale", False)
    if sparsifier.keep is not None:  # in place, no mask
        full = l1_norm(delta) if rescale and density < 1 else 0.0
        if sparsifier.keep(delta, density, extra, key) and rescale:
            l1_rescale_in_place(delta, full)
        return None
    mask = sparsifier.mask(delta, density, extra, key)
    if mask is None or not rescale:
        return mask
    full_l1 = l1_norm(delta)
    keep_where_(delta, mask)
    del mask
    l1_rescale_in_place(delta, full_l1)
    return None


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
    deltas = inputs.tensors

    def prepare(index: int) -> None:
        d = deltas[index]
        d.sub_(base)  # delta_i, in place
        mask = _sparsify_in_place(variant, inputs, params, index, d)
        w = inputs.weights[index]
        if mask is None and w == 1.0:
            return
        # d_i = sparsified delta_i, D_i = w_i * d_i (x * 1 is x exactly: skipped), applied in
        # cache-sized blocks right away, so no mask outlives its contribution.
        flat, flat_mask = d.view(-1), None if mask is None else mask.view(-1)
        for lo in range(0, flat.numel(), _BLOCK):
            part = flat[lo : lo + _BLOCK]
            if flat_mask is not None:
                keep_where_(part, flat_mask[lo : lo + _BLOCK])
            if w != 1.0:
                part.mul_(scalar(w, part))

    if variant.sparsifier is None or base.numel() < _PARALLEL_MIN:
        for index in range(len(deltas)):
            prepare(index)
    else:
        # Each contribution is sparsified on its own (its mask, its norms, its stream), so
        # contributions can run side by side; the results do not depend on the schedule.
        numerics.run_side_by_side(prepare, range(len(deltas)))
    # The combination is elementwise across contributions: block by block, so that the K + 3
    # operands of each step stay in the CPU cache (the same operations in the same order, so
    # the same bits, a few times faster than whole-tensor passes, no whole-tensor
    # temporaries).  The result goes over the first delta once that block of it is consumed.
    out = deltas[0]
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [d.view(-1) for d in deltas]

    def combine(lo: int) -> None:
        hi = lo + _BLOCK
        block = [f[lo:hi] for f in flats]
        _combine_block(variant, params, inputs.weights, block, flat_base[lo:hi], flat_out[lo:hi])

    starts = range(0, flat_out.numel(), _BLOCK)
    if len(starts) > 1:
        numerics.run_side_by_side(combine, starts)  # blocks are disjoint: any schedule
    else:
        for lo in starts:
            combine(lo)
    return out


_BLOCK = 1 << 18
_PARALLEL_MIN = 1 << 16  # elements; below this, threads cost more than they save


def _combine_block(
    variant: Variant,
    params: Mapping[str, Any],
    weights: list[float],
    deltas: list[torch.Tensor],
    base: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out = base + lambda * (consensus) sum of the weighted deltas, on one block (in place;
    the deltas are consumed)."""
    if variant.consensus:
        num = _consensus(deltas, weights, params["normalize"])
    else:
        num = ordered_sum(deltas)
        if params["normalize"]:
            total = math.fsum(weights)
            num.div_(scalar(1.0 if abs(total) < 1e-8 else total, num))
    lam: float = params["lambda"]
    if lam != 1.0:
        num.mul_(scalar(lam, num))
    torch.add(num, base, out=out)


def _consensus(deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES sign election and disjoint sum of the weighted deltas ``D_i`` (overwritten).

    The elected sign is + where S = sum_i D_i >= 0 (an exact 0 counts as +), - elsewhere (nan
    too); m_i = [D_i * s > 0] (pruned zeros and nan never agree); returns num = sum_i m_i D_i,
    divided by den = sum_i m_i w_i (1 where 0) if ``normalize``.  Blocks whose S is all finite
    (every D_i finite) take integer operations on the float bits, which give the same bits as
    the comparisons of :func:`_consensus_by_comparison` at a third of the cost."""
    total = ordered_sum(deltas)
    if not math.isfinite(float(total.sum())):  # a nan or inf somewhere (or a huge block)
        return _consensus_by_comparison(total, deltas, weights, normalize)
    int_type = FLOAT_BITS[total.dtype]
    shift = 8 * total.element_size() - 1
    elected_negative = total.view(int_type) >> shift  # all ones where S < 0 (or S is -0.0)
    den = torch.zeros_like(total) if normalize else None
    agree = torch.empty_like(elected_negative)  # one scratch buffer for every contribution
    for d, w in zip(deltas, weights, strict=True):
        bits = d.view(int_type)
        torch.bitwise_right_shift(bits, shift, out=agree)
        agree ^= elected_negative  # zero where D_i's sign bit is the elected one
        agree.bitwise_not_()
        bits &= agree  # D_i where the signs match (zeros keep their sign), else +0.0
        if den is not None:  # den += w_i where the kept value is non-zero, else += +0.0
            torch.bitwise_and(bits, torch.iinfo(int_type).max, out=agree)
            agree.sub_(1)
            agree >>= shift  # all ones where D_i is (now) zero
            agree.bitwise_not_()
            agree &= int(scalar(w, total).view(int_type))
            den.add_(agree.view(total.dtype))
    num = deltas[0]
    for d in deltas[1:]:
        num.add_(d)
    # The nonzero kept values all have the elected sign, so num is zero only if every kept
    # value is: -0.0 when all of them are -0.0, where the comparisons' rule gives +0.0.
    num.add_(scalar(0.0, num))  # -0.0 -> +0.0, every other value unchanged
    if den is not None:
        den.add_((den == 0).to(den.dtype))  # 1 where no weight agreed (0 + 1 is exact)
        num.div_(den)
    return num


def _consensus_by_comparison(
    total: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], normalize: bool
) -> torch.Tensor:
    """:func:`_consensus` written with float comparisons: the definition, for any values."""
    negative = ~(total >= 0)
    sign = torch.ones_like(total).view(FLOAT_BITS[total.dtype])
    sign.bitwise_or_(negative.to(sign.dtype) << (8 * total.element_size() - 1))
    elected = sign.view(total.dtype)
    den = torch.zeros_like(total) if normalize else None
    for d, w in zip(deltas, weights, strict=True):
        agree = (d * elected) > 0
        keep_where_(d, agree)
        if den is not None:  # den += w_i * m_i (a bool adds as 0 or 1: exact)
            den.add_(agree if w == 1.0 else agree.to(den.dtype).mul_(scalar(w, den)))
    num = ordered_sum(deltas)
    if den is not None:
        den.add_((den == 0).to(den.dtype))  # 1 where no weight agreed (0 + 1 is exact)
        num.div_(den)
    return num


def _params(variant: Variant) -> tuple[Param, ...]:
    params: list[Param] = []
    if variant.sparsifier is not None:
        params.append(
            Param(
                "density",
                float,
                1.0,
                per_contribution=True,
                help="fraction of each task vector kept (>= 1: all)",
            )
        )
        extra = SPARSIFIERS[variant.sparsifier].extra_param
        if extra == "gamma":
            params.append(
                Param(
                    "gamma",
                    float,
                    variant.extra_default,
                    per_contribution=True,
                    help="fraction of largest |delta| dropped",
                )
            )
        elif extra == "epsilon":
            params.append(
                Param(
                    "epsilon",
                    float,
                    variant.extra_default,
                    per_contribution=True,
                    help="half-width of the keep-probability range around density",
                )
            )
    params.append(Param("lambda", float, 1.0, help="scale of the merged task vector"))
    params.append(
        Param("normalize", bool, variant.normalize, help="divide by the sum of the weights")
    )
    if variant.sparsifier is not None:
        params.append(
            Param(
                "rescale",
                bool,
                variant.rescale,
                help="L1-norm rescale of each sparsified task vector",
            )
        )
    else:  # mergekit's task_arithmetic takes them too, and its output does not depend on them
        params.append(
            Param(
                "density",
                float,
                1.0,
                per_contribution=True,
                help=f"{IGNORED} (mergekit compatibility: {variant.name} does not sparsify)",
            )
        )
        params.append(Param("rescale", bool, False, help=f"{IGNORED} (mergekit compatibility)"))
    return tuple(params)


IGNORED = "accepted and ignored"
"""How a parameter's help marks one that a mergekit recipe may give and the formula ignores."""


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "task_arithmetic",
        sparsifier=None,
        consensus=False,
        normalize=False,
        rescale=False,
        summary="base plus the weighted task vectors",
        closed_form="out = B + lambda * sum_i w_i (X_i - B)",
    ),
    Variant(
        "ties",
        sparsifier="magnitude",
        consensus=True,
        normalize=True,
        rescale=False,
        summary="TIES: magnitude trim, sign election, disjoint mean",
        closed_form=(
            "out = B + lambda * sum_i w_i m_i T_k(delta_i) / sum_i w_i m_i   (T_k: top-k |delta|)"
        ),
    ),
    Variant(
        "dare_linear",
        sparsifier="random",
        consensus=False,
        normalize=False,
        rescale=True,
        summary="DARE: random drop, L1 rescale, weighted sum",
        closed_form=(
            "out = B + lambda * sum_i w_i R(M_density . delta_i)"
            "   (M: Bernoulli mask, R: L1 rescale)"
        ),
        aliases=("dare",),
    ),
    Variant(
        "dare_ties",
        sparsifier="random",
        consensus=True,
        normalize=False,
        rescale=True,
        summary="DARE with TIES sign election (no division by default)",
        closed_form="out = B + lambda * sum_i w_i m_i R(M_density . delta_i)",
    ),
    Variant(
        "breadcrumbs",
        sparsifier="magnitude_outliers",
        consensus=False,
        normalize=False,
        rescale=False,
        summary="Model Breadcrumbs: drop the smallest and the largest |delta|",
        closed_form="out = B + lambda * sum_i w_i O(delta_i)   (O: keep a middle band of |delta|)",
        extra_default=0.01,
        aliases=("model_breadcrumbs",),
    ),
    Variant(
        "breadcrumbs_ties",
        sparsifier="magnitude_outliers",
        consensus=True,
        normalize=False,
        rescale=False,
        summary="Model Breadcrumbs with TIES sign election",
        closed_form="out = B + lambda * sum_i w_i m_i O(delta_i)",
        extra_default=0.01,
    ),
    Variant(
        "della",
        sparsifier="della_magprune",
        consensus=True,
        normalize=True,
        rescale=True,
        summary="DELLA: rank-based random drop, sign election, disjoint mean",
        closed_form=(
            "out = B + lambda * sum_i w_i m_i R(M_p . delta_i) / sum_i w_i m_i   (p from row ranks)"
        ),
        extra_default=0.15,
    ),
    Variant(
        "della_linear",
        sparsifier="della_magprune",
        consensus=False,
        normalize=False,
        rescale=True,
        summary="DELLA: rank-based random drop, weighted sum",
        closed_form="out = B + lambda * sum_i w_i R(M_p . delta_i)",
        extra_default=0.15,
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
            aliases=_variant.aliases,
            params=_params(_variant),
            base="required",
            stochastic=_variant.sparsifier is not None
            and SPARSIFIERS[_variant.sparsifier].stochastic,
            merge=_make_merge(_variant),
            summary=_variant.summary,
            # DELLA's keep test (a sort of every row per contribution) makes it about 6x the
            # IO floor (measured), twice the other variants
            compute_bound=_variant.sparsifier == "della_magprune",
        )
    )
