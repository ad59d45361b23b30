"""The toolkit's other methods (nuslerp, multislerp, karcher, sce, ram, ramplus_tl, nearswap,
arcee_fusion, passthrough) against independent float64 numpy references written from the
formulas in docs/strategies.md, plus weights, validation, dtypes and merge-order independence
through the real resolve()."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import choose, crdt, digests, fresh_repo, git, make_model, set_base

from git_crdt_merge.errors import ResolveError
from git_crdt_merge.numerics import RandomStream
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution.resolve import resolve
from git_crdt_merge.strategies import get_strategy, resolve_params, run_strategy
from git_crdt_merge.strategies.registry import check_weights

ROOT = bytes(range(1, 33))
NAME = "layer.weight"
IDS = ["a1", "b2", "c3"]
WEIGHTS = [1.0, 0.5, 2.0]
SHAPE = (6, 10)
TOOLKIT = (
    "nuslerp",
    "multislerp",
    "karcher",
    "sce",
    "ram",
    "ramplus_tl",
    "nearswap",
    "arcee_fusion",
    "passthrough",
)
UNWEIGHTED = ("karcher", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion", "passthrough")

_rng = np.random.default_rng(7)
BASE = _rng.standard_normal(SHAPE)
# sparse task vectors (about half the entries exactly unchanged), so that ram sees unique,
# shared and unchanged entries, and sce/arcee_fusion see distinct variances and importances
TAUS = [np.where(_rng.random(SHAPE) < 0.5, 0.0, 0.1 * _rng.standard_normal(SHAPE)) for _ in IDS]
XS = [BASE + t for t in TAUS]


def _run(
    name: str,
    raw: dict[str, Any] | None = None,
    *,
    n: int | None = None,
    compute: torch.dtype = torch.float64,
    storage: torch.dtype = torch.float64,
    weights: Sequence[float] = WEIGHTS,
    base: np.ndarray | None = BASE,
    xs: Sequence[np.ndarray] = XS,
) -> torch.Tensor:
    strategy = get_strategy(name)
    if n is None:
        n = min(len(IDS), len(xs), strategy.max_inputs or len(IDS))
    params = resolve_params(strategy, raw or {}, [(c, c.upper()) for c in IDS[:n]])
    return run_strategy(
        strategy,
        NAME,
        None if base is None else torch.tensor(base, dtype=storage),
        [torch.tensor(x, dtype=storage) for x in xs[:n]],
        IDS[:n],
        list(weights[:n]),
        params,
        RandomStream(ROOT),
        compute,
    )


# ---- references (numpy, float64, written from the formulas) ----------------------------------


def ref_nuslerp(
    xs: Sequence[np.ndarray],
    base: np.ndarray | None,
    weights: Sequence[float],
    flatten: bool = True,
    row_wise: bool = False,
) -> np.ndarray:
    w1, w2 = weights[:2]
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    v0, v1 = (xs[0] - base, xs[1] - base) if base is not None else (xs[0], xs[1])

    def pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ua, ub = a / max(np.linalg.norm(a), 1e-7), b / max(np.linalg.norm(b), 1e-7)
        c = float(np.clip(ua @ ub, -1, 1))
        if 1 - c * c <= 1e-16:
            return (1 - t) * a + t * b
        th = math.acos(c)
        return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)

    if flatten:
        out = pair(v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    elif row_wise:  # vectors along dim 0: the columns of a 2-D tensor
        out = np.stack([pair(v0[:, j], v1[:, j]) for j in range(v0.shape[1])], axis=1)
    else:
        out = np.stack([pair(v0[i], v1[i]) for i in range(v0.shape[0])])
    return out + base if base is not None else out


def ref_multislerp(
    xs: Sequence[np.ndarray],
    base: np.ndarray | None,
    weights: Sequence[float],
    normalize: bool = True,
    eps: float = 1e-8,
) -> np.ndarray:
    """mergekit's construction step by step, tangent T and all (T vanishes up to rounding)."""
    ys = [(x - base if base is not None else x).reshape(-1) for x in xs]
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = [np.linalg.norm(y) for y in ys]
    us = [y / (n + eps) for y, n in zip(ys, norms, strict=True)]
    mu = sum(wi * u for wi, u in zip(w, us, strict=True))
    mu_hat = mu / np.linalg.norm(mu)
    tangent = sum(wi * (u - (u @ mu_hat) * mu_hat) for wi, u in zip(w, us, strict=True))
    r = np.linalg.norm(tangent) + eps
    direction = mu_hat * math.cos(r) + tangent * math.sin(r) / r
    out = (float(np.dot(w, norms)) * direction).reshape(xs[0].shape)
    return out + base if base is not None else out


