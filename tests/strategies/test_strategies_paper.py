"""The paper's data-free methods (strategies/consensus.py, strategies/spectral.py) against
independent float64 numpy references written from the formulas in docs/strategies.md."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import crdt, git, make_model, new_repo

from git_crdt_merge.errors import ResolveError
from git_crdt_merge.numerics import RandomStream
from git_crdt_merge.replicated.contributions import set_register
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution.resolve import resolve
from git_crdt_merge.strategies import get_strategy, resolve_params, run_strategy

PAPER = (
    "emr",
    "negative_merge",
    "split_unlearn_merge",
    "weight_scope_alignment",
    "safe_merge",
    "led_merge",
    "star",
    "adarank",
    "svd_knot_tying",
    "dual_projection",
)
ROOT = bytes(range(1, 33))
NAME = "layer.weight"
IDS = ["a1", "b2", "c3"]
WEIGHTS = [1.0, 0.5, 2.0]
SHAPE = (6, 10)


def _normal(seed: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """float32-exact values (so both compute dtypes start from the same numbers), no ties."""
    values = np.random.default_rng(seed).standard_normal(shape) * scale
    return values.astype(np.float32).astype(np.float64)


BASE = _normal(0, SHAPE, 1.0)
XS = [(BASE + _normal(i + 1, SHAPE, 0.1)).astype(np.float32).astype(np.float64) for i in range(3)]


def _run(
    name: str,
    raw: dict[str, Any],
    compute: torch.dtype = torch.float64,
    *,
    base: np.ndarray = BASE,
    xs: list[np.ndarray] = XS,
    weights: list[float] = WEIGHTS,
    storage: torch.dtype = torch.float64,
    with_base: bool = True,
) -> torch.Tensor:
    strategy = get_strategy(name)
    ids = IDS[: len(xs)]
    params = resolve_params(strategy, raw, [(c, c.upper()) for c in ids])
    return run_strategy(
        strategy,
        NAME,
        torch.tensor(base, dtype=storage) if with_base else None,
        [torch.tensor(x, dtype=storage) for x in xs],
        ids,
        weights[: len(xs)],
        params,
        RandomStream(ROOT),
        compute,
    )


# ---- references (numpy, float64) -------------------------------------------------------------


def _taus(base: np.ndarray, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [x - base for x in xs]


def _top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """max(1, floor(fraction n)) largest scores, ties by lowest flat index."""
    flat = scores.reshape(-1)
    if fraction >= 1:
        return np.ones(scores.shape, dtype=bool)
    k = max(1, math.floor(fraction * flat.size))
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def _ties(vs: list[np.ndarray], w: list[float], density: float, normalize: bool) -> np.ndarray:
    """TIES-Merging of task vectors: trim, elect sign of sum w d, disjoint (weighted) mean."""
    ds = [wi * np.where(_top(np.abs(v), density), v, 0.0) for v, wi in zip(vs, w, strict=True)]
    s = np.where(sum(ds) >= 0, 1.0, -1.0)
    masks = [(d * s) > 0 for d in ds]
    num = sum(np.where(m, d, 0.0) for m, d in zip(masks, ds, strict=True))
    if not normalize:
        return num
    den = sum(np.where(m, wi, 0.0) for m, wi in zip(masks, w, strict=True))
    return num / np.where(den == 0, 1.0, den)


def ref_emr(mode: str, base: np.ndarray = BASE, xs: list[np.ndarray] = XS) -> np.ndarray:
    w = WEIGHTS[: len(xs)]
    taus = _taus(base, xs)
    gamma = np.sign(sum(wi * t for wi, t in zip(w, taus, strict=True)))
    eps = np.zeros_like(base)
    for t in taus:
        eps = np.maximum(eps, np.where(t * gamma > 0, np.abs(t), 0.0))
    uni = gamma * eps
    masks = [t * uni > 0 for t in taus]
    lams = [
        np.abs(t).sum() / np.abs(np.where(m, uni, 0.0)).sum()
        for t, m in zip(taus, masks, strict=True)
    ]
    if mode == "unified":
        return base + sum(wi * li for wi, li in zip(w, lams, strict=True)) / sum(w) * uni
    models = [base + li * np.where(m, uni, 0.0) for li, m in zip(lams, masks, strict=True)]
    return sum(wi * mi for wi, mi in zip(w, models, strict=True)) / sum(w)


def ref_negative(negate: list[bool], lam: float) -> np.ndarray:
    terms = [
        (-1 if n else 1) * lam * wi * t
        for n, wi, t in zip(negate, WEIGHTS, _taus(BASE, XS), strict=True)
    ]
    return BASE + sum(terms)


def ref_split(method: str, density: float, lam: float, negate: bool) -> np.ndarray:
    taus = _taus(BASE, XS)
    if method == "ties":
        merged = _ties(taus, WEIGHTS, density, True)
    else:
        merged = sum(wi * t for wi, t in zip(WEIGHTS, taus, strict=True))
    return BASE + (-lam if negate else lam) * merged


def ref_wsa(target: str) -> np.ndarray:
    mus = [x.mean() for x in XS]
    sds = [x.std() for x in XS]
    if target == "base":
        mu_t, sd_t = BASE.mean(), BASE.std()
    else:
        mu_t = sum(w * m for w, m in zip(WEIGHTS, mus, strict=True)) / sum(WEIGHTS)
        sd_t = sum(w * s for w, s in zip(WEIGHTS, sds, strict=True)) / sum(WEIGHTS)
    aligned = [(x - m) / s * sd_t + mu_t for x, m, s in zip(XS, mus, sds, strict=True)]
    return sum(w * a for w, a in zip(WEIGHTS, aligned, strict=True)) / sum(WEIGHTS)


def ref_safe(fraction: float) -> np.ndarray:
    w = np.array(WEIGHTS)[:, None, None]
    stack = np.stack(XS)
    mean = (w * stack).sum(0) / w.sum()
    var = (w * (stack - mean) ** 2).sum(0) / w.sum()
    k = math.floor(fraction * var.size)
    flat = var.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:k]
    frozen = np.zeros(flat.size, dtype=bool)
    frozen[order] = True
    frozen = frozen.reshape(var.shape) & (var > 0)
    return np.where(frozen, BASE, mean)


def ref_led(densities: list[float], base_density: float, lam: float) -> np.ndarray:
    taus = _taus(BASE, XS)
    elected = [_top(np.abs(t), d) for t, d in zip(taus, densities, strict=True)]
    if base_density < 1:
        important = _top(np.abs(BASE), base_density)
        elected = [e & important for e in elected]
    count = sum(e.astype(int) for e in elected)
    kept = [np.where(e & (count == 1), t, 0.0) for e, t in zip(elected, taus, strict=True)]
    return BASE + lam * sum(wi * k for wi, k in zip(WEIGHTS, kept, strict=True))


def _truncated(tau: np.ndarray, rule: Callable[[np.ndarray], tuple[int, np.ndarray]]) -> np.ndarray:
    if tau.ndim < 2:
        return tau
    m = tau.reshape(tau.shape[0], -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r, kept = rule(s)
    return ((u[:, :r] * kept) @ vt[:r]).reshape(tau.shape)


def _star_rule(eta: float) -> Callable[[np.ndarray], tuple[int, np.ndarray]]:
    def rule(s: np.ndarray) -> tuple[int, np.ndarray]:
        r = int(np.argmax(np.cumsum(s) >= eta * s.sum())) + 1
        return r, s[:r] * (s.sum() / s[:r].sum())

    return rule


def _energy_rule(energy: float) -> Callable[[np.ndarray], tuple[int, np.ndarray]]:
    def rule(s: np.ndarray) -> tuple[int, np.ndarray]:
        r = int(np.argmax(np.cumsum(s**2) >= energy * (s**2).sum())) + 1
        return r, s[:r]

    return rule


def ref_spectral(
    rule: Callable[[np.ndarray], tuple[int, np.ndarray]],
    lam: float,
    normalize: bool,
    base: np.ndarray = BASE,
    xs: list[np.ndarray] = XS,
) -> np.ndarray:
    w = WEIGHTS[: len(xs)]
    merged = sum(wi * _truncated(t, rule) for wi, t in zip(w, _taus(base, xs), strict=True))
    return base + lam * merged / (sum(w) if normalize else 1.0)


def ref_knots(
    method: str,
    density: float,
    lam: float,
    normalize: bool,
    base: np.ndarray = BASE,
    xs: list[np.ndarray] = XS,
) -> np.ndarray:
    taus = _taus(base, xs)

    def merge(vs: list[np.ndarray]) -> np.ndarray:
        if method == "ties":
            return _ties(vs, WEIGHTS, density, normalize)
        total = sum(wi * v for wi, v in zip(WEIGHTS, vs, strict=True))
        return total / sum(WEIGHTS) if normalize else total

    if base.ndim < 2:
        return base + lam * merge(taus)
    mats = [t.reshape(t.shape[0], -1) for t in taus]
    n = mats[0].shape[1]
    u, s, vt = np.linalg.svd(np.concatenate(mats, axis=1), full_matrices=False)
    blocks = [vt[:, i * n : (i + 1) * n] for i in range(len(mats))]
    return base + ((u * s) @ (lam * merge(blocks))).reshape(base.shape)


def ref_dual(rank_fraction: float, stability: float, normalize: bool) -> np.ndarray:
    taus = [t.reshape(-1) for t in _taus(BASE, XS)]
    d = np.stack(taus)
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    k = max(1, math.floor(rank_fraction * len(taus)))
    p = vt[:k].T @ vt[:k]
    out = np.zeros_like(taus[0])
    for wi, t in zip(WEIGHTS, taus, strict=True):
        shared = p @ t
        out += wi * shared + (1 - stability) * wi * (t - shared)
    if normalize:
        out /= sum(WEIGHTS)
    return BASE + out.reshape(BASE.shape)


CASES: list[tuple[str, dict[str, Any], Callable[[], np.ndarray]]] = [
    ("emr", {}, lambda: ref_emr("average")),
    ("emr", {"mode": "unified"}, lambda: ref_emr("unified")),
    ("negative_merge", {}, lambda: ref_negative([True] * 3, 1.0)),
    (
        "negative_merge",
        {"negate": {"A1": False, "c3": True}, "lambda": 0.6},
        lambda: ref_negative([False, True, True], 0.6),
    ),
    ("split_unlearn_merge", {}, lambda: ref_split("ties", 1.0, 1.0, False)),
    (
        "split_unlearn_merge",
        {"density": 0.4, "lambda": 0.8, "negate": True},
        lambda: ref_split("ties", 0.4, 0.8, True),
    ),
    (
        "split_unlearn_merge",
        {"method": "task_arithmetic"},
        lambda: ref_split("task_arithmetic", 1.0, 1.0, False),
    ),
    ("weight_scope_alignment", {}, lambda: ref_wsa("mean")),
    ("weight_scope_alignment", {"target": "base"}, lambda: ref_wsa("base")),
    ("safe_merge", {}, lambda: ref_safe(0.1)),
    ("safe_merge", {"fraction": 0.45}, lambda: ref_safe(0.45)),
    ("led_merge", {}, lambda: ref_led([0.2] * 3, 1.0, 1.0)),
    (
        "led_merge",
        {"density": {"a1": 0.5, "b2": 0.3, "c3": 0.7}, "base_density": 0.6, "lambda": 0.9},
        lambda: ref_led([0.5, 0.3, 0.7], 0.6, 0.9),
    ),
    ("star", {}, lambda: ref_spectral(_star_rule(0.4), 1.0, True)),
    (
        "star",
        {"eta": 0.7, "lambda": 0.5, "normalize": False},
        lambda: ref_spectral(_star_rule(0.7), 0.5, False),
    ),
    ("adarank", {}, lambda: ref_spectral(_energy_rule(0.9), 1.0, False)),
    (
        "adarank",
        {"energy": 0.5, "lambda": 0.3, "normalize": True},
        lambda: ref_spectral(_energy_rule(0.5), 0.3, True),
    ),
    ("svd_knot_tying", {}, lambda: ref_knots("ties", 1.0, 1.0, True)),
    (
        "svd_knot_tying",
        {"density": 0.3, "lambda": 1.5, "normalize": False},
        lambda: ref_knots("ties", 0.3, 1.5, False),
    ),
    ("svd_knot_tying", {"method": "linear"}, lambda: ref_knots("linear", 1.0, 1.0, True)),
    ("dual_projection", {}, lambda: ref_dual(0.5, 0.5, True)),
    (
        "dual_projection",
        {"rank_fraction": 1.0, "stability": 0.2, "normalize": False},
        lambda: ref_dual(1.0, 0.2, False),
    ),
    (
        "dual_projection",
        {"rank_fraction": 0.7, "stability": 1.0},
        lambda: ref_dual(0.7, 1.0, True),
    ),
]


@pytest.mark.parametrize(
    ("name", "raw", "reference"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_strategy_matches_float64_reference(
    name: str, raw: dict[str, Any], reference: Callable[[], np.ndarray]
) -> None:
    expected = reference()
    out64 = _run(name, raw)
    np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-10, atol=1e-10)
    out32 = _run(name, raw, torch.float32, storage=torch.float32)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-5, atol=2e-5)


def test_every_paper_strategy_has_a_reference_case_and_uses_weights() -> None:
    assert {c[0] for c in CASES} == set(PAPER)
    for name in PAPER:
        assert get_strategy(name).uses_weights, name
        assert not get_strategy(name).stochastic, name


@pytest.mark.parametrize("name", PAPER)
def test_weights_change_the_result_as_the_reference_says(name: str) -> None:
    raw = {"target": "base"} if name == "weight_scope_alignment" else {}
    unit = _run(name, raw, weights=[1.0, 1.0, 1.0])
    weighted = _run(name, raw)
    assert not torch.allclose(unit, weighted, rtol=1e-6, atol=1e-6)
    if name in ("negative_merge", "led_merge", "adarank"):  # no normalisation: scaling counts
        doubled = _run(name, raw, weights=[w * 2 for w in WEIGHTS])
        torch.testing.assert_close(
            doubled - _run(name, raw, weights=[0.0] * 3),
            2 * (weighted - torch.tensor(BASE)),
            rtol=1e-12,
            atol=1e-12,
        )


def test_spectral_methods_treat_higher_rank_tensors_as_matrices_and_vectors_as_is() -> None:
    base3 = BASE.reshape(3, 2, 10)
    xs3 = [x.reshape(3, 2, 10) for x in XS]
    for name, rule, normalize in (
        ("star", _star_rule(0.4), True),
        ("adarank", _energy_rule(0.9), False),
    ):
        out = _run(name, {}, base=base3, xs=xs3)
        expected = ref_spectral(rule, 1.0, normalize, base3, xs3)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)
        vec = _run(name, {}, base=BASE[0], xs=[x[0] for x in XS])
        plain = BASE[0] + sum(w * (x[0] - BASE[0]) for w, x in zip(WEIGHTS, XS, strict=True))
        np.testing.assert_allclose(
            vec.numpy(), BASE[0] + (plain - BASE[0]) / (sum(WEIGHTS) if normalize else 1.0)
        )
    out = _run("svd_knot_tying", {}, base=base3, xs=xs3)
    np.testing.assert_allclose(
        out.numpy(), ref_knots("ties", 1.0, 1.0, True, base3, xs3), rtol=1e-10, atol=1e-10
    )
    vec = _run("svd_knot_tying", {}, base=BASE[0], xs=[x[0] for x in XS])
    np.testing.assert_allclose(
        vec.numpy(),
        ref_knots("ties", 1.0, 1.0, True, BASE[0], [x[0] for x in XS]),
        rtol=1e-12,
        atol=1e-12,
    )


def test_star_keeps_each_task_matrix_nuclear_norm() -> None:
    tau = XS[0] - BASE
    out = _run("star", {"eta": 0.3}, xs=[XS[0]], weights=[1.0]).numpy() - BASE
    nuclear = np.linalg.svd(tau, compute_uv=False).sum()
    assert np.linalg.matrix_rank(out) < np.linalg.matrix_rank(tau)
    assert abs(np.linalg.svd(out, compute_uv=False).sum() - nuclear) < 1e-10 * nuclear


def test_emr_single_contribution_returns_it() -> None:
    out = _run("emr", {}, xs=[XS[1]], weights=[3.0])
    np.testing.assert_allclose(out.numpy(), XS[1], rtol=1e-12, atol=1e-12)


def test_dual_projection_with_stability_zero_is_the_weighted_average() -> None:
    out = _run("dual_projection", {"stability": 0.0})
    expected = sum(w * x for w, x in zip(WEIGHTS, XS, strict=True)) / sum(WEIGHTS)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_weight_scope_alignment_without_a_base_uses_the_mean_scope() -> None:
    out = _run("weight_scope_alignment", {}, with_base=False)
    np.testing.assert_allclose(out.numpy(), ref_wsa("mean"), rtol=1e-12, atol=1e-12)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("emr", {"mode": "one"}, "emr: parameter mode must be 'average' or 'unified'"),
    ("emr", {"mode": 1}, "emr: parameter mode must be a string"),
    ("negative_merge", {"negate": "yes"}, "negative_merge: parameter negate must be true or false"),
    ("negative_merge", {"negate": {"zz": True}}, "negate: no visible contribution"),
    ("split_unlearn_merge", {"method": "dare"}, "split_unlearn_merge: parameter method must be"),
    (
        "split_unlearn_merge",
        {"method": "task_arithmetic", "density": 0.5},
        "density applies to method 'ties' only",
    ),
    ("weight_scope_alignment", {"target": "x"}, "target must be 'mean' or 'base'"),
    ("safe_merge", {"fraction": 1.5}, r"safe_merge: parameter fraction must be in \[0, 1\]"),
    ("led_merge", {"density": 0.0}, r"led_merge: parameter density must be in \(0, 1\]"),
    ("led_merge", {"base_density": 2.0}, r"parameter base_density must be in \(0, 1\]"),
    ("star", {"eta": 0.0}, r"star: parameter eta must be in \(0, 1\]"),
    ("star", {"eta": True}, "star: parameter eta must be a number"),
    ("adarank", {"energy": 1.1}, r"adarank: parameter energy must be in \(0, 1\]"),
    ("svd_knot_tying", {"method": "dare"}, "svd_knot_tying: parameter method must be"),
    (
        "svd_knot_tying",
        {"method": "linear", "density": 0.5},
        "density applies to method 'ties' only",
    ),
    ("dual_projection", {"rank_fraction": 0.0}, r"rank_fraction must be in \(0, 1\]"),
    ("dual_projection", {"stability": -0.1}, r"stability must be in \[0, 1\]"),
    ("dual_projection", {"rank": 2}, "dual_projection: unknown parameter 'rank'"),
]


@pytest.mark.parametrize(
    ("name", "raw", "message"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_invalid_parameters_are_one_line_errors(
    name: str, raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ResolveError, match=message) as info:
        _run(name, raw)
    assert "\n" not in str(info.value)


def test_zero_weight_sum_and_missing_base_target_are_one_line_errors() -> None:
    for name in ("emr", "weight_scope_alignment", "safe_merge", "star", "dual_projection"):
        with pytest.raises(ResolveError, match=f"{name}: the contribution weights sum to 0"):
            _run(name, {}, xs=XS[:2], weights=[1.0, -1.0])
    with pytest.raises(ResolveError, match="target='base' needs a base model"):
        _run("weight_scope_alignment", {"target": "base"}, with_base=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", PAPER)
def test_half_precision_in_gives_the_same_dtype_out_close_to_the_reference(
    name: str, dtype: torch.dtype
) -> None:
    base = torch.tensor(BASE).to(dtype).double().numpy()
    xs = [torch.tensor(x).to(dtype).double().numpy() for x in XS]
    out = _run(name, {}, torch.float32, base=base, xs=xs, storage=dtype)
    assert out.dtype == dtype and out.shape == SHAPE
    full = _run(name, {}, torch.float64, base=base, xs=xs)
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    np.testing.assert_allclose(out.double().numpy(), full.numpy(), rtol=tol, atol=tol)


# ---- through resolve(): the same set in two orders gives the same bytes ----------------------

SHAPES = {"layer.0.weight": (12, 16), "layer.0.bias": (12,), "conv.weight": (4, 3, 2, 2)}
RESOLVED = {
    "emr": {},
    "led_merge": {"density": 0.4},
    "star": {},
    "svd_knot_tying": {"density": 0.5},
    "dual_projection": {},
    "safe_merge": {"fraction": 0.2},
}


def _repo(path: Path, base: Path, models: list[tuple[Path, str]]) -> Path:
    repo = new_repo(path)
    git(repo, "config", "crdt.autoResolve", "false")
    crdt(repo, "set-base", str(base), "-q")
    for model, weight in models:
        crdt(repo, "add-contribution", str(model), "--weight", weight, "-q")
        git(repo, "commit", "-q", "-m", f"add {model.stem}")
    return repo


def test_resolve_gives_identical_bytes_whatever_the_order_contributions_arrived(
    tmp_path: Path,
) -> None:
    models = [make_model(tmp_path / f"m{s}.safetensors", s, SHAPES) for s in (1, 2, 3)]
    base = make_model(tmp_path / "base.safetensors", 0, SHAPES)
    weighted = list(zip(models, ["1", "0.5", "2"], strict=True))
    one = _repo(tmp_path / "one", base, weighted)
    two = _repo(tmp_path / "two", base, weighted[::-1])
    seen: set[str] = set()
    for name, params in RESOLVED.items():
        digests = []
        for repo in (one, two):
            set_register(Repo.open(repo), "strategy", {"name": name, "params": params})
            outcome = resolve(Repo.open(repo))
            data = (outcome.output / "model.safetensors").read_bytes()
            digests.append(hashlib.sha256(data).hexdigest())
            record = json.loads((outcome.output / "resolution.json").read_text())
            assert record["strategy"] == name
        assert digests[0] == digests[1], name
        seen.add(digests[0])
    assert len(seen) == len(RESOLVED)
