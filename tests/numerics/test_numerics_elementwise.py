"""numerics.exp / numerics.log: libm-free elementwise float64 exp and log.

Checked against correctly rounded values (Python's decimal at 40 digits, then one rounding), so
the bound does not lean on this machine's libm; the cross-CPU byte identity is checked by the
determinism matrix (tests/resolution/_determinism_worker.py hashes both on fixed inputs)."""

from __future__ import annotations

import hashlib
import math
import random
from decimal import Decimal, localcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from git_crdt_merge import numerics


def _ulps(got: float, want: float) -> float:
    if got == want:
        return 0.0
    return abs(got - want) / math.ulp(want)


def _exact_exp(x: float) -> float:
    with localcontext() as ctx:
        ctx.prec = 40
        return float(Decimal(x).exp())


def _exact_log(x: float) -> float:
    with localcontext() as ctx:
        ctx.prec = 40
        return float(Decimal(x).ln())


def _sample(seed: int) -> tuple[list[float], list[float]]:
    rnd = random.Random(seed)
    exps = (
        [rnd.uniform(-745.0, 709.7) for _ in range(3000)]
        + [rnd.uniform(-2.0, 2.0) for _ in range(3000)]
        + [rnd.uniform(-1e-6, 1e-6) for _ in range(500)]
        + [k * math.log(2) / 2 for k in range(-40, 41)]  # reduction boundaries
    )
    logs = (
        [math.ldexp(rnd.uniform(0.5, 1.0), rnd.randint(-1074, 1024)) for _ in range(3000)]
        + [rnd.uniform(0.5, 2.0) for _ in range(3000)]
        + [1.0 + rnd.uniform(-1e-9, 1e-9) for _ in range(500)]
        + [math.sqrt(2) * (1 + d) for d in (-2e-16, 0.0, 2e-16)]
        + [5e-324, 1e-310, 2.0**-1022, 1.7e308]
    )
    return exps, logs


def test_exp_is_within_one_ulp_of_the_correctly_rounded_value() -> None:
    xs, _ = _sample(1)
    got = numerics.exp(torch.tensor(xs, dtype=torch.float64)).tolist()
    worst = max(_ulps(g, _exact_exp(x)) for g, x in zip(got, xs, strict=True))
    assert worst <= 1.0


def test_log_is_within_one_ulp_of_the_correctly_rounded_value() -> None:
    _, xs = _sample(2)
    got = numerics.log(torch.tensor(xs, dtype=torch.float64)).tolist()
    worst = max(_ulps(g, _exact_log(x)) for g, x in zip(got, xs, strict=True) if x != 1.0)
    assert worst <= 1.0


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-745.0, max_value=709.0))
def test_exp_agrees_with_libm_within_one_ulp(x: float) -> None:
    got = float(numerics.exp(torch.tensor([x], dtype=torch.float64))[0])
    assert _ulps(got, math.exp(x)) <= 1.0


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=5e-324, max_value=1e308))
def test_log_agrees_with_libm_within_one_ulp(x: float) -> None:
    got = float(numerics.log(torch.tensor([x], dtype=torch.float64))[0])
    assert _ulps(got, math.log(x)) <= 1.0


def test_exp_log_special_values() -> None:
    inf, nan = math.inf, math.nan
    e = numerics.exp(
        torch.tensor(
            [nan, inf, -inf, 0.0, -0.0, 710.0, -746.0, 709.78, -745.1], dtype=torch.float64
        )
    )
    assert math.isnan(e[0]) and e[1] == inf and e[2] == 0.0 and e[3] == 1.0 and e[4] == 1.0
    assert e[5] == inf and e[6] == 0.0
    assert float(e[7]) == math.exp(709.78) and float(e[8]) == math.exp(-745.1)  # edge, subnormal
    lg = numerics.log(
        torch.tensor([nan, inf, -inf, 0.0, -0.0, -1.0, 1.0, 5e-324], dtype=torch.float64)
    )
    assert math.isnan(lg[0]) and lg[1] == inf and math.isnan(lg[2])
    assert lg[3] == -inf and lg[4] == -inf and math.isnan(lg[5]) and lg[6] == 0.0
    assert float(lg[7]) == math.log(5e-324)


def test_results_do_not_depend_on_blocks_shape_or_input_dtype() -> None:
    x32 = (torch.arange(200_004, dtype=torch.float32) - 100_000.0) / 997.0
    for fn, arg in ((numerics.exp, x32), (numerics.log, x32.abs())):
        whole = fn(arg)
        assert whole.dtype == torch.float64 and whole.shape == arg.shape
        assert torch.equal(fn(arg.reshape(4, -1)).reshape(-1), whole)
        assert torch.equal(fn(arg.to(torch.float64)), whole)
        pieces = torch.cat([fn(arg[lo : lo + 12_345]) for lo in range(0, arg.numel(), 12_345)])
        assert torch.equal(pieces, whole)
    assert numerics.exp(torch.tensor(1.0)).shape == ()
    with pytest.raises(ValueError, match="exp expects a real"):
        numerics.exp(torch.arange(3))


def test_exp_and_log_bits_are_those_of_the_first_implementation() -> None:
    """The digests of exp and log over their whole range (subnormal, overflow, the special
    values, the reduction boundaries), computed with the first (torch) implementation: later
    rewrites of the kernels must give the same bits."""
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 2.0**-1022, -1.0, 709.8, -745.2]
    wide = torch.cat(
        [
            torch.arange(200_003, dtype=torch.float64) * 0.0074 - 760.0,
            torch.tensor([*special, 1e-310], dtype=torch.float64),
        ]
    )
    positive = torch.cat([wide.abs() * 1e300, wide.abs() * 1e-300, wide.abs(), -wide[:5]])
    digests = [
        hashlib.sha256(numerics.exp(wide).numpy().tobytes()).hexdigest(),
        hashlib.sha256(numerics.log(positive).numpy().tobytes()).hexdigest(),
    ]
    assert digests == [
        "da356eaa428b52d66a55bf0573183141554531dcfc2ffd348d02631bbba799d4",
        "560a87a6a8ec6c803840a38e28f138c04443dc1c5d335d59f91b606acb1734a7",
    ]
