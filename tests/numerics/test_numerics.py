"""numerics: reproducible reductions, libm-free transcendentals, counter RNG, exact selection."""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import blake3
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from git_crdt_merge import numerics

FLOAT_BITS_OF = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
}
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
finite64 = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite32, max_size=300), st.randoms(use_true_random=False))
def test_exact_sum_of_float32_equals_fsum_in_any_order(values: list[float], rnd: Any) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    expected = math.fsum(x.double().tolist())
    assert numerics.exact_sum(x) == expected
    shuffled = list(values)
    rnd.shuffle(shuffled)
    assert numerics.exact_sum(torch.tensor(shuffled, dtype=torch.float32)) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(finite64, max_size=200))
def test_exact_sum_of_float64_equals_fsum(values: list[float]) -> None:
    assert numerics.exact_sum(torch.tensor(values, dtype=torch.float64)) == math.fsum(values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(finite32, finite32), min_size=1, max_size=200))
def test_dot_of_float32_is_exact(pairs: list[tuple[float, float]]) -> None:
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    expected = math.fsum(
        x * y for x, y in zip(a.double().tolist(), b.double().tolist(), strict=True)
    )
    assert numerics.dot(a, b) == expected


def test_reductions_do_not_depend_on_order_chunking_or_threads() -> None:
    stream = numerics.RandomStream(b"\x07" * 32)
    u = stream.uniform("t", "c", 1 << 20)
    x = ((u - 0.5) * torch.where(u > 0.9, 1e4, 1e-3)).to(torch.float32)
    reference = numerics.exact_sum(x)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(x.numel()))
    assert numerics.exact_sum(x[perm]) == reference
    chunks = numerics.exact_sum_rows(x.reshape(64, -1))
    assert math.fsum(chunks.tolist()) == reference
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert numerics.exact_sum(x) == reference
            assert numerics.dot(x, x) == math.fsum((x.double() * x.double()).tolist())
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_blocked_dot_of_large_tensors_is_the_exact_sum_of_the_products(dtype: torch.dtype) -> None:
    """Block by block (several blocks, the last partial), signs mixed, 20 binades of spread;
    float32/bfloat16 products are exact in float64, float64 ones rounded once each."""
    rng = np.random.default_rng(11)
    n = 300_001
    a = torch.from_numpy(rng.standard_normal(n) * np.exp2(rng.integers(-10, 10, n))).to(dtype)
    b = torch.from_numpy(rng.standard_normal(n)).to(dtype)
    products = (a.double() * b.double()).tolist()
    assert numerics.dot(a, b) == math.fsum(products)
    assert numerics.dot(a.reshape(1, -1), b.reshape(1, -1)) == numerics.dot(a, b)
    b[7] = math.inf
    assert numerics.dot(a, b) in (math.inf, -math.inf)  # the general path
    b[8] = math.nan
    assert math.isnan(numerics.dot(a, b))


def test_dot_rows_in_chunks_is_each_rows_exact_dot() -> None:
    rng = np.random.default_rng(12)
    a = torch.from_numpy(rng.standard_normal((100, 5000)) * 1e3).to(torch.float32)
    b = torch.from_numpy(rng.standard_normal((100, 5000))).to(torch.float32)
    a[41, 3] = math.nan
    got = numerics.dot_rows(a, b)  # 13 rows per chunk: several chunks, the last partial
    for i in range(100):
        want = math.fsum((a[i].double() * b[i].double()).tolist())
        assert (math.isnan(got[i]) and math.isnan(want)) or got[i] == want, i
    long_rows = torch.from_numpy(rng.standard_normal((2, 300_000))).to(torch.float32)
    got = numerics.dot_rows(long_rows, long_rows.flip(1))  # rows past 2**18: the blocked dot
    want = [math.fsum((r.double() * r.flip(0).double()).tolist()) for r in long_rows]
    assert got.tolist() == want


