"""Sparsifiers of the task-arithmetic family: which entries of a task vector survive.

Each sparsifier maps (delta, density, its extra parameter, stream key) to a bool keep-mask, or to
``None`` for "keep everything" (density >= 1), so that callers skip the work (and the rescale).
Masks are computed over the whole tensor (della: per row), with the exact tie rules and the
counter-based random stream of :mod:`git_crdt_merge.numerics`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import numerics

__all__ = [
    "SPARSIFIERS",
    "MaskKey",
    "Sparsifier",
    "della_magprune_mask",
    "l1_rescale_in_place",
    "magnitude_keep",
    "magnitude_mask",
    "magnitude_outliers_mask",
    "random_keep",
    "random_mask",
]


@dataclass(frozen=True)
class MaskKey:
    """Where a random mask's bits come from: the stream of (tensor name, contribution id)."""

    rng: numerics.RandomStream
    tensor_name: str
    contribution_id: str


MaskFn = Callable[[torch.Tensor, float, float, MaskKey], "torch.Tensor | None"]
KeepFn = Callable[[torch.Tensor, float, float, MaskKey], bool]


@dataclass(frozen=True)
class Sparsifier:
    """A sparsifier and the name of its extra per-contribution parameter (if any).

    ``keep``, where given, applies the mask in place without building it (same bits as
    ``keep_where_(delta, mask(...))``) and returns whether anything could have been dropped
    (False exactly where ``mask`` returns None)."""

    name: str
    extra_param: str | None
    mask: MaskFn
    stochastic: bool
    keep: KeepFn | None = None


def magnitude_mask(
    delta: torch.Tensor, density: float, _: float, __: MaskKey
) -> torch.Tensor | None:
    """TIES trim: keep the k = max(1, floor(density*n)) entries of largest |delta| (ties: lowest
    flat index).  density >= 1: everything; density <= 0: nothing."""
    n = delta.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    k = max(1, math.floor(density * n))
    return numerics.topk_magnitude_mask(delta, k)


def magnitude_keep(delta: torch.Tensor, density: float, _: float, __: MaskKey) -> bool:
    """:func:`magnitude_mask` applied in place (contiguous CPU ``delta``; elsewhere through the
    mask); False, with ``delta`` untouched, when density >= 1."""
    n = delta.numel()
    if density >= 1:
        return False
    k = 0 if density <= 0 or n == 0 else max(1, math.floor(density * n))
    if delta.device.type == "cpu" and delta.is_contiguous():
        numerics.keep_topk_magnitude_(delta, k)
    else:
        numerics.keep_where_(delta, numerics.topk_magnitude_mask(delta, k))
    return True


def random_mask(delta: torch.Tensor, density: float, _: float, key: MaskKey) -> torch.Tensor | None:
    """DARE drop: keep each entry independently with probability
    floor(density * 2**32) / 2**32, from the (tensor, contribution) stream.  density >= 1:
    everything."""
    if density >= 1:
        return None
    return key.rng.bernoulli_mask(key.tensor_name, key.contribution_id, delta.shape, density)


def random_keep(delta: torch.Tensor, density: float, _: float, key: MaskKey) -> bool:
    """:func:`random_mask` applied in place (contiguous CPU ``delta``; elsewhere through the
    mask); False, with ``delta`` untouched, when density >= 1."""
    if density >= 1:
        return False
    if delta.device.type == "cpu" and delta.is_contiguous():
        key.rng.keep_bernoulli_(delta, key.tensor_name, key.contribution_id, density)
    else:
        mask = key.rng.bernoulli_mask(key.tensor_name, key.contribution_id, delta.shape, density)
        numerics.keep_where_(delta, mask)
    return True


def magnitude_outliers_mask(
    delta: torch.Tensor, density: float, gamma: float, _: MaskKey
) -> torch.Tensor | None:
    """Model Breadcrumbs: with keep = floor(density*n), top = floor(gamma*n),
    bot = max(0, n - keep - top), keep positions [bot, bot + keep) of |delta| in stable ascending
    order: the bot smallest and the n - bot - keep largest entries are dropped.  density >= 1:
    everything (gamma is then ignored)."""
    n = delta.numel()
    if density >= 1:
        return None
    keep = max(0, math.floor(density * n))
    top = max(0, math.floor(gamma * n))
    bot = max(0, n - keep - top)
    return numerics.band_mask(torch.abs(delta), bot, keep)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of DELLA's MagPrune, float64, shaped like ``delta``:
    p = (density - epsilon) + 2*epsilon*(r - 1)/(m - 1) where r in 1..m is the rank of |delta|
    ascending along dim 1 (0-d and 1-D tensors are one row; ties by index); p = density when
    m = 1."""
    moved = _rows_last(delta)
    ranks = numerics.magnitude_row_ranks(moved)
    p = _rank_probabilities(moved.shape[-1], density, epsilon)[ranks - 1]
    return torch.movedim(p, -1, 1).reshape(delta.shape)


def _rows_last(delta: torch.Tensor) -> torch.Tensor:
    """``delta`` on the CPU (where the ranks and the draws are made) with its dim 1 last (0-d
    and 1-D tensors: one row)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    return torch.movedim(rows.cpu(), 1, -1)


