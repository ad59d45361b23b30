"""The fast spectral paths of star, adarank and svd_knot_tying against a float64 full-SVD
reference (numpy's LAPACK SVD, the definition the strategies had before the Gram / range-finder
algorithms), on small matrices: low rank plus noise, flat (Gaussian) spectra, rank-deficient and
zero matrices, wide and tall."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from git_crdt_merge.numerics import RandomStream
from git_crdt_merge.numerics import spectral as lowrank
from git_crdt_merge.strategies import get_strategy, resolve_params, run_strategy, spectral

KEY = "layer.weight\nc1"
PINNED_SKETCH = [[1.0, -1.0, -1.0, -1.0], [-1.0, 1.0, -1.0, -1.0]]


def _low_rank(seed: int, shape: tuple[int, int], rank: int, noise: float) -> np.ndarray:
    """rank leading directions with singular values 2^(rank-1) .. 1, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = 2.0 ** np.arange(rank - 1, -1, -1)
    return ((u * s) @ v.T + noise * rng.standard_normal(shape)).astype(np.float32).astype(float)


def _gaussian(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(float)


def _rank_deficient(seed: int, shape: tuple[int, int], rank: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(-3, 4, (shape[0], rank)).astype(float)
    b = rng.integers(-3, 4, (rank, shape[1])).astype(float)
    return a @ b  # exact in float32 and float64


def ref_energy(m: np.ndarray, energy: float) -> tuple[np.ndarray, int]:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    total = float((s * s).sum())
    if total == 0:
        return np.zeros_like(m), 0
    r = int(np.argmax(np.cumsum(s * s) >= energy * total)) + 1
    return (u[:, :r] * s[:r]) @ vt[:r], r


def ref_star(m: np.ndarray, eta: float) -> tuple[np.ndarray, int]:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    if s.sum() == 0:
        return np.zeros_like(m), 0
    r = int(np.argmax(np.cumsum(s) >= eta * s.sum())) + 1
    return (u[:, :r] * (s[:r] * (s.sum() / s[:r].sum()))) @ vt[:r], r


def _gram_nuclear_bound(m: np.ndarray) -> float:
    """Relative error bound of a nuclear norm whose singular values come from Gram eigenvalues
    (absolute error <= rows * eps * s_1^2 per eigenvalue, so <= rows * eps * s_1^2 / s_i per
    singular value, and at most s_i itself), times 4 for the rounding of the Gram product."""
    s = np.linalg.svd(m, compute_uv=False)
    eps_term = 4 * min(m.shape) * 2.0**-52 * s[0] ** 2
    return float(np.minimum(s, eps_term / np.maximum(s, 1e-300)).sum() / s.sum())


def _rank(t: np.ndarray) -> int:
    s = np.linalg.svd(t, compute_uv=False)
    return int((s > s[0] * 1e-9).sum()) if s.size and s[0] > 0 else 0


SHAPES = [(256, 320), (320, 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_adarank_range_finder_matches_the_full_svd(shape: tuple[int, int], energy: float) -> None:
    m = _low_rank(1, shape, 12, 1e-4)
    w = torch.tensor(m if shape[0] <= shape[1] else m.T)
    total = float(np.square(m).sum())
    assert spectral._energy_sketched(w, energy * total, KEY) is not None  # the fast path ran
    out = spectral._energy_truncation(energy)(torch.tensor(m), KEY).numpy()
    ref, r = ref_energy(m, energy)
    assert _rank(out) == r  # the paper's minimal rank on a decaying spectrum
    assert float(np.square(out).sum()) >= energy * total
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9 * math.sqrt(total))


@pytest.mark.parametrize("shape", [(64, 80), (80, 64), (200, 256)])
def test_adarank_flat_spectrum_takes_the_exact_path(shape: tuple[int, int]) -> None:
    m = _gaussian(2, shape)
    w = torch.tensor(m if shape[0] <= shape[1] else m.T)
    total = float(np.square(m).sum())
    assert spectral._energy_sketched(w, 0.9 * total, KEY) is None  # the fallback decided early
    out = spectral._energy_truncation(0.9)(torch.tensor(m), KEY).numpy()
    ref, r = ref_energy(m, 0.9)
    assert r <= _rank(out) <= r + 1  # +1 only where rounding leaves the kept energy short
    assert float(np.square(out).sum()) >= 0.9 * total
    if _rank(out) == r:
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-8 * math.sqrt(total))


@pytest.mark.parametrize("shape", [(200, 150), (150, 200), (40, 40)])
@pytest.mark.parametrize("energy", [0.5, 1.0])
def test_adarank_rank_deficient_and_zero(shape: tuple[int, int], energy: float) -> None:
    m = _rank_deficient(3, shape, 5)
    out = spectral._energy_truncation(energy)(torch.tensor(m), KEY).numpy()
    ref, _ = ref_energy(m, energy)
    scale = math.sqrt(float(np.square(m).sum()))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9 * scale)
    zero = spectral._energy_truncation(energy)(torch.zeros(shape, dtype=torch.float64), KEY)
    assert not zero.any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eta", [0.3, 0.6])
def test_star_subspace_iteration_matches_the_full_svd(shape: tuple[int, int], eta: float) -> None:
    m = _low_rank(4, shape, 12, 1e-4)
    w = torch.tensor(m if shape[0] <= shape[1] else m.T)
    gram = w @ w.T
    lam = lowrank.gram_spectrum(lowrank.eigvalsh(gram))
    ref, r = ref_star(m, eta)
    assert spectral._star_subspace(w, gram, lam, r, KEY) is not None  # the fast path ran
    out = spectral._star_truncation(eta)(torch.tensor(m), KEY).numpy()
    assert _rank(out) == r
    # the rescale's nuclear norm comes from the Gram (bounded), the subspace is certified
    bound = _gram_nuclear_bound(m)
    assert bound < 1e-4
    np.testing.assert_allclose(out, ref, rtol=bound, atol=1e-8 * np.abs(ref).max())


@pytest.mark.parametrize("shape", [(64, 80), (80, 64), (150, 200)])
@pytest.mark.parametrize("kind", ["gaussian", "deficient", "zero"])
def test_star_gram_path_matches_the_full_svd(shape: tuple[int, int], kind: str) -> None:
    m = {
        "gaussian": lambda: _gaussian(5, shape),
        "deficient": lambda: _rank_deficient(6, shape, 7),
        "zero": lambda: np.zeros(shape),
    }[kind]()
    out = spectral._star_truncation(0.4)(torch.tensor(m), KEY).numpy()
    ref, r = ref_star(m, 0.4)
    assert _rank(out) == r
    # singular values from the Gram: rank choice and rescale agree with the SVD's to ~1e-12
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-8 * max(np.abs(ref).max(), 1.0))