def test_reduction_edge_cases() -> None:
    assert numerics.exact_sum(torch.tensor([])) == 0.0
    assert numerics.exact_sum(torch.zeros(10)) == 0.0
    assert numerics.exact_sum(torch.tensor(3.5)) == 3.5
    assert math.isnan(numerics.exact_sum(torch.tensor([1.0, float("nan")])))
    assert numerics.exact_sum(torch.tensor([1.0, float("inf")])) == math.inf
    assert numerics.exact_sum(torch.tensor([-math.inf, 2.0])) == -math.inf
    assert math.isnan(numerics.exact_sum(torch.tensor([-math.inf, math.inf])))
    tiny = [5e-324, 5e-324, -1e-320]
    assert numerics.exact_sum(torch.tensor(tiny, dtype=torch.float64)) == math.fsum(tiny)
    big = torch.tensor([1e308, 1e308, -1e308], dtype=torch.float64)
    assert numerics.exact_sum(big) == 1e308
    x = torch.tensor([3.0, -4.0])
    assert numerics.l1_norm(x) == 7.0
    assert numerics.l2_norm(x) == 5.0
    assert numerics.mean(x) == -0.5
    assert numerics.mean(torch.tensor([])) == 0.0
    rows = numerics.exact_sum_rows(torch.tensor([[1.0, math.nan], [1.0, 2.0], [0.0, 0.0]]))
    assert math.isnan(rows[0]) and rows[1] == 3.0 and rows[2] == 0.0


def _fold_in_python(values: list[float], lanes: int) -> float:
    """The fold of numerics.fold_sum written out in Python floats (IEEE binary64)."""
    acc = [0.0] * lanes
    for i, v in enumerate(values):
        acc[i % lanes] += v
    while lanes > 1:
        lanes //= 2
        for j in range(lanes):
            acc[j] += acc[j + lanes]
    return acc[0]


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(1, torch.float32), (5, torch.float64), (1000, torch.float16), (150_001, torch.float32)],
)
def test_fold_sum_is_the_documented_fold_bit_for_bit(n: int, dtype: torch.dtype) -> None:
    """Values over 30 binades (so the float64 additions do round), against the fold written
    out in Python; the lane count is the power of two >= n, at most 2**16."""
    rng = np.random.default_rng(n)
    raw = rng.standard_normal(n) * np.exp2(rng.integers(-15, 15, n))
    x = torch.from_numpy(raw).to(dtype)
    values = x.double().tolist()
    lanes = min(1 << 16, 1 << (n - 1).bit_length())
    assert numerics.fold_sum(x).hex() == _fold_in_python(values, lanes).hex()
    want = _fold_in_python([abs(v) for v in values], lanes)
    assert numerics.l1_norm(x).hex() == want.hex()
    assert numerics.l1_norm(x.reshape(-1, 1)) == numerics.l1_norm(x)  # flat order only
    exact = math.fsum(abs(v) for v in values)
    assert abs(numerics.l1_norm(x) - exact) <= 1e-13 * exact


def test_fold_sum_does_not_depend_on_threads_and_propagates_specials() -> None:
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3)) * 1e3
    old = torch.get_num_threads()
    try:
        results = set()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.add(numerics.l1_norm(x).hex())
    finally:
        torch.set_num_threads(old)
    assert len(results) == 1
    assert numerics.fold_sum(torch.tensor([])) == 0.0
    assert numerics.fold_sum(torch.tensor([1.0, math.inf])) == math.inf
    assert math.isnan(numerics.l1_norm(torch.tensor([1.0, math.nan])))
    assert numerics.l1_norm(torch.tensor([-math.inf, 2.0])) == math.inf


def _ulps(a: float, b: float) -> float:
    return abs(a - b) / math.ulp(b) if b != 0 else abs(a - b) / math.ulp(0.0)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1.0, max_value=1.0))
def test_acos_within_one_ulp_of_libm(x: float) -> None:
    assert _ulps(numerics.acos(x), math.acos(x)) <= 1


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e6))
def test_sin_cos_within_one_ulp_of_libm(x: float) -> None:
    assert _ulps(numerics.sin(x), math.sin(x)) <= 1
    assert _ulps(numerics.cos(x), math.cos(x)) <= 1


