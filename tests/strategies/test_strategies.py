"""Strategies against independent float64 numpy references written from the formulas."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from git_crdt_merge.errors import ResolveError
from git_crdt_merge.numerics import RandomStream
from git_crdt_merge.strategies import (
    all_strategies,
    check_contract,
    get_strategy,
    resolve_params,
    run_strategy,
)
from git_crdt_merge.vocabulary import STRATEGY_REVISIONS

ROOT = bytes(range(1, 33))
NAME = "layer.weight"
IDS = ["a1", "b2", "c3"]
WEIGHTS = [1.0, 0.5, 2.0]
SHAPE = (6, 10)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "strategies.md"
# strategies whose merge function needs nothing but the tensors; those with extra inputs or a
# whole-model statistics pass are tested in tests/strategies/test_strategies_data_aware.py
SELF_CONTAINED = [s for s in all_strategies() if not s.extra_inputs and s.model_pass is None]


def _grid(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Values on a 1/64 grid: exact in float32, so both compute dtypes see the same deltas
    (and plenty of magnitude ties, which exercises the tie rule)."""
    return np.random.default_rng(seed).integers(-40, 41, size=shape).astype(np.float64) / 64


BASE = _grid(0)
XS = [BASE + _grid(i + 1) for i in range(3)]


def _bits(cid: str, n: int) -> np.ndarray:
    return RandomStream(ROOT).bits(NAME, cid, n).numpy()


# ---- reference sparsifiers (numpy, float64) -------------------------------------------------


def ref_topk(d: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return d
    flat = d.reshape(-1)
    k = max(1, math.floor(density * flat.size))
    order = sorted(range(flat.size), key=lambda i: (-abs(flat[i]), i))
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return np.where(keep, flat, 0.0).reshape(d.shape)


def ref_band(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    if density >= 1:
        return d
    flat = d.reshape(-1)
    n = flat.size
    keep_n, top = math.floor(density * n), math.floor(gamma * n)
    bot = max(0, n - keep_n - top)
    order = sorted(range(n), key=lambda i: (abs(flat[i]), i))
    keep = np.zeros(n, dtype=bool)
    keep[order[bot : bot + keep_n]] = True
    return np.where(keep, flat, 0.0).reshape(d.shape)


def ref_random(cid: str) -> Callable[[np.ndarray, float], np.ndarray]:
    def apply(d: np.ndarray, density: float) -> np.ndarray:
        if density >= 1:
            return d
        keep = _bits(cid, d.size) < math.floor(density * 2**32)
        return np.where(keep.reshape(d.shape), d, 0.0)

    return apply


def ref_della(cid: str, epsilon: float) -> Callable[[np.ndarray, float], np.ndarray]:
    def apply(d: np.ndarray, density: float) -> np.ndarray:
        if density >= 1:
            return d
        m = d.shape[1]
        ranks = np.empty(d.shape, dtype=np.int64)
        for r in range(d.shape[0]):
            order = np.argsort(np.abs(d[r]), kind="stable")
            ranks[r, order] = np.arange(1, m + 1)
        p = (density - epsilon) + 2 * epsilon * (ranks - 1) / (m - 1)
        keep = _bits(cid, d.size).reshape(d.shape) < np.floor(p * 2**32)
        return np.where(keep, d, 0.0)

    return apply


def ref_rescale(d: np.ndarray, kept: np.ndarray) -> np.ndarray:
    full, part = np.abs(d).sum(), np.abs(kept).sum()
    return kept if full < 1e-7 or part < 1e-7 else kept * (full / part)


def ref_gta(
    sparsify: Sequence[Callable[..., np.ndarray]],
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: float = 1.0,
) -> np.ndarray:
    ds = []
    for x, w, sp in zip(XS, WEIGHTS, sparsify, strict=True):
        delta = x - BASE
        kept = sp(delta)
        if rescale and kept is not delta:
            kept = ref_rescale(delta, kept)
        ds.append(w * kept)
    num: Any
    den: Any
    if consensus:
        s = np.where(sum(ds) >= 0, 1.0, -1.0)
        masks = [np.sign(d) == s for d in ds]
        num = sum(np.where(m, d, 0.0) for m, d in zip(masks, ds, strict=True))
        den = sum(np.where(m, w, 0.0) for m, w in zip(masks, WEIGHTS, strict=True))
        den = np.where(den == 0, 1.0, den)
    else:
        num = sum(ds)
        den = sum(WEIGHTS)
    if normalize:
        num = num / den
    return BASE + lam * num


def reference(name: str) -> np.ndarray:
    density = 0.5
    if name in ("linear", "weight_average"):
        return sum(w * x for w, x in zip(WEIGHTS, XS, strict=True)) / sum(WEIGHTS)
    if name == "task_arithmetic":
        return ref_gta([lambda d: d] * 3, False, False, False, lam=0.7)
    if name == "ties":
        return ref_gta([lambda d: ref_topk(d, density)] * 3, True, True, False)
    if name in ("dare_linear", "dare_ties"):
        sps = [lambda d, c=c: ref_random(c)(d, density) for c in IDS]
        return ref_gta(sps, name == "dare_ties", False, True)
    if name in ("breadcrumbs", "breadcrumbs_ties"):
        return ref_gta(
            [lambda d: ref_band(d, density, 0.1)] * 3, name == "breadcrumbs_ties", False, False
        )
    if name in ("della", "della_linear"):
        sps = [lambda d, c=c: ref_della(c, 0.15)(d, density) for c in IDS]
        return ref_gta(sps, name == "della", name == "della", True)
    if name == "slerp":
        v0, v1, t = BASE.reshape(-1), XS[0].reshape(-1), 0.3
        n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
        c = float(np.clip(v0 @ v1 / (n0 * n1), -1, 1))
        theta = math.acos(c)
        s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
        return (s0 * v0 + s1 * v1).reshape(SHAPE)
    if name == "model_stock":
        ds = [x - BASE for x in XS]
        cos = []
        for i in range(3):
            for j in range(i + 1, 3):
                den = max(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]), 1e-6)
                cos.append(np.clip(np.sum(ds[i] * ds[j]) / den, -1, 1))
        c = float(np.mean(cos))
        t = 3 * c / (1 + 2 * c)
        return t * np.mean(XS, axis=0) + (1 - t) * BASE
    raise AssertionError(name)


