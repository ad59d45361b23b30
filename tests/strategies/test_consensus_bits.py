"""TIES sign election: the integer fast path gives the bits of the comparison definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from git_crdt_merge.numerics import FLOAT_BITS
from git_crdt_merge.strategies.task_arithmetic import _consensus, _consensus_by_comparison


def _both(
    deltas: list[torch.Tensor], weights: list[float], normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    fast = _consensus([d.clone() for d in deltas], weights, normalize)
    copies = [d.clone() for d in deltas]
    total = copies[0] + copies[1]
    for d in copies[2:]:
        total = total + d
    slow = _consensus_by_comparison(total, copies, weights, normalize)
    return fast, slow


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = FLOAT_BITS[a.dtype]
    return torch.equal(a.view(bits), b.view(bits))


# values that stress the sign rule: signed zeros, exact cancellations, repeated magnitudes
pieces = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0, 1e-30, -1e-30, 2.5, -7.0])


@settings(max_examples=300, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda k: st.tuples(
            st.lists(st.lists(pieces, min_size=8, max_size=8), min_size=k, max_size=k),
            st.lists(st.sampled_from([1.0, 0.5, 2.0, -1.0, 0.25]), min_size=k, max_size=k),
        )
    ),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_fast_consensus_equals_the_comparison_rule_bit_for_bit(
    case: tuple[list[list[float]], list[float]], normalize: bool, dtype: torch.dtype
) -> None:
    rows, weights = case
    deltas = [torch.tensor(r, dtype=dtype) for r in rows]
    fast, slow = _both(deltas, weights, normalize)
    assert _same_bits(fast, slow)


@pytest.mark.parametrize("normalize", [False, True])
def test_fast_consensus_on_large_sparse_blocks(normalize: bool) -> None:
    rng = np.random.default_rng(7)
    deltas = []
    for _ in range(4):
        v = rng.standard_normal(100_000).astype(np.float32)
        v[rng.random(100_000) < 0.5] = 0.0
        v[rng.random(100_000) < 0.05] = -0.0
        deltas.append(torch.from_numpy(v))
    fast, slow = _both(deltas, [1.0, 0.5, 1.0, 2.0], normalize)
    assert _same_bits(fast, slow)
    assert bool((fast.view(torch.int32) != torch.iinfo(torch.int32).min).all())  # no -0.0


def test_blocks_with_nan_or_inf_follow_the_comparison_rule() -> None:
    deltas = [
        torch.tensor([math.nan, 1.0, math.inf, -math.inf, 2.0]),
        torch.tensor([1.0, -2.0, 1.0, math.inf, -1.0]),
        torch.tensor([-1.0, -1.0, -math.inf, 1.0, 0.0]),
    ]
    for normalize in (False, True):
        fast, slow = _both(deltas, [1.0, 1.0, 1.0], normalize)
        assert _same_bits(fast, slow)