def test_transcendental_special_values() -> None:
    assert numerics.acos(1.0) == 0.0
    assert numerics.acos(-1.0) == math.pi
    assert numerics.acos(0.0) == math.pi / 2
    assert numerics.sin(0.0) == 0.0 and math.copysign(1, numerics.sin(-0.0)) == -1
    assert numerics.cos(0.0) == 1.0
    assert numerics.sqrt(2.0) == math.sqrt(2.0)
    with pytest.raises(ValueError):
        numerics.acos(1.5)
    with pytest.raises(ValueError):
        numerics.sin(math.inf)


ROOT = bytes(range(32))


def test_random_stream_known_answer_from_blake3_directly() -> None:
    name, cid = "model.layers.0.weight", "b3:abc"
    message = b"".join(
        struct.pack("<Q", len(p)) + p
        for p in (b"git-crdt-merge/random-stream/v1", name.encode(), cid.encode())
    )
    raw = blake3.blake3(message, key=ROOT).digest(length=16)
    expected = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, 16, 4)]
    stream = numerics.RandomStream(ROOT)
    assert stream.bits(name, cid, 4).tolist() == expected
    assert stream.bits(name, cid, 2, offset=2).tolist() == expected[2:]
    assert stream.uniform(name, cid, 4).tolist() == [e / 2**32 for e in expected]


def test_random_streams_are_keyed_by_root_tensor_and_contribution() -> None:
    a = numerics.RandomStream(ROOT)
    b = numerics.RandomStream(bytes(32))
    base = a.bits("w", "c1", 64)
    assert torch.equal(base, a.bits("w", "c1", 64))
    assert not torch.equal(base, a.bits("w", "c2", 64))
    assert not torch.equal(base, a.bits("w2", "c1", 64))
    assert not torch.equal(base, b.bits("w", "c1", 64))
    # no ambiguity from concatenation: ("ab", "c") != ("a", "bc")
    assert not torch.equal(a.bits("ab", "c", 8), a.bits("a", "bc", 8))
    assert int(base.min()) >= 0 and int(base.max()) < 2**32
    with pytest.raises(ValueError):
        numerics.RandomStream(b"short")


def test_bernoulli_masks_use_exact_integer_thresholds() -> None:
    stream = numerics.RandomStream(ROOT)
    bits = stream.bits("w", "c", 100_000)
    mask = stream.bernoulli_mask("w", "c", (100, 1000), 0.3)
    assert torch.equal(mask.reshape(-1), bits < math.floor(0.3 * 2**32))
    assert abs(float(mask.double().mean()) - 0.3) < 0.01
    assert bool(stream.bernoulli_mask("w", "c", (10,), 1.0).all())
    assert not bool(stream.bernoulli_mask("w", "c", (10,), 0.0).any())
    p = torch.linspace(0, 1, 100_000, dtype=torch.float32).reshape(100, 1000)
    per = stream.bernoulli_mask_per_element("w", "c", p)
    thresholds = torch.floor(p.double().reshape(-1) * 2**32).long()
    assert torch.equal(per.reshape(-1), bits < thresholds)
    assert abs(float(per.double().mean()) - 0.5) < 0.01


def test_topk_mask_keeps_exactly_k_with_lowest_index_ties() -> None:
    v = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    assert numerics.topk_mask(v, 3).tolist() == [False, True, True, True, False, False, False]
    assert numerics.topk_mask(v, 2).tolist() == [False, True, False, True, False, False, False]
    assert int(numerics.topk_mask(v, 0).sum()) == 0
    assert bool(numerics.topk_mask(v, 7).all())
    assert numerics.topk_mask(torch.zeros(0), 3).numel() == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.data())