RAW: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
    "della": {"density": 0.5},
    "della_linear": {"density": 0.5},
    "slerp": {"t": 0.3},
}


def _run(
    name: str, compute_dtype: torch.dtype, storage: torch.dtype = torch.float64
) -> torch.Tensor:
    strategy = get_strategy(name)
    n = min(len(IDS), strategy.max_inputs or len(IDS))
    raw = RAW.get(name, {"t": 0.5} if any(p.name == "t" for p in strategy.params) else {})
    params = resolve_params(strategy, raw, [(c, c.upper()) for c in IDS[:n]])
    return run_strategy(
        strategy,
        NAME,
        torch.tensor(BASE, dtype=storage),
        [torch.tensor(x, dtype=storage) for x in XS[:n]],
        IDS[:n],
        WEIGHTS[:n],
        params,
        RandomStream(ROOT),
        compute_dtype,
    )


# strategies whose reference is written here; the paper's other methods (issue 4) have theirs in
# their own test modules (tests/strategies/test_strategies_paper.py, ...)
CORE = (
    "linear",
    "slerp",
    "model_stock",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)


@pytest.mark.parametrize("name", [*CORE, "weight_average"])
def test_strategy_matches_float64_reference(name: str) -> None:
    expected = reference(name)
    out64 = _run(name, torch.float64)
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-12, atol=1e-12)
    out32 = _run(name, torch.float32, torch.float32)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_every_strategy_is_documented_with_all_parameters() -> None:
    text = DOCS.read_text()
    for strategy in all_strategies():
        assert f"`{strategy.name}`" in text, strategy.name
        for alias in strategy.aliases:
            assert f"`{alias}`" in text, alias
        for param in strategy.params:
            assert f"`{param.name}`" in text, (strategy.name, param.name)
        assert strategy.formula and strategy.summary