def _knots(xs: list[np.ndarray], base: np.ndarray, raw: dict[str, object]) -> np.ndarray:
    strategy = get_strategy("svd_knot_tying")
    ids = [f"c{i}" for i in range(len(xs))]
    params = resolve_params(strategy, raw, [(c, c.upper()) for c in ids])
    return run_strategy(
        strategy,
        "layer.weight",
        torch.tensor(base),
        [torch.tensor(x) for x in xs],
        ids,
        [1.0, 0.5, 2.0][: len(xs)],
        params,
        RandomStream(bytes(range(32))),
        torch.float64,
    ).numpy()


def ref_knots_full_svd(xs: list[np.ndarray], base: np.ndarray, method: str) -> np.ndarray:
    """KnOTS with the full SVD of the concatenation, merge = weighted sum (linear, normalized)
    or TIES with density 1 (sign election and disjoint mean, both per entry)."""
    w = [1.0, 0.5, 2.0][: len(xs)]
    taus = [x - base for x in xs]
    n = taus[0].shape[1]
    u, s, vt = np.linalg.svd(np.concatenate(taus, axis=1), full_matrices=False)
    blocks = [wi * vt[:, i * n : (i + 1) * n] for i, wi in enumerate(w)]
    if method == "linear":
        merged = sum(blocks) / sum(w)
    else:
        sign = np.where(sum(blocks) >= 0, 1.0, -1.0)
        masks = [(b * sign) > 0 for b in blocks]
        num = sum(np.where(mk, b, 0.0) for mk, b in zip(masks, blocks, strict=True))
        den = sum(np.where(mk, wi, 0.0) for mk, wi in zip(masks, w, strict=True))
        merged = num / np.where(den == 0, 1.0, den)
    return base + (u * s) @ merged


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (100, 30)])
@pytest.mark.parametrize("kind", ["gaussian", "low_rank", "deficient"])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_knots_gram_basis_matches_the_full_svd(
    shape: tuple[int, int], kind: str, method: str
) -> None:
    base = _gaussian(7, shape)
    if kind == "gaussian":
        taus = [0.1 * _gaussian(8 + i, shape) for i in range(3)]
    elif kind == "low_rank":
        taus = [_low_rank(8 + i, shape, 3, 1e-3) for i in range(3)]
    else:  # the concatenation has rank 4 < m: zero singular values
        taus = [_rank_deficient(11, shape, 4) * (i + 1) for i in range(3)]
    xs = [base + t for t in taus]
    out = _knots(xs, base, {"method": method})
    ref = ref_knots_full_svd(xs, base, method)
    scale = max(np.abs(t).max() for t in taus)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9 * scale)