def ref_karcher(xs: Sequence[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    vs = [x.reshape(-1) for x in xs]
    norms = [np.linalg.norm(v) for v in vs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    us = [vs[i] / norms[i] for i in valid]
    alpha = 1.0 / len(valid)
    mu = sum(alpha * u for u in us)
    mu = us[0] if np.linalg.norm(mu) < tol else mu / np.linalg.norm(mu)
    for _ in range(max_iter):
        tangent = np.zeros_like(mu)
        for u in us:
            c = float(np.clip(mu @ u, -1, 1))
            th = math.acos(c)
            if th < tol:
                continue
            tangent += alpha * th / math.sin(th) * (u - c * mu)
        size = np.linalg.norm(tangent)
        if size < tol:
            break
        mu = math.cos(size) * mu + math.sin(size) * tangent / size
        mu = mu / np.linalg.norm(mu)
    return (np.mean(norms) * mu).reshape(xs[0].shape)


def ref_sce(xs: Sequence[np.ndarray], base: np.ndarray, select_topk: float) -> np.ndarray:
    taus = np.stack([x - base for x in xs])
    if select_topk < 1:
        var = taus.var(axis=0).reshape(-1)
        k = math.floor(np.count_nonzero(var) * select_topk)
        order = sorted(range(var.size), key=lambda i: (-var[i], i))
        keep = np.zeros(var.size, dtype=bool)
        keep[order[:k]] = True
        taus = taus * keep.reshape(base.shape)
    energies = np.array([np.mean(t * t) for t in taus])
    total = energies.sum()
    omega = np.full(len(xs), 1 / len(xs)) if total < 1e-6 else energies / total
    s = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    m = np.sign(taus) == s
    num = sum(o * np.where(mi, t, 0.0) for o, mi, t in zip(omega, m, taus, strict=True))
    den = sum(o * mi for o, mi in zip(omega, m, strict=True))
    return base + num / np.maximum(den, 1e-6)


def ref_ram(
    xs: Sequence[np.ndarray], base: np.ndarray, eps: float, r: float = 0.0, alpha: float = 0.0
) -> np.ndarray:
    taus = [x - base for x in xs]
    nz = [np.abs(t) > eps for t in taus]
    c = sum(z.astype(int) for z in nz)
    out = base.copy()
    for t, z in zip(taus, nz, strict=True):
        unique, shared = z & (c == 1), z & (c > 1)
        rho = shared.sum() / max(unique.sum(), eps)
        lam = 1 + r * min(max(rho, 0), alpha)
        out = out + np.where(unique, lam * t, 0.0) + np.where(shared, t / np.maximum(c, 1), 0.0)
    return out


def ref_nearswap(x: np.ndarray, base: np.ndarray, t: float) -> np.ndarray:
    w = np.clip(t / np.maximum(np.abs(base - x), 1e-6), 0, 1)
    return w * x + (1 - w) * base


def ref_arcee_fusion(x: np.ndarray, base: np.ndarray) -> np.ndarray:
    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True) + 1e-8

    p, q = softmax(x), softmax(base)
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    importance = np.abs(x - base) * kl
    flat = np.sort(importance.reshape(-1))
    n = flat.size

    def quantile(frac: float) -> float:
        return float(flat[math.floor(frac * (n - 1))])

    threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    return base + (x - base) * (importance >= threshold)


CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "nuslerp": ({}, lambda: ref_nuslerp(XS, BASE, WEIGHTS)),
    "multislerp": ({}, lambda: ref_multislerp(XS, BASE, WEIGHTS)),
    "karcher": ({}, lambda: ref_karcher(XS)),
    "sce": ({"select_topk": 0.5}, lambda: ref_sce(XS, BASE, 0.5)),
    "ram": ({}, lambda: ref_ram(XS, BASE, 1e-5)),
    "ramplus_tl": ({"r": 0.4, "alpha": 0.9}, lambda: ref_ram(XS, BASE, 1e-5, 0.4, 0.9)),
    "nearswap": ({"t": 0.05}, lambda: ref_nearswap(XS[0], BASE, 0.05)),
    "arcee_fusion": ({}, lambda: ref_arcee_fusion(XS[0], BASE)),
    "passthrough": ({"scale": 0.75}, lambda: 0.75 * XS[0]),
}


@pytest.mark.parametrize("name", TOOLKIT)
def test_matches_float64_reference_in_both_compute_dtypes(name: str) -> None:
    raw, ref = CASES[name]
    expected = ref()
    out64 = _run(name, raw)
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-12, atol=1e-12)
    out32 = _run(name, raw, compute=torch.float32, storage=torch.float32)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_references_exercise_the_interesting_cases() -> None:
    """Guards the test data: each selective method really selects something and not all."""
    sce_kept = ref_sce(XS, BASE, 0.5) != BASE
    assert 0 < sce_kept.sum() < sce_kept.size
    counts = sum((np.abs(t) > 1e-5).astype(int) for t in TAUS)
    assert {0, 1, 2, 3} <= set(np.unique(counts).tolist())
    fused = ref_arcee_fusion(XS[0], BASE) != BASE
    assert 0 < fused.sum() < (TAUS[0] != 0).sum()
    assert not np.allclose(ref_ram(XS, BASE, 1e-5, 0.4, 0.9), ref_ram(XS, BASE, 1e-5))
    near = np.abs(XS[0] - BASE)
    assert (near <= 0.05).any() and (near > 0.05).any()