def test_random_mask_of_a_contribution_ignores_the_other_contributions() -> None:
    strategy = get_strategy("dare_linear")
    rng = RandomStream(ROOT)
    base = torch.tensor(BASE)
    xs = [torch.tensor(x) for x in XS[:2]]

    def merged(second: torch.Tensor, ids: list[str]) -> torch.Tensor:
        params = resolve_params(strategy, {"density": 0.5}, [(c, c) for c in ids])
        tensors = [xs[0], second][: len(ids)]
        return run_strategy(
            strategy, NAME, base, tensors, ids, [1.0] * len(ids), params, rng, torch.float64
        )

    alone = merged(xs[1], IDS[:1]) - base
    for second in (xs[1], xs[1] * 3 - 1):
        only_second = (
            run_strategy(
                strategy,
                NAME,
                base,
                [second],
                [IDS[1]],
                [1.0],
                resolve_params(strategy, {"density": 0.5}, [(IDS[1], "x")]),
                rng,
                torch.float64,
            )
            - base
        )
        both = merged(second, IDS[:2]) - base
        torch.testing.assert_close(both - only_second, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", [s.name for s in SELF_CONTAINED])
def test_output_keeps_the_storage_dtype(name: str, dtype: torch.dtype) -> None:
    out = _run(name, torch.float32, dtype)
    assert out.dtype == dtype and out.shape == SHAPE
    assert bool(torch.isfinite(out).all())


def test_identical_inputs_round_trip_bit_exactly() -> None:
    x = torch.tensor(XS[0]).to(torch.bfloat16)
    out = run_strategy(
        get_strategy("linear"),
        NAME,
        None,
        [x, x],
        IDS[:2],
        [1.0, 3.0],
        {"normalize": True},
        RandomStream(ROOT),
    )
    assert torch.equal(out, x)


def test_edge_shapes_and_integer_tensors() -> None:
    rng = RandomStream(ROOT)
    for strategy in SELF_CONTAINED:
        n = min(2, strategy.max_inputs or 2)
        raw: dict[str, Any] = {"t": 0.5} if any(p.name == "t" for p in strategy.params) else {}
        if any(p.name == "density" for p in strategy.params):
            raw["density"] = 0.5
        params = resolve_params(strategy, raw, [(c, c) for c in IDS[:n]])
        ids, ws = IDS[:n], [1.0] * n
        empty = run_strategy(
            strategy, "e", torch.zeros(0, 4), [torch.zeros(0, 4)] * n, ids, ws, params, rng
        )
        assert empty.shape == (0, 4)
        scalar = run_strategy(
            strategy,
            "s",
            torch.tensor(1.0),
            [torch.tensor(2.0), torch.tensor(3.0)][:n],
            ids,
            ws,
            params,
            rng,
        )
        assert scalar.shape == () and math.isfinite(float(scalar))
        ints = torch.arange(5)
        out = run_strategy(strategy, "i", ints, [ints + 1] * n, ids, ws, params, rng)
        expected = ints + 1 if strategy.base == "ignored" else ints
        assert torch.equal(out, expected)


def test_contract_violations_are_one_line_errors() -> None:
    with pytest.raises(ResolveError, match="ties requires a base"):
        check_contract(get_strategy("ties"), 2, False)
    with pytest.raises(ResolveError, match="slerp needs exactly 1"):
        check_contract(get_strategy("slerp"), 2, True)
    with pytest.raises(ResolveError, match="model_stock needs at least 2"):
        check_contract(get_strategy("model_stock"), 1, True)
    check_contract(get_strategy("linear"), 1, True)
    with pytest.raises(ResolveError, match="unknown strategy 'nope'.*ties"):
        get_strategy("nope")
    assert get_strategy("weight_average") is get_strategy("linear")
    with pytest.raises(ResolveError, match="ties: .*shape"):
        run_strategy(
            get_strategy("ties"),
            "w",
            torch.zeros(2),
            [torch.zeros(3)],
            ["a"],
            [1.0],
            resolve_params(get_strategy("ties"), {}, [("a", "a")]),
            RandomStream(ROOT),
        )


def test_parameter_validation() -> None:
    ties = get_strategy("ties")
    contribs = [("id1", "alice"), ("id2", "bob")]
    resolved = resolve_params(ties, {"density": {"alice": 0.5, "id2": 1}, "lambda": 2}, contribs)
    assert resolved["density"] == [0.5, 1.0] and resolved["lambda"] == 2.0
    assert resolve_params(ties, {}, contribs)["density"] == [1.0, 1.0]
    assert resolve_params(ties, {"density": 0.3}, contribs)["density"] == [0.3, 0.3]
    assert resolve_params(ties, {}, contribs)["normalize"] is True
    bad: list[tuple[str, dict[str, Any], str]] = [
        ("ties", {"densty": 0.5}, "ties: unknown parameter 'densty'"),
        ("ties", {"lambda": True}, "ties: parameter lambda must be a number"),
        ("ties", {"lambda": "1"}, "ties: parameter lambda must be a number"),
        ("ties", {"normalize": 1}, "ties: parameter normalize must be true or false"),
        ("ties", {"density": {"carol": 0.5}}, "ties: parameter density: no visible contribution"),
        ("ties", {"density": {"alice": 0.5, "id1": 0.4}}, "given twice"),
        ("ties", {"lambda": math.nan}, "must be finite"),
        ("slerp", {}, "slerp: parameter t is required"),
        ("model_stock", {"filter_wise": "yes"}, "model_stock: parameter filter_wise"),
    ]
    for name, raw, message in bad:
        with pytest.raises(ResolveError, match=message) as info:
            resolve_params(get_strategy(name), raw, contribs)
        assert "\n" not in str(info.value)
    della = get_strategy("della")
    params = resolve_params(della, {"density": 0.1, "epsilon": 0.2}, [("a", "a")])
    with pytest.raises(ResolveError, match="della: parameter epsilon"):
        run_strategy(
            della,
            "w",
            torch.zeros(4, 4),
            [torch.ones(4, 4)],
            ["a"],
            [1.0],
            params,
            RandomStream(ROOT),
        )


def test_model_stock_filter_wise_uses_one_ratio_per_row() -> None:
    strategy = get_strategy("model_stock")
    params = resolve_params(strategy, {"filter_wise": True}, [(c, c) for c in IDS])
    out = run_strategy(
        strategy,
        NAME,
        torch.tensor(BASE),
        [torch.tensor(x) for x in XS],
        IDS,
        WEIGHTS,
        params,
        RandomStream(ROOT),
        torch.float64,
    )
    for r in range(SHAPE[0]):
        ds = [x[r] - BASE[r] for x in XS]
        cos = [
            np.clip(ds[i] @ ds[j] / max(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]), 1e-6), -1, 1)
            for i in range(3)
            for j in range(i + 1, 3)
        ]
        c = float(np.mean(cos))
        t = 3 * c / (1 + 2 * c)
        expected = t * np.mean([x[r] for x in XS], axis=0) + (1 - t) * BASE[r]
        np.testing.assert_allclose(out[r].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_linear_rejects_zero_weight_sum() -> None:
    with pytest.raises(ResolveError, match="linear: parameter normalize"):
        run_strategy(
            get_strategy("linear"),
            "w",
            None,
            [torch.ones(2), torch.ones(2)],
            ["a", "b"],
            [1.0, -1.0],
            {"normalize": True},
            RandomStream(ROOT),
        )


def test_the_catalogue_index_names_every_strategy_and_alias() -> None:
    text = DOCS.read_text()
    index = text[text.index("## Where each name is") : text.index("## Summary")]
    for strategy in all_strategies():
        for name in (strategy.name, *strategy.aliases):
            assert f"`{name}`" in index, name


def test_every_strategy_revision_is_mirrored_for_the_cache_key() -> None:
    """``Strategy.revision`` (in the cache key) is read without torch on a cache hit, from
    vocabulary.STRATEGY_REVISIONS: the two must agree, aliases included."""
    declared = {
        name: s.revision
        for s in all_strategies()
        if s.revision != 1
        for name in (s.name, *s.aliases)
    }
    assert declared == STRATEGY_REVISIONS
    assert {declared[n] for n in ("star", "adarank", "svd_knot_tying", "knots")} == {2}