def _rank_probabilities(m: int, density: float, epsilon: float) -> torch.Tensor:
    """p for the ranks 1..m (float64, index r - 1): the formula's operations on a tensor of
    ranks, element by element, so a table lookup gives every element the same value as
    computing it in place."""
    if m <= 1:
        return torch.full((m,), density, dtype=torch.float64, device="cpu")
    fraction = torch.arange(m, dtype=torch.int64, device="cpu").to(torch.float64) / float(m - 1)
    return fraction * (2.0 * epsilon) + (density - epsilon)


def della_magprune_mask(
    delta: torch.Tensor, density: float, epsilon: float, key: MaskKey
) -> torch.Tensor | None:
    """DELLA MagPrune: keep each entry with the probability of :func:`della_probabilities`
    (larger magnitudes are kept more often), drawn from the (tensor, contribution) stream:
    kept iff word i < floor(p_i * 2**32), the thresholds looked up by rank.
    density >= 1: everything; density <= 0: nothing.

    float32 (and 16-bit) deltas with thresholds below 2**32 that grow with the rank (epsilon
    >= 0) take :func:`numerics.keep_below_rank_table` (one 32-bit sort per row, no ranks);
    other inputs the ranks themselves.  Both give the same mask."""
    if density >= 1:
        return None
    if density <= 0 or delta.numel() == 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    moved = _rows_last(delta)
    table = numerics.thresholds_u32(_rank_probabilities(moved.shape[-1], density, epsilon))
    if moved.dtype in _FAST_DTYPES and _fits_u32_nondecreasing(table):
        m = moved.shape[-1]
        bits = moved.contiguous().reshape(-1, m).view(numerics.FLOAT_BITS[moved.dtype]).numpy()
        words: np.ndarray | Callable[[int, int], np.ndarray]
        if delta.dim() > 2:  # word i belongs to flat index i of delta: move them as moved
            drawn = key.rng.words(key.tensor_name, key.contribution_id, delta.numel())
            words = np.ascontiguousarray(np.moveaxis(drawn.reshape(delta.shape), 1, -1))
            words = words.reshape(-1, m)
        else:  # rows in delta's order: drawn a block of rows at a time
            words = functools.partial(_row_words, key, m)
        keep = numerics.keep_below_rank_table(bits, words, table.numpy().astype(np.uint32))
        mask = torch.from_numpy(keep).reshape(moved.shape)
        return torch.movedim(mask, -1, 1).reshape(delta.shape)
    limits = table[numerics.magnitude_row_ranks(moved) - 1]
    limits = torch.movedim(limits, -1, 1).reshape(delta.shape)
    return key.rng.bernoulli_mask_below(key.tensor_name, key.contribution_id, limits)


_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _row_words(key: MaskKey, m: int, lo: int, hi: int) -> np.ndarray:
    """The stream's words of rows ``lo:hi`` of a tensor with rows of ``m`` (row-major)."""
    words = key.rng.words(key.tensor_name, key.contribution_id, (hi - lo) * m, lo * m)
    return words.reshape(hi - lo, m)


def _fits_u32_nondecreasing(table: torch.Tensor) -> bool:
    """Whether the thresholds are all below 2**32 and never decrease with the rank."""
    return bool(table[-1] < 2**32) and bool(torch.all(table[1:] >= table[:-1]))


def l1_rescale_in_place(kept: torch.Tensor, full_l1: float) -> None:
    """``kept *= full_l1 / ||kept||_1`` where ``full_l1`` is the L1 norm of the task vector before
    sparsification; no change if either norm is below 1e-7."""
    part = numerics.l1_norm(kept)
    if full_l1 < 1e-7 or part < 1e-7:
        return
    kept.mul_(numerics.scalar(full_l1 / part, kept))


SPARSIFIERS: dict[str, Sparsifier] = {
    s.name: s
    for s in (
        Sparsifier("magnitude", None, magnitude_mask, stochastic=False, keep=magnitude_keep),
        Sparsifier("random", None, random_mask, stochastic=True, keep=random_keep),
        Sparsifier("magnitude_outliers", "gamma", magnitude_outliers_mask, stochastic=False),
        Sparsifier("della_magprune", "epsilon", della_magprune_mask, stochastic=True),
    )
}