@pytest.mark.parametrize(
    ("flatten", "row_wise"), [(False, False), (False, True), (True, True)], ids=str
)
def test_nuslerp_vector_axes(flatten: bool, row_wise: bool) -> None:
    raw = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    expected = ref_nuslerp(XS, BASE, WEIGHTS, flatten, row_wise)
    np.testing.assert_allclose(_run("nuslerp", raw).numpy(), expected, rtol=1e-12, atol=1e-12)
    cube = [np.arange(60.0).reshape(3, 4, 5) ** p for p in (1.0, 1.5)]
    got = _run("nuslerp", raw, base=None, xs=cube, weights=[1.0, 3.0])
    if flatten:
        want = ref_nuslerp(cube, None, [1.0, 3.0])
    else:
        axis = 0 if row_wise else -1
        moved = [np.moveaxis(c, axis, -1).reshape(-1, c.shape[axis]) for c in cube]
        rows = ref_nuslerp(moved, None, [1.0, 3.0], False, False)
        want = np.moveaxis(rows.reshape(np.moveaxis(cube[0], axis, -1).shape), -1, axis)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_spherical_methods_without_a_base_use_the_raw_weights() -> None:
    np.testing.assert_allclose(
        _run("nuslerp", base=None).numpy(), ref_nuslerp(XS, None, WEIGHTS), rtol=1e-12
    )
    np.testing.assert_allclose(
        _run("multislerp", {"normalize_weights": False}, base=None).numpy(),
        ref_multislerp(XS, None, WEIGHTS, normalize=False),
        rtol=1e-12,
    )
    # base is ignored by karcher: the same result with or without one
    assert torch.equal(_run("karcher"), _run("karcher", base=None))