def test_topk_and_band_match_a_stable_sort(values: list[int], data: st.DataObject) -> None:
    v = torch.tensor(values, dtype=torch.float32)
    n = len(values)
    k = data.draw(st.integers(0, n))
    order_desc = sorted(range(n), key=lambda i: (-values[i], i))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order_desc[:k]] = True
    assert torch.equal(numerics.topk_mask(v, k), expected)
    start = data.draw(st.integers(0, n))
    count = data.draw(st.integers(0, n))
    order_asc = sorted(range(n), key=lambda i: (values[i], i))
    band = torch.zeros(n, dtype=torch.bool)
    band[order_asc[start : start + count]] = True
    assert torch.equal(numerics.band_mask(v, start, count), band)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_magnitude_row_ranks_equal_the_stable_sort_of_magnitudes(dtype: torch.dtype) -> None:
    """Many equal magnitudes (ties by index), signed zeros, infinities and nan."""
    rng = np.random.default_rng(13)
    v = torch.from_numpy((rng.integers(-6, 7, (50, 301)) / 4).astype(np.float32))
    v[0, :5] = torch.tensor([-0.0, 0.0, math.inf, -math.inf, math.nan])
    v[1, 7] = -math.nan
    x = v.to(dtype)
    want = numerics.row_ranks(torch.abs(x))
    assert torch.equal(numerics.magnitude_row_ranks(x), want)
    cube = x.reshape(10, 5, 301)
    assert torch.equal(numerics.magnitude_row_ranks(cube), want.reshape(10, 5, 301))


def _keep_below_rank_table_reference(
    x: np.ndarray, words: np.ndarray, table: np.ndarray
) -> np.ndarray:
    """The definition: rank of |x| in its row by a stable sort, then the word against the
    threshold of that rank."""
    keep = np.zeros(x.shape, dtype=bool)
    mags = (x & np.iinfo(x.dtype).max).astype(np.int64)
    for r in range(x.shape[0]):
        order = np.argsort(mags[r], kind="stable")
        ranks = np.empty(x.shape[1], dtype=np.int64)
        ranks[order] = np.arange(1, x.shape[1] + 1)
        keep[r] = words[r].astype(np.int64) < table[ranks - 1].astype(np.int64)
    return keep