def test_knots_trim_on_a_full_rank_basis_matches_the_full_svd() -> None:
    """TIES with density < 1 trims each V block by magnitude: the Gram basis gives the same V
    (up to the sign fixed per U column) where every singular value is well above rounding."""
    shape = (12, 10)
    base = _gaussian(20, shape)
    xs = [base + 0.1 * _gaussian(21 + i, shape) for i in range(3)]
    out = _knots(xs, base, {"density": 0.3})
    taus = [x - base for x in xs]
    u, s, vt = np.linalg.svd(np.concatenate(taus, axis=1), full_matrices=False)
    w = [1.0, 0.5, 2.0]
    blocks = [vt[:, i * 10 : (i + 1) * 10] for i in range(3)]
    trimmed = []
    for b, wi in zip(blocks, w, strict=True):
        k = math.ceil(0.3 * b.size)
        order = np.argsort(-np.abs(b).reshape(-1), kind="stable")
        keep = np.zeros(b.size, dtype=bool)
        keep[order[:k]] = True
        trimmed.append(wi * np.where(keep.reshape(b.shape), b, 0.0))
    sign = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    masks = [(d * sign) > 0 for d in trimmed]
    num = sum(np.where(mk, d, 0.0) for mk, d in zip(masks, trimmed, strict=True))
    den = sum(np.where(mk, wi, 0.0) for mk, wi in zip(masks, w, strict=True))
    ref = base + (u * s) @ (num / np.where(den == 0, 1.0, den))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)


def test_knots_zero_updates_give_the_base() -> None:
    base = _gaussian(30, (16, 12))
    out = _knots([base.copy(), base.copy()], base, {})
    np.testing.assert_array_equal(out, base)


def test_sketch_is_a_function_of_key_and_block() -> None:
    a = lowrank.sketch(KEY, 0, 5, 3)
    assert torch.equal(a, lowrank.sketch(KEY, 0, 5, 3))
    assert not torch.equal(a, lowrank.sketch(KEY, 1, 5, 3))
    assert set(a.unique().tolist()) <= {-1.0, 1.0}
    # pinned: a change of the test matrices changes the strategies' bytes (a new revision)
    assert lowrank.sketch("t\nc", 0, 2, 4).tolist() == PINNED_SKETCH