def test_weights_are_honoured() -> None:
    # nuslerp: t = w2 / (w1 + w2); only the ratio matters, and swapping the weights matters
    a = _run("nuslerp", weights=[1.0, 3.0])
    assert torch.equal(a, _run("nuslerp", weights=[2.0, 6.0]))
    assert not torch.allclose(a, _run("nuslerp", weights=[3.0, 1.0]))
    np.testing.assert_allclose(a.numpy(), ref_nuslerp(XS, BASE, [1.0, 3.0]), rtol=1e-12)
    # multislerp: normalised weights are scale-free, raw ones are not
    b = _run("multislerp", weights=[1.0, 2.0, 3.0])
    np.testing.assert_allclose(_run("multislerp", weights=[2.0, 4.0, 6.0]), b, rtol=1e-14)
    np.testing.assert_allclose(b.numpy(), ref_multislerp(XS, BASE, [1, 2, 3]), rtol=1e-12)
    c = _run("multislerp", {"normalize_weights": False}, weights=[1.0, 2.0, 3.0])
    np.testing.assert_allclose(c.numpy(), ref_multislerp(XS, BASE, [1, 2, 3], False), rtol=1e-12)
    # methods without weights refuse a weighted contribution
    contributions = [("id1", "alice"), ("id2", "bob")]
    for name in UNWEIGHTED:
        strategy = get_strategy(name)
        assert not strategy.uses_weights
        check_weights(strategy, [1.0, 1.0], contributions)
        with pytest.raises(ResolveError, match=f"{name} takes no per-contribution weights"):
            check_weights(strategy, [1.0, 2.0], contributions)
    for name in ("nuslerp", "multislerp"):
        check_weights(get_strategy(name), [1.0, 2.0], contributions)


def test_special_cases_of_the_spherical_methods() -> None:
    # multislerp of one contribution is that contribution; colinear nuslerp is a lerp
    assert torch.equal(_run("multislerp", n=1), torch.tensor(XS[0]))
    double = [XS[0], BASE + 2 * TAUS[0]]
    got = _run("nuslerp", xs=double, weights=[1.0, 1.0])
    np.testing.assert_allclose(got.numpy(), BASE + 1.5 * TAUS[0], rtol=1e-12, atol=1e-12)
    # opposite task vectors: two fall back to the weighted linear mean, three are an error
    opposite = [BASE + TAUS[0], BASE - TAUS[0]]
    got = _run("multislerp", xs=opposite, weights=[1.0, 1.0])
    np.testing.assert_allclose(got.numpy(), BASE, atol=1e-15)
    with pytest.raises(ResolveError, match="multislerp: tensor layer.weight: .* cancel"):
        _run("multislerp", xs=[*opposite, BASE], weights=[1.0, 1.0, 1.0])
    # karcher: zero tensors leave the valid ones alone; all-zero gives zeros
    zeros = np.zeros(SHAPE)
    got = _run("karcher", xs=[XS[0], zeros, XS[1]])
    mean_dir = ref_karcher([XS[0], XS[1]]) / np.mean([np.linalg.norm(x) for x in XS[:2]])
    expected = mean_dir * (np.linalg.norm(XS[0]) + np.linalg.norm(XS[1])) / 3
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(
        _run("karcher", xs=[zeros, zeros], n=2), torch.zeros(SHAPE, dtype=torch.float64)
    )
    # karcher with max_iter=0 is the normalised arithmetic mean direction
    np.testing.assert_allclose(
        _run("karcher", {"max_iter": 0}).numpy(), ref_karcher(XS, max_iter=0), rtol=1e-12
    )


def test_special_cases_of_the_selective_methods() -> None:
    # sce with select_topk=0 keeps nothing; ram with a huge epsilon changes nothing
    assert torch.equal(_run("sce", {"select_topk": 0.0}), torch.tensor(BASE))
    assert torch.equal(_run("ram", {"epsilon": 10.0}), torch.tensor(BASE))
    # ramplus_tl with r = 0 is ram, bit for bit
    assert torch.equal(_run("ramplus_tl", {"r": 0.0}), _run("ram"))
    # nearswap: t = 0 is the base, a t beyond every distance is the contribution
    assert torch.equal(_run("nearswap", {"t": 0.0}), torch.tensor(BASE))
    assert torch.equal(_run("nearswap", {"t": 100.0}), torch.tensor(XS[0]))
    # arcee_fusion of a contribution equal to the base is the base
    assert torch.equal(_run("arcee_fusion", xs=[BASE]), torch.tensor(BASE))
    # passthrough: scale 1 (the default) is the contribution bit for bit, the base is ignored
    x = torch.tensor(XS[0], dtype=torch.bfloat16)
    strategy = get_strategy("passthrough")
    params = resolve_params(strategy, {}, [("a1", "A")])
    out = run_strategy(strategy, NAME, None, [x], ["a1"], [1.0], params, RandomStream(ROOT))
    assert torch.equal(out, x)
    params = resolve_params(strategy, {"scale": {"A": 2.0}}, [("a1", "A")])
    out = run_strategy(strategy, NAME, x, [x], ["a1"], [1.0], params, RandomStream(ROOT))
    assert torch.equal(out, x * 2)