@pytest.mark.parametrize(
    ("rows", "m", "spread"), [(1, 1, 0), (3, 2, 1), (40, 257, 1), (7, 3001, 1), (9, 100, 0)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_below_rank_table_equals_the_ranks_definition(
    rows: int, m: int, spread: int, dtype: torch.dtype
) -> None:
    """Random magnitudes, rows full of ties (small integers), signed zeros, infinities and nan;
    thresholds spread over the words' range, all equal, or with repeats (binary-search path),
    words equal to a threshold and at 2**32 - 1."""
    rng = np.random.default_rng(rows * 7919 + m)
    x = torch.from_numpy(rng.standard_normal((rows, m)).astype(np.float32))
    x[rows // 2] = torch.from_numpy((rng.integers(-6, 7, m) / 4).astype(np.float32))
    x[0, :4] = torch.tensor([-0.0, 0.0, math.inf, -math.nan])[: min(4, m)]
    bits = x.to(dtype).view(numerics.FLOAT_BITS[dtype]).numpy()
    spaced = np.floor(np.linspace(0.2, 0.8, m) * 2**32).astype(np.uint32)
    tables = [spaced, np.full(m, spaced[m // 2], dtype=np.uint32), np.sort(spaced // 2 * 2 // 1024)]
    if spread:
        tables.append(np.repeat(spaced[::2], 2)[:m])
    for table in tables:
        words = rng.integers(0, 2**32, (rows, m), dtype=np.uint64).astype(np.uint32)
        words[-1, : min(m, 3)] = [table[0], 2**32 - 1, 0][: min(m, 3)]
        want = _keep_below_rank_table_reference(bits, words, table)
        got = numerics.keep_below_rank_table(bits, words, table)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_below_rank_table_on_deltas_of_nearby_weights(dtype: torch.dtype) -> None:
    """Task vectors of stored weights (x - base rounded to the storage grid): a few repeated
    magnitudes in most rows, rows of about two entries per magnitude (those at s_c settled by
    counting) and a row of zeros (its row settled by the unique keys)."""
    rng = np.random.default_rng(21)
    base = rng.standard_normal((48, 2048), dtype=np.float32)
    x = base + np.float32(0.01) * rng.standard_normal(base.shape, dtype=np.float32)
    delta = torch.from_numpy(x).to(dtype) - torch.from_numpy(base).to(dtype)
    delta[5] = 0.0
    delta[8:16] = torch.from_numpy(rng.integers(-1500, 1500, (8, 2048)) / 1024).to(dtype)
    bits = delta.contiguous().view(numerics.FLOAT_BITS[dtype]).numpy()
    table = np.floor(np.linspace(0.35, 0.65, 2048) * 2**32).astype(np.uint32)
    words = rng.integers(0, 2**32, bits.shape, dtype=np.uint64).astype(np.uint32)
    want = _keep_below_rank_table_reference(bits, words, table)
    assert np.array_equal(numerics.keep_below_rank_table(bits, words, table), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_order_statistics_equal_the_sorted_values(dtype: torch.dtype) -> None:
    """Integer keys (no negative values: ties, zeros of both signs, infinity, a subnormal) and
    the float path (a negative value), against the sorted tensor; ranks at both ends too."""
    rng = np.random.default_rng(31)
    n = 300_007
    values = np.abs(rng.standard_normal(n)) * rng.integers(0, 3, n)  # a third zeros
    values[:5] = [-0.0, math.inf, 5e-324, 1.5, 1.5]
    for flat in (torch.from_numpy(values).to(dtype), torch.from_numpy(-values + 1.0).to(dtype)):
        ranks = [1, 2, n // 4 + 1, n // 3, n // 2 + 1, (3 * (n - 1)) // 4 + 1, n - 1, n]
        want = torch.sort(flat).values[torch.tensor(ranks) - 1].tolist()
        assert numerics.order_statistics(flat, ranks) == want


def test_row_ranks_are_stable() -> None:
    v = torch.tensor([[2.0, 1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert numerics.row_ranks(v).tolist() == [[3, 2, 4, 1], [1, 2, 3, 4]]


def test_weighted_sum_is_mul_then_add_in_order() -> None:
    a = torch.tensor([1.0, 2.0], dtype=torch.float32)
    b = torch.tensor([3.0, 5.0], dtype=torch.float32)
    out = numerics.weighted_sum([a, b], [0.1, 0.7])
    w0 = torch.tensor(0.1, dtype=torch.float32)
    w1 = torch.tensor(0.7, dtype=torch.float32)
    assert torch.equal(out, a * w0 + b * w1)


# -- linear algebra -------------------------------------------------------------------------------
def test_svd_reconstructs_and_fixes_signs() -> None:
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((40, 25)))
    u, s, vh = numerics.svd(x)
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    assert u.shape == (40, 25) and s.shape == (25,) and vh.shape == (25, 25)
    assert torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, x, rtol=1e-10, atol=1e-10)
    pivots = u.abs().argmax(dim=0)
    assert torch.all(u[pivots, torch.arange(25)] > 0)
    # the sign rule makes the factors a function of x: -x flips U, not V
    u2, _, vh2 = numerics.svd(-x)
    assert torch.equal(u2, u) and torch.equal(vh2, -vh)


def test_eigh_solve_matmul_agree_with_float64_numpy() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 30))
    sym = a @ a.T + np.eye(30)
    got = numerics.matmul(torch.from_numpy(a), torch.from_numpy(a.T))
    np.testing.assert_allclose(got.numpy(), a @ a.T, rtol=1e-12)
    values, vectors = numerics.eigh(torch.from_numpy(sym))
    np.testing.assert_allclose(values.numpy(), np.linalg.eigvalsh(sym), rtol=1e-10)
    pivots = vectors.abs().argmax(dim=0)
    assert torch.all(vectors[pivots, torch.arange(30)] > 0)
    b = rng.standard_normal((30, 3))
    np.testing.assert_allclose(
        numerics.solve(torch.from_numpy(sym), torch.from_numpy(b)).numpy(),
        np.linalg.solve(sym, b),
        rtol=1e-9,
    )


def test_the_package_selects_mkls_avx2_branch() -> None:
    assert os.environ["MKL_CBWR"] == "AVX2"


@pytest.mark.parametrize("k", [1, 150_001, 299_999])
def test_topk_and_bottom_on_large_tensors_with_many_ties_match_a_stable_sort(k: int) -> None:
    """Past the sampled bracket and the windowed tie scan: few distinct values, so the ties at
    the threshold spread over the whole tensor and the scan needs several windows."""
    values = torch.from_numpy(np.random.default_rng(k).integers(0, 7, 300_000)).to(torch.float32)
    order = np.argsort(-values.numpy(), kind="stable")
    want = np.zeros(values.numel(), dtype=bool)
    want[order[:k]] = True
    assert torch.equal(numerics.topk_mask(values, k), torch.from_numpy(want))
    order = np.argsort(values.numpy(), kind="stable")
    want = np.zeros(values.numel(), dtype=bool)
    want[order[:k]] = True
    assert torch.equal(numerics.bottom_mask(values, k), torch.from_numpy(want))


def test_bernoulli_mask_drawn_in_blocks_equals_the_word_comparison() -> None:
    stream = numerics.RandomStream(bytes(range(32)))
    n = (1 << 20) * 2 + 12_345  # crosses two block boundaries
    mask = stream.bernoulli_mask("w", "c", (n,), 0.3)
    words = stream.bits("w", "c", n)
    assert torch.equal(mask, words < numerics.threshold_u32(0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keep_bernoulli_in_place_is_keep_where_of_the_mask(dtype: torch.dtype) -> None:
    """Drawn and applied in blocks (700K words: several, the last one partial)."""
    rng = numerics.RandomStream(bytes(range(32)))
    x = torch.randn(700_000, generator=torch.Generator().manual_seed(5)).to(dtype)
    x[::11] = -0.0
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for p in (0.0, 0.3, 0.9, 1.0):
        mask = rng.bernoulli_mask("w", "c", x.shape, p)
        want = torch.where(mask, x, torch.zeros_like(x))
        got = rng.keep_bernoulli_(x.clone(), "w", "c", p)
        assert torch.equal(got.view(bits), want.view(bits)), p


def test_keep_where_in_blocks_is_where_bit_for_bit() -> None:
    n = 600_000  # more than two blocks
    x = torch.from_numpy(np.random.default_rng(5).standard_normal(n).astype(np.float32))
    x[::7] = -0.0
    x[3::11] = float("nan")
    keep = torch.from_numpy(np.random.default_rng(6).random(n) < 0.5)
    want = torch.where(keep, x, torch.zeros_like(x))
    got = numerics.keep_where_(x.clone(), keep)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize(
    ("n", "dtype"),
    [
        (1000, torch.float32),
        (700_000, torch.float32),
        (300_000, torch.float64),
        (5000, torch.bfloat16),
    ],
)
def test_topk_magnitude_mask_matches_a_stable_sort_of_magnitudes(
    n: int, dtype: torch.dtype
) -> None:
    """Signed values with many equal magnitudes (-0.0 ties with +0.0); the input is left
    untouched."""
    rng = np.random.default_rng(n)
    values = (rng.integers(-9, 10, n) / 8).astype(np.float32)
    values[::7] = -0.0
    x = torch.from_numpy(values.copy()).to(dtype)
    before = x.clone()
    for k in (1, n // 3, n - 1):
        order = np.argsort(-np.abs(values), kind="stable")
        want = np.zeros(n, dtype=bool)
        want[order[:k]] = True
        assert torch.equal(numerics.topk_magnitude_mask(x, k), torch.from_numpy(want)), k
        bits = FLOAT_BITS_OF[dtype]
        trimmed = numerics.keep_topk_magnitude_(x.clone(), k)
        expect = torch.where(torch.from_numpy(want), x, torch.zeros_like(x))
        assert torch.equal(trimmed.view(bits), expect.view(bits)), k
    assert torch.equal(x, before)


def test_topk_magnitude_mask_orders_infinities_and_nan_above_finite_values() -> None:
    x = torch.tensor([1.0, -math.inf, math.nan, 3.0, math.inf, -2.0])
    assert numerics.topk_magnitude_mask(x, 3).tolist() == [False, True, True, False, True, False]
    assert numerics.topk_magnitude_mask(x, 4).tolist() == [False, True, True, True, True, False]
    kept = numerics.keep_topk_magnitude_(x.clone(), 2)
    assert kept[1] == -math.inf and math.isnan(kept[2])
    assert kept[[0, 3, 4, 5]].view(torch.int32).tolist() == [0, 0, 0, 0]  # +0.0 bits
    assert numerics.keep_topk_magnitude_(x.clone(), 0).view(torch.int32).tolist() == [0] * 6


def test_della_mask_by_rank_table_equals_the_per_element_formula() -> None:
    """The thresholds looked up by rank give the mask of p computed element by element."""
    from git_crdt_merge.strategies import sparsify

    rng = np.random.default_rng(14)
    delta = torch.from_numpy(rng.standard_normal((40, 257)).astype(np.float32))
    delta[3, :20] = 0.5  # ties
    stream = numerics.RandomStream(bytes(range(32)))
    key = sparsify.MaskKey(stream, "w", "c")
    for shape in [(40, 257), (10257 + 23,), (4, 10, 257)]:
        d = delta.reshape(-1)[: math.prod(shape)].reshape(shape)
        rows = d.reshape(1, -1) if d.dim() < 2 else d
        moved = torch.movedim(rows, 1, -1)
        ranks = numerics.row_ranks(torch.abs(moved))
        m = moved.shape[-1]
        p = (ranks - 1).to(torch.float64) / float(m - 1) * (2.0 * 0.15) + (0.5 - 0.15)
        p = torch.movedim(p, -1, 1).reshape(d.shape)
        want = stream.bernoulli_mask_per_element("w", "c", p)
        assert torch.equal(sparsify.della_magprune_mask(d, 0.5, 0.15, key), want), shape
        assert torch.equal(sparsify.della_probabilities(d, 0.5, 0.15), p), shape


@pytest.mark.parametrize("n", [0, 5, 64, 200, 515])
def test_matmul_symmetric_is_the_product_made_exactly_symmetric(n: int) -> None:
    rng = np.random.default_rng(n)
    w = rng.standard_normal((n, 37)).astype(np.float32).astype(np.float64)
    g = rng.standard_normal((37, 37))
    g = g @ g.T
    gw = torch.from_numpy(g @ w.T)
    got = numerics.matmul_symmetric(torch.from_numpy(w).to(torch.float32), gw)  # exact cast
    assert got.dtype == torch.float64 and got.shape == (n, n)
    assert torch.equal(got, got.T)
    want = w @ (g @ w.T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10 * max(1.0, n))
    full = numerics.matmul(torch.from_numpy(w), gw)
    assert torch.equal(got.tril(), full.tril()) or n > 64  # one block: the same lower triangle
    with pytest.raises(ValueError, match="matmul_symmetric needs"):
        numerics.matmul_symmetric(torch.from_numpy(w), torch.from_numpy(w))


@pytest.mark.parametrize("n", [1, 7, 130])
def test_solve_spd_matches_the_lu_solve_and_falls_back_to_it_for_a_singular_gram(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n + 3, n))
    spd = torch.from_numpy(x.T @ x + np.eye(n))
    b = torch.from_numpy(rng.standard_normal((n, 4)))
    got = numerics.solve_spd(spd, b)
    np.testing.assert_allclose(got.numpy(), numerics.solve(spd, b).numpy(), rtol=1e-9, atol=1e-12)
    upper_ignored = spd.tril() + torch.triu(torch.full_like(spd, 7.0), 1)
    assert torch.equal(numerics.solve_spd(upper_ignored, b), got)  # only the lower triangle
    # indefinite (not a Gram matrix, but non-singular): the LU solve, not an error
    sym = torch.from_numpy(np.diag(np.arange(n, dtype=np.float64) - n / 2 + 0.25))
    np.testing.assert_allclose(
        numerics.solve_spd(sym, b).numpy(), numerics.solve(sym, b).numpy(), rtol=1e-12
    )
    with pytest.raises(RuntimeError):  # singular: LU's error, as numerics.solve
        numerics.solve_spd(torch.zeros(n, n, dtype=torch.float64), b)
