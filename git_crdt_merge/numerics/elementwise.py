"""Elementwise exp and log built from correctly rounded float64 operations (no libm).

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

#
# ``torch.exp`` and ``torch.log`` are vectorised approximations whose last bits differ between
# ``ATEN_CPU_CAPABILITY`` values (and libms).  These two are built only from operations that IEEE
# 754 specifies exactly (+ - * / on float64, round-half-even to an integer, integer bit
# manipulation), each a separate kernel (never fused), with fixed constants and a fixed
# evaluation order: every platform computes the same bits.  Accuracy (measured against
# math.exp / math.log in tests/numerics/test_numerics_elementwise.py): within 2 ulp.

# ln 2 split Cody-Waite style (the fdlibm constants): _LN2_HI has its low 32 bits zero, so
# k * _LN2_HI is exact for |k| < 2**20, and _LN2_HI + _LN2_LO is ln 2 to about 2**-86.
_LN2_HI = float.fromhex("0x1.62e42fee00000p-1")
_LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
_INV_LN2 = float.fromhex("0x1.71547652b82fep+0")
# exp(r) on |r| <= ln2/2 by its Taylor polynomial of degree 13 (truncation < 5e-18 relative):
# coefficients 1/j!, each rounded once to float64, highest first for Horner's rule.
_EXP_COEFFS = tuple(1.0 / math.factorial(j) for j in range(13, -1, -1))
# log(1+f) = 2 atanh(s) = 2s + s R, s = f/(2+f), |s| <= 0.1716 for 1+f in [sqrt(1/2), sqrt(2)],
# R = z (2/3 + z (2/5 + ... + z 2/25)), z = s*s (truncation < 1e-19 relative); coefficients
# 2/(2j+1), highest first.
_LOG_COEFFS = tuple(2.0 / (2 * j + 1) for j in range(12, 0, -1))
_SQRT2 = math.sqrt(2.0)
_ROUNDER = 1.5 * 2.0**52
_EXP_CLAMP = 800.0  # exp(+-800) is inf / 0 in float64; keeps 2**k in the exact range
_MANTISSA = (1 << 52) - 1


def _horner(coeffs: Sequence[float], z: torch.Tensor) -> torch.Tensor:
    """``((c0 z + c1) z + c2) ...`` with one rounded multiply and one rounded add per step."""
    acc = torch.full_like(z, coeffs[0])
    for c in coeffs[1:]:
        acc.mul_(z)
        acc.add_(c)
    return acc


def exp(x: torch.Tensor) -> torch.Tensor:
    """Elementwise e**x as float64 (any real float dtype in), the same bits on every platform.

    k = round_half_even(x / ln2); r = (x - k ln2_hi) - k ln2_lo (|r| <= ln2/2); exp(r) by a
    fixed Horner polynomial; the result is scaled by 2**k in two exact power-of-two steps (only
    the last can round, into the subnormal range or to inf).  exp(nan) = nan, exp(+inf) = inf,
    exp(-inf) = 0; overflow gives inf, underflow 0 or a subnormal, as IEEE would."""
    return _blockwise(_exp_block, x, "exp")


def _blockwise(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str
) -> torch.Tensor:
    """``fn`` applied to cache-sized blocks of the flattened float64 ``x`` (same bits as one
    whole-tensor call: every operation is elementwise)."""
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a real tensor")
    flat = x.reshape(-1).to(torch.float64)
    out = torch.empty(flat.shape, dtype=torch.float64)
    for lo in range(0, flat.numel(), _ELEMENTWISE_BLOCK):
        out[lo : lo + _ELEMENTWISE_BLOCK] = fn(flat[lo : lo + _ELEMENTWISE_BLOCK])
    return out.reshape(x.shape)


_ELEMENTWISE_BLOCK = 1 << 15


def _exp_block(v: torch.Tensor) -> torch.Tensor:
    # a block without nan skips the nan masks (the same bits: they change nothing there)
    nan = torch.isnan(v) if _has_nan(v) else None
    if nan is not None:
        v = torch.where(nan, torch.zeros_like(v), v)
    v = v.clamp(-_EXP_CLAMP, _EXP_CLAMP)
    # round half even to an integer: adding and removing 1.5 * 2**52 leaves no fraction bits
    # (exact for |x| < 2**51), the same IEEE rounding everywhere
    k = (v * _INV_LN2 + _ROUNDER) - _ROUNDER
    r = (v - k * _LN2_HI) - k * _LN2_LO
    p = _horner(_EXP_COEFFS, r)
    ki = k.to(torch.int64)
    k1 = ki >> 1  # floor(k / 2)
    p.mul_(((k1 + 1023) << 52).view(torch.float64))  # exact: |k1| <= 578, p * 2**k1 is normal
    # the one rounding (only when the result is subnormal or inf); |k - k1| <= 578 as well
    p.mul_(((ki - k1 + 1023) << 52).view(torch.float64))
    return p if nan is None else torch.where(nan, torch.full_like(p, math.nan), p)


def _has_nan(v: torch.Tensor) -> bool:
    lo, _ = torch.aminmax(v)  # nan if any element is nan
    return bool(torch.isnan(lo))


def _all_positive_normal(v: torch.Tensor) -> bool:
    """Whether every element is a positive normal finite float64 (no nan)."""
    lo, hi = torch.aminmax(v)
    return bool((lo >= _SMALLEST_NORMAL) & (hi < math.inf))


_SMALLEST_NORMAL = 2.0**-1022


def log(x: torch.Tensor) -> torch.Tensor:
    """Elementwise natural logarithm as float64 (any real float dtype in), the same bits on
    every platform.

    x = m 2**e with m in [sqrt(1/2), sqrt(2)) read from the float64 bits (subnormals first
    scaled by 2**54, exactly); f = m - 1 (exact), s = f / (2 + f), z = s*s,
    R = z (2/3 + z (2/5 + ...)); since 2s = f - f^2/2 + s f^2/2 (h = f^2/2):
    log m = f - (h - s (h + R)), the exact f plus a small correction (fdlibm's arrangement);
    log x = e ln2_hi + (e ln2_lo + log m).
    log(0) = -inf, log(x < 0) = nan, log(inf) = inf, log(nan) = nan."""
    return _blockwise(_log_block, x, "log")


def _log_block(v: torch.Tensor) -> torch.Tensor:
    if _all_positive_normal(v):  # the usual case: no special value, no subnormal to scale
        return _log_core(v.contiguous().view(torch.int64), 0)
    positive = v > 0
    finite = torch.isfinite(v)
    work = torch.where(positive & finite, v, torch.ones_like(v))
    tiny = work < 2.0**-1022
    work = torch.where(tiny, work * 2.0**54, work)  # exact: subnormal -> normal
    out = _log_core(work.view(torch.int64), torch.where(tiny, 54, 0))
    out = torch.where(v == 0, torch.full_like(out, -math.inf), out)
    out = torch.where(v == math.inf, v, out)
    return torch.where((v < 0) | torch.isnan(v), torch.full_like(out, math.nan), out)


def _log_core(bits: torch.Tensor, scaled: torch.Tensor | int) -> torch.Tensor:
    """log of the positive normal float64 values whose bits are ``bits``, minus ``scaled``
    ln 2 (the power of two a subnormal was scaled by); integer steps are exact, so a block
    without special values and subnormals gives the same bits with ``scaled`` = 0."""
    e = ((bits >> 52) & 0x7FF) - 1023 - scaled
    m = ((bits & _MANTISSA) | (1023 << 52)).view(torch.float64)  # in [1, 2)
    big = m > _SQRT2
    m = torch.where(big, m * 0.5, m)  # exact
    e = e + big.to(torch.int64)
    f = m - 1.0  # exact (Sterbenz)
    s = f / (f + 2.0)
    z = s * s
    r = _horner(_LOG_COEFFS, z) * z
    h = f * f * 0.5  # f*f rounded once; * 0.5 exact
    log_m = f - (h - s * (h + r))
    ef = e.to(torch.float64)  # |e| <= 1075: exact, and so is ef * _LN2_HI
    return ef * _LN2_HI + (ef * _LN2_LO + log_m)