def test_sce_selection_over_several_blocks_matches_the_reference() -> None:
    rng = np.random.default_rng(11)
    base = rng.standard_normal(150_001)
    xs = [base + 0.01 * rng.standard_normal(base.shape) for _ in range(3)]
    got = _run("sce", {"select_topk": 0.3}, base=base, xs=xs)
    np.testing.assert_allclose(got.numpy(), ref_sce(xs, base, 0.3), rtol=1e-12, atol=1e-12)


def test_arcee_fusion_mask_depends_on_the_stored_values_only() -> None:
    """The importance and its quantiles are float64 from the stored values, so float32 and
    float64 compute keep the same entries of float32 inputs."""
    base32 = BASE.astype(np.float32).astype(np.float64)
    xs32 = [x.astype(np.float32).astype(np.float64) for x in XS]
    kept = [
        (
            _run("arcee_fusion", compute=c, storage=torch.float32, base=base32, xs=xs32)
            != torch.tensor(base32, dtype=torch.float32)
        ).numpy()
        for c in (torch.float32, torch.float64)
    ]
    assert kept[0].any() and np.array_equal(kept[0], kept[1])
    expected = ref_arcee_fusion(xs32[0], base32) != base32
    assert np.array_equal(kept[0], expected)


def test_parameter_validation_errors_are_one_line() -> None:
    contribs = [("id1", "alice"), ("id2", "bob")]
    bad_params: list[tuple[str, dict[str, Any], str]] = [
        ("nearswap", {}, "nearswap: parameter t is required"),
        ("nearswap", {"t": "0.1"}, "nearswap: parameter t must be a number"),
        ("karcher", {"max_iter": 2.5}, "karcher: parameter max_iter must be an integer"),
        ("nuslerp", {"nuslerp_flatten": 0}, "nuslerp: parameter nuslerp_flatten must be true"),
        ("multislerp", {"weight": 1.0}, "multislerp: unknown parameter 'weight'"),
        ("sce", {"select_topk": math.inf}, "sce: parameter select_topk must be finite"),
        ("ramplus_tl", {"lambda": 1.0}, "ramplus_tl: unknown parameter 'lambda'"),
        ("passthrough", {"scale": {"carol": 2.0}}, "passthrough: parameter scale: no visible"),
        ("arcee_fusion", {"t": 0.5}, "arcee_fusion: unknown parameter 't'"),
    ]
    for name, raw, message in bad_params:
        with pytest.raises(ResolveError, match=message) as info:
            resolve_params(get_strategy(name), raw, contribs)
        assert "\n" not in str(info.value)
    bad_values: list[tuple[str, dict[str, Any], str]] = [
        ("karcher", {"max_iter": -1}, "karcher: parameter max_iter must be >= 0"),
        ("karcher", {"tol": -1e-5}, r"karcher: parameter tol must be in \(0, 1\]"),
        ("karcher", {"tol": 0}, r"karcher: parameter tol must be in \(0, 1\]"),
        ("multislerp", {"eps": -1.0}, "multislerp: parameter eps must be >= 0"),
        ("sce", {"select_topk": 1.5}, r"sce: parameter select_topk must be in \[0, 1\]"),
        ("sce", {"select_topk": -0.1}, r"sce: parameter select_topk must be in \[0, 1\]"),
        ("ram", {"epsilon": -1.0}, "ram: parameter epsilon must be >= 0"),
        ("ramplus_tl", {"alpha": -0.1}, "ramplus_tl: parameter alpha must be >= 0"),
        ("ramplus_tl", {"epsilon": -0.1}, "ramplus_tl: parameter epsilon must be >= 0"),
        ("nearswap", {"t": -0.5}, "nearswap: parameter t must be >= 0"),
    ]
    for name, raw, message in bad_values:
        with pytest.raises(ResolveError, match=message) as info:
            _run(name, raw)
        assert "\n" not in str(info.value)
    with pytest.raises(ResolveError, match="multislerp: parameter normalize_weights=true but"):
        _run("multislerp", weights=[1.0, -1.0], n=2)


