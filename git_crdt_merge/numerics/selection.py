"""Exact selection: top-k, bottom-k, bands and ranks with a fixed tie rule.

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from .dtypes import FLOAT_BITS

_SAMPLE = 1 << 16


def kth_smallest(flat: torch.Tensor, rank: int) -> torch.Tensor:
    """The value of rank ``rank`` (1-based, ascending) of a 1-D tensor without nan: exact.

    Large tensors first bracket the answer between two order statistics of a fixed strided
    sample, then run ``kthvalue`` only on the entries inside the bracket (usually a few
    thousand).  If the bracket misses (adversarial data), the whole tensor is used.  Either way
    the result is the unique k-th value, so it does not depend on the path taken."""
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(flat, rank).values
    sample = flat[:: n // _SAMPLE][:_SAMPLE].clone()
    m = sample.numel()
    q = rank / n
    margin = 5.0 * math.sqrt(m * q * (1.0 - q)) + 16.0  # 5 sigma of the sample's rank
    lo_rank = max(1, math.floor(q * m - margin))
    hi_rank = min(m, math.ceil(q * m + margin))
    lo = torch.kthvalue(sample, lo_rank).values
    hi = torch.kthvalue(sample, hi_rank).values
    in_bracket = flat >= lo
    below = n - int(torch.count_nonzero(in_bracket))
    in_bracket &= flat <= hi
    inside = flat[in_bracket]
    r = rank - below
    if 1 <= r <= inside.numel():
        return torch.kthvalue(inside, r).values
    return torch.kthvalue(flat, rank).values


def order_statistics(flat: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """The values of ranks ``ranks`` (1-based, ascending) of a 1-D tensor without nan, as
    :func:`kth_smallest` gives them (a zero may come back as +0.0 where it gave -0.0).

    Large CPU float tensors without negative values take integer keys (the float bits, which
    order as the values do) on numpy's kernels: about 2.5x faster for a quartile of 4M
    float64 values."""
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in _KEY_ORDERED and n > 4 * _SAMPLE:
        if bool(torch.amin(flat) >= 0):  # no negative value, no nan (-0.0 keys as +0.0)
            bits = flat.contiguous().view(FLOAT_BITS[flat.dtype]).numpy()
            top = np.iinfo(bits.dtype).max
            values = np.array([_kth_smallest_key(bits, top, r)[0] for r in ranks], bits.dtype)
            return [float(v) for v in values.view(_KEY_ORDERED[flat.dtype])]
    return [float(kth_smallest(flat, r)) for r in ranks]


_KEY_ORDERED = {torch.float64: np.float64, torch.float32: np.float32}


def _drop_last_ties(
    flat: torch.Tensor,
    threshold: torch.Tensor,
    mask: torch.Tensor,
    excess: int,
) -> None:
    """Clear ``mask`` at the ``excess`` highest flat indices where ``flat == threshold``.

    Scans from the end in growing windows: usually a handful of entries tie, all near wherever
    the scan starts, so this reads a small tail instead of the whole tensor."""
    end = flat.numel()
    window = _TIE_WINDOW
    while excess > 0 and end > 0:
        start = max(0, end - window)
        tied = torch.nonzero(flat[start:end] == threshold).reshape(-1)
        take = min(excess, tied.numel())
        if take:
            mask[start + tied[tied.numel() - take :]] = False
            excess -= take
        end, window = start, window * 4


_TIE_WINDOW = 1 << 16


def _all_or_none(shape: torch.Size, count: int, n: int) -> torch.Tensor | None:
    """The mask when ``count`` of ``n`` entries is none or all of them, else None."""
    if count <= 0 or n == 0:
        return torch.zeros(shape, dtype=torch.bool)
    if count >= n:
        return torch.ones(shape, dtype=torch.bool)
    return None


def _count_mask(values: torch.Tensor, count: int, *, largest: bool) -> torch.Tensor:
    """Mask of exactly ``count`` entries, the largest or the smallest; among entries equal to
    the threshold the lowest flat indices are kept.  Threshold by ``kthvalue``; no full sort."""
    flat = values.reshape(-1)
    n = flat.numel()
    trivial = _all_or_none(values.shape, count, n)
    if trivial is not None:
        return trivial
    if largest:
        threshold = kth_smallest(flat, n - count + 1)
        mask = flat >= threshold
    else:
        threshold = kth_smallest(flat, count)
        mask = flat <= threshold
    excess = int(torch.count_nonzero(mask)) - count
    if excess > 0:  # entries tied at the threshold: drop those with the highest indices
        _drop_last_ties(flat, threshold, mask, excess)
    return mask.reshape(values.shape)


def bottom_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` smallest entries (flat order), ties broken by lowest flat index: the
    first ``count`` positions of a stable ascending sort.  Uses ``kthvalue``, not a sort."""
    return _count_mask(values, count, largest=False)


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly ``k`` largest entries of ``values`` (e.g. magnitudes); among entries equal
    to the threshold the lowest flat indices are kept (a stable descending sort's first ``k``).
    Threshold by ``kthvalue``; no full sort.  Values must not be nan."""
    return _count_mask(values, k, largest=True)


def topk_magnitude_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_mask` of ``|x|`` (a CPU bool tensor shaped like ``x``): the ``k`` entries of
    largest magnitude, ties at the threshold kept by lowest flat index.

    Magnitudes are compared as integers: the bits of a float with the sign bit cleared order
    exactly as its magnitude does (nan above inf), so the selection is a function of the bits
    alone and runs on numpy's integer kernels a block at a time, with no whole-tensor temporary
    besides the mask."""
    flat = x.reshape(-1)
    n = flat.numel()
    trivial = _all_or_none(x.shape, k, n)
    if trivial is not None:
        return trivial
    bits = flat.detach().cpu().contiguous().view(FLOAT_BITS[flat.dtype]).numpy()
    top = np.iinfo(bits.dtype).max  # clears the sign bit: the magnitude's key
    threshold, smaller = _kth_smallest_key(bits, top, n - k + 1)
    mask = np.empty(n, dtype=bool)
    for lo in range(0, n, _MAGNITUDE_BLOCK):
        np.greater_equal(
            bits[lo : lo + _MAGNITUDE_BLOCK] & top, threshold, out=mask[lo : lo + _MAGNITUDE_BLOCK]
        )
    mask[_last_ties(bits, top, threshold, n - smaller - k)] = False
    return torch.from_numpy(mask).reshape(x.shape)


def keep_topk_magnitude_(x: torch.Tensor, k: int) -> torch.Tensor:
    """``keep_where_(x, topk_magnitude_mask(x, k))`` without the mask: every entry outside the
    top ``k`` magnitudes becomes +0.0, in place, a block at a time (integer operations on the
    float bits).  ``x`` must be a contiguous CPU tensor; TIES trims each task vector with it."""
    n = x.numel()
    if k >= n:
        return x
    bits = x.detach().view(-1).view(FLOAT_BITS[x.dtype]).numpy()
    if k <= 0:
        bits[:] = 0
        return x
    top = np.iinfo(bits.dtype).max
    shift = 8 * bits.itemsize - 1
    threshold, smaller = _kth_smallest_key(bits, top, n - k + 1)
    scratch = np.empty(min(n, _MAGNITUDE_BLOCK), dtype=bits.dtype)  # one buffer for all blocks
    for lo in range(0, n, _MAGNITUDE_BLOCK):
        part = bits[lo : lo + _MAGNITUDE_BLOCK]
        keep = np.bitwise_and(part, top, out=scratch[: part.size])
        keep -= threshold  # < 0 exactly where the magnitude is below the threshold
        keep >>= shift  # all ones there, else zero
        np.invert(keep, out=keep)
        part &= keep
    bits[_last_ties(bits, top, threshold, n - smaller - k)] = 0
    return x


def _last_ties(bits: np.ndarray, top: int, threshold: np.integer, excess: int) -> np.ndarray:
    """The ``excess`` highest flat indices whose key ``bits & top`` equals ``threshold``.

    Scans from the end in growing windows: usually a handful of entries tie, all near wherever
    the scan starts, so this reads a small tail instead of the whole tensor."""
    found: list[np.ndarray] = []
    end, window = bits.size, _TIE_WINDOW
    while excess > 0 and end > 0:
        start = max(0, end - window)
        tied = np.flatnonzero((bits[start:end] & top) == threshold)
        take = min(excess, tied.size)
        if take:
            found.append(start + tied[tied.size - take :])
            excess -= take
        end, window = start, window * 4
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _kth_smallest_key(bits: np.ndarray, top: int, rank: int) -> tuple[np.integer, int]:
    """The ``rank``-th smallest (1-based) of the keys ``bits & top``, and how many keys are
    strictly smaller.  Bracketed between two order statistics of a fixed strided sample, then
    selected among the few keys inside the bracket (all keys if the bracket misses).  The
    answer is unique, so the path cannot change it."""
    n = bits.size
    if n <= 4 * _SAMPLE:
        keys = bits & top
        value = np.partition(keys, rank - 1)[rank - 1]
        return value, int(np.count_nonzero(keys < value))
    sample = bits[:: n // _SAMPLE][:_SAMPLE] & top
    m = sample.size
    q = rank / n
    margin = 5.0 * math.sqrt(m * q * (1.0 - q)) + 16.0  # 5 sigma of the sample's rank
    lo_rank = max(1, math.floor(q * m - margin))
    hi_rank = min(m, math.ceil(q * m + margin))
    ordered = np.partition(sample, [lo_rank - 1, hi_rank - 1])
    lo_key, hi_key = ordered[lo_rank - 1], ordered[hi_rank - 1]
    unsigned = np.dtype(f"u{bits.itemsize}")
    width = unsigned.type(hi_key - lo_key)  # keys are >= 0: the difference fits
    below = 0
    parts: list[np.ndarray] = []
    scratch = np.empty(_MAGNITUDE_BLOCK, dtype=bits.dtype)  # buffers reused block after block
    flags = np.empty(_MAGNITUDE_BLOCK, dtype=bool)
    for lo in range(0, n, _MAGNITUDE_BLOCK):
        block = bits[lo : lo + _MAGNITUDE_BLOCK]
        offset, flag = scratch[: block.size], flags[: block.size]
        np.bitwise_and(block, top, out=offset)
        offset -= lo_key  # < 0: below the bracket; as unsigned, those exceed any width
        below += int(np.count_nonzero(np.less(offset, 0, out=flag)))
        parts.append(offset[np.less_equal(offset.view(unsigned), width, out=flag)])
    inside = np.concatenate(parts)
    r = rank - below
    if 1 <= r <= inside.size:
        value = np.partition(inside, r - 1)[r - 1]
        return lo_key + value, below + int(np.count_nonzero(inside < value))
    keys = bits & top  # the bracket missed (adversarial data): exact anyway
    value = np.partition(keys, rank - 1)[rank - 1]
    return value, int(np.count_nonzero(keys < value))


_MAGNITUDE_BLOCK = 1 << 18


def band_mask(values: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Mask of positions ``[start, start + count)`` of the stable ascending order of ``values``
    (ties: lower flat index is "smaller").  Breadcrumbs keeps this band of magnitudes."""
    n = values.numel()
    start = max(0, min(start, n))
    end = max(start, min(start + count, n))
    return bottom_mask(values, end) & ~bottom_mask(values, start)


def magnitude_row_ranks(x: torch.Tensor) -> torch.Tensor:
    """``row_ranks(torch.abs(x))``: the rank (1..m, int64) of each ``|x|`` within its row (last
    dim), ties by index.

    For float32 and smaller on the CPU the magnitude's bits (sign cleared; they order as the
    magnitudes do, nan last) times m plus the column give keys that are unique within a row and
    order as the stable sort does, so numpy's plain integer sort, whatever its algorithm,
    returns that order (measured: 13 ms against 230 ms for torch's stable sort of 2048 rows of
    2048).  Other dtypes and devices take :func:`row_ranks`."""
    m = x.shape[-1] if x.dim() else 0
    if x.device.type != "cpu" or x.dtype not in _RANK_KEY_DTYPES or m == 0:
        return row_ranks(torch.abs(x))
    bits = x.detach().contiguous().reshape(-1, m).view(FLOAT_BITS[x.dtype]).numpy()
    keys = (bits & np.iinfo(bits.dtype).max).astype(np.int64)  # < 2**31: times m fits int64
    keys *= m
    keys += np.arange(m, dtype=np.int64)
    keys.sort(axis=1)
    ranks = np.empty_like(keys)
    np.put_along_axis(ranks, keys % m, np.arange(1, m + 1, dtype=np.int64)[None, :], axis=1)
    return torch.from_numpy(ranks).reshape(x.shape)


_RANK_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def keep_below_rank_table(
    x: np.ndarray, words: np.ndarray | Callable[[int, int], np.ndarray], table: np.ndarray
) -> np.ndarray:
    """``words < table[r - 1]`` (a bool array shaped like ``x``) where ``r`` (1..m) is the rank
    of ``|x|`` within its row (last dim, ties by index, as :func:`magnitude_row_ranks`).

    ``x``: a 2-D array of the bits of float32, float16 or bfloat16 values (int32 or int16),
    ``words``: uint32 of the same shape, or a function giving its rows ``lo:hi`` (drawn a
    block at a time, they are read from the cache), ``table``: uint32 of length m,
    non-decreasing.  DELLA keeps an entry iff its random word is below the threshold of its
    rank.

    No ranks are formed.  With c = #{j: table[j] <= w} the test is ``r - 1 >= c``.  With the
    row's magnitudes sorted (s_0 <= ... <= s_{m-1}, then a sentinel above every key): if
    s_c < |x| then r - 1 > c (kept), if s_c > |x| then r - 1 < c (dropped); if s_c = |x| and
    that magnitude occurs once in the row, r - 1 = c (kept).  So one plain sort of 32-bit keys
    per row, c from the word by a bucket table (the word's top bits give a bucket holding at
    most one table value) and one gather decide every entry but those whose magnitude repeats
    in the row and sits exactly at s_c; those few get their rank by counting (or, when many,
    their rows get ranks from unique keys ``magnitude * 2**b + column``)."""
    rows, m = x.shape
    keep = np.empty((rows, m), dtype=bool)
    if rows == 0 or m == 0:
        return keep
    counts = _table_counter(table)
    top = np.iinfo(x.dtype).max
    block = max(1, _RANK_BLOCK // m)
    sentinel = np.uint32(0xFFFFFFFF)  # above every key (keys are < 2**31)
    for lo in range(0, rows, block):
        hi = min(rows, lo + block)
        keys = np.bitwise_and(x[lo:hi], top)
        keys = keys.view(np.uint32) if keys.itemsize == 4 else keys.astype(np.uint32)
        ordered = np.empty((hi - lo, m + 1), dtype=np.uint32)
        ordered[:, m] = sentinel
        ordered[:, :m] = keys
        ordered[:, :m].sort(axis=1)
        drawn = words(lo, hi) if callable(words) else words[lo:hi]
        c = counts(drawn)
        c += (np.arange(hi - lo, dtype=c.dtype) * (m + 1))[:, None]
        at = np.take(ordered, c)
        np.greater_equal(keys, at, out=keep[lo:hi])
        equal = np.flatnonzero(keys == at)
        if equal.size:
            _settle_repeated(ordered, keys, c, equal, keep[lo:hi], drawn, table)
    return keep


def _settle_repeated(
    ordered: np.ndarray,
    keys: np.ndarray,
    at: np.ndarray,
    equal: np.ndarray,
    keep: np.ndarray,
    words: np.ndarray,
    table: np.ndarray,
) -> None:
    """Correct ``keep`` (a block of rows, in place) at the flat indices ``equal`` where the
    key equals s_c (``at``: flat indices of s_c in ``ordered``): where that magnitude repeats
    in the row, kept iff #smaller + #equal at a lower column >= c, counted on the row."""
    m = keys.shape[1]
    row, col = np.divmod(equal, m)
    where = at.reshape(-1)[equal]  # row * (m + 1) + c
    c = where - row * (m + 1)
    key = keys.reshape(-1)[equal]
    flat = ordered.reshape(-1)
    repeated = flat[where + 1] == key  # c < m here: the sentinel at m never equals a key
    repeated |= (c > 0) & (flat[np.maximum(where - 1, 0)] == key)
    if not repeated.any():
        return
    row, col, c, key = row[repeated], col[repeated], c[repeated], key[repeated]
    rows, index, per_row = np.unique(row, return_inverse=True, return_counts=True)
    many = per_row > _SETTLE_BY_COUNTING
    if many.any():  # a row of zeros, say: that row's ranks from unique keys instead
        heavy = rows[many]
        keep[heavy] = _keep_by_sorted_keys(keys[heavy], words[heavy], table)
        light = ~many[index]
        row, col, c, key = row[light], col[light], c[light], key[light]
    if not row.size:
        return
    peers = keys[row]  # one row per entry to settle (at most 16 per row of the block)
    smaller = np.count_nonzero(peers < key[:, None], axis=1)
    before = np.count_nonzero(
        (peers == key[:, None]) & (np.arange(m)[None, :] < col[:, None]), axis=1
    )
    keep[row, col] = smaller + before >= c


_SETTLE_BY_COUNTING = 16  # entries of a row settled by counting; more: the row's unique keys


_RANK_BLOCK = 1 << 17  # elements per block of rows: the block's arrays stay in the CPU cache


def _keep_by_sorted_keys(keys: np.ndarray, words: np.ndarray, table: np.ndarray) -> np.ndarray:
    """:func:`keep_below_rank_table` by its definition, for rows of 31-bit magnitude keys: sort
    the unique keys ``key * 2**b + column``; position j of a row has rank j + 1."""
    rows, m = keys.shape
    b = max(1, (m - 1).bit_length())
    unique = keys.astype(np.int64) << b
    unique |= np.arange(m, dtype=np.int64)
    unique.sort(axis=1)
    columns = unique & ((1 << b) - 1)
    drawn = np.take_along_axis(words, columns, axis=1)
    keep = np.empty((rows, m), dtype=bool)
    np.put_along_axis(keep, columns, drawn < table[None, :], axis=1)
    return keep


def _table_counter(table: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function of uint32 words giving c = #{j: table[j] <= w} (intp) for the non-decreasing
    ``table``.

    Buckets by the word's top ``bits`` bits: where every bucket holds at most one entry of the
    table, c = start[h] + (w >= value[h]), start[h] being the entries below the bucket and
    value[h] the one inside it (an empty bucket: start - 1 and value 0, so that c = start).
    Otherwise (very long rows, repeated thresholds) a binary search, which gives the same c."""
    for bits in range(8, 21):  # the fewest buckets that hold one entry each: cache-resident
        width = 1 << (32 - bits)
        edges = np.arange(1 << bits, dtype=np.uint64) * np.uint64(width)
        start = np.searchsorted(table, edges, side="left").astype(np.intp)
        end = np.searchsorted(table, edges + np.uint64(width - 1), side="right").astype(np.intp)
        if np.all(end - start <= 1):
            inside = end > start
            value = np.zeros(1 << bits, dtype=np.uint32)
            value[inside] = table[start[inside]]
            start[~inside] -= 1
            return partial(_count_by_bucket, np.uint32(32 - bits), start, value)

    return partial(_count_by_search, table)


def _count_by_bucket(
    shift: np.uint32, start: np.ndarray, value: np.ndarray, words: np.ndarray
) -> np.ndarray:
    h = np.right_shift(words, shift)
    c = np.take(start, h)
    c += np.take(value, h) <= words
    return c


def _count_by_search(table: np.ndarray, words: np.ndarray) -> np.ndarray:
    return np.searchsorted(table, words, side="right").astype(np.intp)


def row_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank (1..m, int64) of each entry within its row (last dim) in ascending order, ties by
    index (stable sort).  ``values`` must be at least 1-D."""
    order = torch.sort(values, dim=-1, stable=True).indices
    m = values.shape[-1]
    ranks = torch.empty_like(order)
    positions = torch.arange(1, m + 1, dtype=torch.int64).expand_as(order).contiguous()
    ranks.scatter_(-1, order, positions)
    return ranks
