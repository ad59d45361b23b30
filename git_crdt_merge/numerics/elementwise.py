"""Elementwise exp and log built from correctly rounded float64 operations (no libm).

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

#
# ``torch.exp`` and ``torch.log`` are vectorised approximations whose last bits differ between
# ``ATEN_CPU_CAPABILITY`` values (and libms).  These two are built only from operations that IEEE
# 754 specifies exactly (+ - * / on float64, round-half-even to an integer, integer bit
# manipulation), each a separate numpy ufunc call on a cache-sized block (never fused), with
# fixed constants and a fixed evaluation order: every platform computes the same bits.
# Accuracy (measured against math.exp / math.log in tests/numerics/test_numerics_elementwise.py):
# within 2 ulp.

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


def _horner(coeffs: Sequence[float], z: np.ndarray) -> np.ndarray:
    """``((c0 z + c1) z + c2) ...`` with one rounded multiply and one rounded add per step."""
    acc = np.multiply(z, coeffs[0])  # c0 * z: the first step of the chain from c0
    for c in coeffs[1:-1]:
        acc += c
        acc *= z
    acc += coeffs[-1]
    return acc


def exp(x: torch.Tensor) -> torch.Tensor:
    """Elementwise e**x as float64 (any real float dtype in), the same bits on every platform.

    k = round_half_even(x / ln2); r = (x - k ln2_hi) - k ln2_lo (|r| <= ln2/2); exp(r) by a
    fixed Horner polynomial; the result is scaled by 2**k in two exact power-of-two steps (only
    the last can round, into the subnormal range or to inf).  exp(nan) = nan, exp(+inf) = inf,
    exp(-inf) = 0; overflow gives inf, underflow 0 or a subnormal, as IEEE would."""
    return _blockwise(_exp_block, x, "exp")


def _blockwise(fn: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, name: str) -> torch.Tensor:
    """``fn`` applied to cache-sized blocks of the flattened float64 ``x`` (same bits as one
    whole-tensor call: every operation is elementwise).  The blocks are numpy arrays: the same
    IEEE operations as torch's, at a fraction of the per-call cost on blocks this size."""
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a real tensor")
    flat = x.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    out = np.empty(flat.shape, dtype=np.float64)
    with np.errstate(all="ignore"):  # overflow to inf, nan from nan: IEEE's results, wanted
        for lo in range(0, flat.size, _ELEMENTWISE_BLOCK):
            out[lo : lo + _ELEMENTWISE_BLOCK] = fn(flat[lo : lo + _ELEMENTWISE_BLOCK])
    return torch.from_numpy(out).reshape(x.shape)


_ELEMENTWISE_BLOCK = 1 << 15


def _exp_block(v: np.ndarray) -> np.ndarray:
    # a block without nan skips the nan masks (the same bits: they change nothing there)
    nan = np.isnan(v) if np.isnan(v.min()) else None
    if nan is not None:
        v = np.where(nan, 0.0, v)
    v = np.clip(v, -_EXP_CLAMP, _EXP_CLAMP)
    # round half even to an integer: adding and removing 1.5 * 2**52 leaves no fraction bits
    # (exact for |x| < 2**51), the same IEEE rounding everywhere
    k = v * _INV_LN2
    k += _ROUNDER
    k -= _ROUNDER
    r = k * _LN2_HI
    np.subtract(v, r, out=r)
    r -= k * _LN2_LO  # (x - k ln2_hi) - k ln2_lo
    p = _horner(_EXP_COEFFS, r)
    ki = k.astype(np.int64)
    k1 = ki >> 1  # floor(k / 2)
    ki -= k1
    k1 += 1023
    k1 <<= 52
    p *= k1.view(np.float64)  # exact: |k1| <= 578, p * 2**k1 is normal
    # the one rounding (only when the result is subnormal or inf); |k - k1| <= 578 as well
    ki += 1023
    ki <<= 52
    p *= ki.view(np.float64)
    if nan is not None:
        p[nan] = math.nan
    return p


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


def _log_block(v: np.ndarray) -> np.ndarray:
    lo, hi = v.min(), v.max()  # nan if any element is nan
    if lo >= _SMALLEST_NORMAL and hi < math.inf:  # no special value, no subnormal to scale
        return _log_core(v.view(np.int64), 0)
    work = np.where((v > 0) & np.isfinite(v), v, 1.0)
    tiny = work < _SMALLEST_NORMAL
    work = np.where(tiny, work * 2.0**54, work)  # exact: subnormal -> normal
    out = _log_core(work.view(np.int64), np.where(tiny, 54, 0))
    out[v == 0] = -math.inf
    out[v == math.inf] = math.inf
    out[(v < 0) | np.isnan(v)] = math.nan
    return out


_SMALLEST_NORMAL = 2.0**-1022


def _log_core(bits: np.ndarray, scaled: np.ndarray | int) -> np.ndarray:
    """log of the positive normal float64 values whose bits are ``bits``, minus ``scaled``
    ln 2 (the power of two a subnormal was scaled by); integer steps are exact, so a block
    without special values and subnormals gives the same bits with ``scaled`` = 0."""
    e = bits >> 52
    e &= 0x7FF
    e -= 1023
    e -= scaled
    m = bits & _MANTISSA
    m |= 1023 << 52
    m = m.view(np.float64)  # in [1, 2)
    big = m > _SQRT2
    np.multiply(m, 0.5, out=m, where=big)  # exact
    e += big
    f = m - 1.0  # exact (Sterbenz)
    s = f + 2.0
    np.divide(f, s, out=s)  # s = f / (2 + f)
    z = s * s
    r = _horner(_LOG_COEFFS, z)
    r *= z
    h = f * f
    h *= 0.5  # f*f rounded once; * 0.5 exact
    r += h
    r *= s
    np.subtract(h, r, out=r)
    np.subtract(f, r, out=r)  # log m = f - (h - s (h + R))
    ef = e.astype(np.float64)  # |e| <= 1075: exact, and so is ef * _LN2_HI
    lo_part = ef * _LN2_LO
    lo_part += r
    ef *= _LN2_HI
    ef += lo_part
    return ef