def test_input_contracts() -> None:
    from git_crdt_merge.strategies import check_contract

    for name, wanted in (("nuslerp", "exactly 2"), ("nearswap", "exactly 1")):
        with pytest.raises(ResolveError, match=f"{name} needs {wanted}"):
            check_contract(get_strategy(name), 3, True)
    for name in ("arcee_fusion", "passthrough"):
        with pytest.raises(ResolveError, match=f"{name} needs exactly 1"):
            check_contract(get_strategy(name), 2, True)
    for name in ("sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion"):
        with pytest.raises(ResolveError, match=f"{name} requires a base"):
            check_contract(get_strategy(name), 1, False)
    check_contract(get_strategy("nuslerp"), 2, False)  # base optional
    check_contract(get_strategy("multislerp"), 1, False)
    check_contract(get_strategy("karcher"), 1, False)
    assert get_strategy("karcher").base == "ignored"
    assert get_strategy("passthrough").base == "ignored"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", TOOLKIT)
def test_output_keeps_the_storage_dtype(name: str, dtype: torch.dtype) -> None:
    raw, ref = CASES[name]
    out = _run(name, raw, compute=torch.float32, storage=dtype)
    assert out.dtype == dtype and out.shape == SHAPE
    assert bool(torch.isfinite(out).all())
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    if name not in ("sce", "arcee_fusion", "ram", "ramplus_tl"):  # selections may shift
        np.testing.assert_allclose(out.to(torch.float64).numpy(), ref(), rtol=tol, atol=tol)


# ---- the real resolve(): same set through different orders, same bytes ---------------------

ORDER_SHAPES = {"layer.0.weight": (16, 24), "layer.0.bias": (16,), "head.weight": (4, 16)}
ORDER_CASES: dict[str, dict[str, Any]] = {
    "nuslerp": {},
    "multislerp": {},
    "karcher": {},
    "sce": {"select_topk": 0.5},
    "ram": {},
    "ramplus_tl": {},
}
SINGLE_CASES: dict[str, dict[str, Any]] = {
    "nearswap": {"t": 0.1},
    "arcee_fusion": {},
    "passthrough": {"scale": 0.5},
}


def _model(tmp: Path, seed: int) -> Path:
    return make_model(tmp / "models" / f"m{seed}.safetensors", seed, shapes=ORDER_SHAPES)


def _add(repo: Path, path: Path) -> None:
    crdt(repo, "add-contribution", str(path), "-q")
    git(repo, "commit", "-q", "-m", f"add {path.stem}")


def test_resolve_gives_the_same_bytes_whatever_order_the_contributions_arrived_in(
    tmp_path: Path,
) -> None:
    m0, m1, m2 = _model(tmp_path, 0), _model(tmp_path, 1), _model(tmp_path, 2)
    a, b = fresh_repo(tmp_path / "a"), fresh_repo(tmp_path / "b")
    set_base(a, m0)
    _add(a, m1)
    _add(a, m2)
    _add(b, m2)
    _add(b, m1)
    set_base(b, m0)  # the base last: another history, the same state
    results: dict[str, str] = {}
    for name, params in ORDER_CASES.items():
        found = []
        for repo in (a, b):
            choose(repo, name, **params)
            found.append(digests(resolve(Repo.open(repo)).output)["model.safetensors"])
        assert found[0] == found[1], f"strategy {name}: merge orders disagree"
        results[name] = found[0]
    assert len(set(results.values())) == len(results)  # each computed its own model
    c, d = fresh_repo(tmp_path / "c"), fresh_repo(tmp_path / "d")
    set_base(c, m0)
    _add(c, m1)
    _add(d, m1)
    set_base(d, m0)
    for name, params in SINGLE_CASES.items():
        found = []
        for repo in (c, d):
            choose(repo, name, **params)
            found.append(digests(resolve(Repo.open(repo)).output)["model.safetensors"])
        assert found[0] == found[1], f"strategy {name}: histories disagree"
