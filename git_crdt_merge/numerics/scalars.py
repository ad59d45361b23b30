"""Scalar sqrt, sin, cos and acos without libm (Decimal arithmetic): the same on every machine.

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from functools import lru_cache

_DIGITS = 60


def sqrt(x: float) -> float:
    """IEEE 754 square root: correctly rounded on every platform, so ``math.sqrt`` is safe."""
    return math.sqrt(x)


def _atan_series(z: Decimal) -> Decimal:
    """atan(z) for small |z| by its Taylor series (current decimal context)."""
    z2 = z * z
    term = z
    total = z
    k = 1
    while True:
        term = -term * z2
        k += 2
        updated = total + term / k
        if updated == total:  # converged at the context precision
            break
        total = updated
    return total


@lru_cache(maxsize=8)
def _pi(digits: int) -> Decimal:
    """pi to ``digits`` significant digits (Machin's formula)."""
    with localcontext() as ctx:
        ctx.prec = digits + 10
        value = 16 * _atan_series(Decimal(1) / 5) - 4 * _atan_series(Decimal(1) / 239)
    with localcontext() as ctx:
        ctx.prec = digits
        return +value


def _atan(z: Decimal) -> Decimal:
    if z < 0:
        return -_atan(-z)
    pi = _pi(_DIGITS + 10)
    if z > 1:
        return pi / 2 - _atan(1 / z)
    doublings = 0
    while z > Decimal("0.05"):
        z = z / (1 + (1 + z * z).sqrt())  # atan z = 2 atan(z / (1 + sqrt(1 + z^2)))
        doublings += 1
    return _atan_series(z) * (2**doublings)


def _sin_cos(x: Decimal, extra: int) -> tuple[Decimal, Decimal]:
    """(sin x, cos x) by Taylor series after reduction modulo 2*pi."""
    two_pi = 2 * _pi(_DIGITS + extra + 10)
    k = (x / two_pi).to_integral_value(rounding=ROUND_HALF_EVEN)
    y = x - k * two_pi
    y2 = y * y
    s_term, c_term = y, Decimal(1)
    s_sum, c_sum = y, Decimal(1)
    i = 1
    while True:
        s_term = -s_term * y2 / ((2 * i) * (2 * i + 1))
        c_term = -c_term * y2 / ((2 * i - 1) * (2 * i))
        s_next, c_next = s_sum + s_term, c_sum + c_term
        if s_next == s_sum and c_next == c_sum:  # converged at the context precision
            break
        s_sum, c_sum = s_next, c_next
        i += 1
    return s_sum, c_sum


def _check_finite(name: str, x: float) -> None:
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"{name}({x!r}): argument must be finite")


def _sin_cos_float(name: str, x: float) -> tuple[Decimal, Decimal]:
    """(sin x, cos x) of a finite float, at a precision that grows with its magnitude."""
    _check_finite(name, x)
    dx = Decimal(x)
    extra = max(0, dx.adjusted())
    with localcontext() as ctx:
        ctx.prec = _DIGITS + extra + 20
        return _sin_cos(dx, extra)


def sin(x: float) -> float:
    """sin(x), correctly rounded except in astronomically rare near-ties; no libm."""
    if x == 0.0:
        return x
    return float(_sin_cos_float("sin", x)[0])


def cos(x: float) -> float:
    """cos(x), correctly rounded except in astronomically rare near-ties; no libm."""
    return float(_sin_cos_float("cos", x)[1])


def acos(x: float) -> float:
    """acos(x) in [0, pi] for x in [-1, 1] as ``2*atan(sqrt((1-x)/(1+x)))`` in decimal (no
    cancellation near 1); ValueError outside the domain, like :func:`math.acos`."""
    if math.isnan(x) or not -1.0 <= x <= 1.0:
        raise ValueError(f"acos({x!r}): argument outside [-1, 1]")
    with localcontext() as ctx:
        ctx.prec = _DIGITS + 20
        if x == -1.0:
            return float(+_pi(_DIGITS + 10))
        dx = Decimal(x)
        value = 2 * _atan(((1 - dx) / (1 + dx)).sqrt())
    return float(value)
