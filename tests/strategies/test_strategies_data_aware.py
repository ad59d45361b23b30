"""Data-aware and search-based strategies against float64 numpy references from the formulas.

fisher_merge and regression_mean read extra inputs; ada_merging, dam, evolutionary_merge and
genetic_merge run a whole-model statistics pass (exact Gram matrices) and a search before the
per-tensor pass.  Objective plugins are real entry points in a temporary distribution.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from git_crdt_merge import plugins
from git_crdt_merge.errors import ResolveError
from git_crdt_merge.numerics import RandomStream
from git_crdt_merge.strategies import get_strategy, registry, resolve_params, run_strategy

ROOT = bytes(range(1, 33))
IDS = ["a1", "b2", "c3"]
WEIGHTS = [1.0, 0.5, 2.0]
SHAPES = {"l0.weight": (6, 10), "l0.bias": (6,), "l1.weight": (4, 6)}
NEW = [
    "fisher_merge",
    "regression_mean",
    "ada_merging",
    "dam",
    "evolutionary_merge",
    "genetic_merge",
]


def _grid(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Values on a 1/64 grid (exact in float32)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-40, 41, size=shape).astype(np.float64) / 64 * scale


BASE = {n: _grid(i, s) for i, (n, s) in enumerate(SHAPES.items())}
XS = [
    {n: BASE[n] + _grid(10 * k + i + 1, s, 0.25) for i, (n, s) in enumerate(SHAPES.items())}
    for k in range(3)
]
FISHER = [
    {n: np.abs(_grid(100 + 10 * k + i, s)) for i, (n, s) in enumerate(SHAPES.items())}
    for k in range(3)
]


def _gram(seed: int, inner: int) -> np.ndarray:
    x = _grid(seed, (12, inner))
    return x.T @ x  # exact: small integers / 64^2


GRAM = [
    {n: _gram(200 + 10 * k + i, s[1]) for i, (n, s) in enumerate(SHAPES.items()) if len(s) == 2}
    for k in range(3)
]


def _t(a: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype)


def run(
    name: str,
    raw: dict[str, Any] | None = None,
    *,
    compute: torch.dtype = torch.float64,
    storage: torch.dtype = torch.float64,
    weights: Sequence[float] = WEIGHTS,
    extras: dict[str, list[dict[str, np.ndarray]]] | None = None,
    base: bool = True,
    root: bytes = ROOT,
) -> tuple[dict[str, torch.Tensor], registry.ModelValues | None]:
    """Resolve every tensor of the small model in memory, statistics pass included."""
    strategy = get_strategy(name)
    params = resolve_params(strategy, raw or {}, [(c, c.upper()) for c in IDS])
    rng = RandomStream(root)
    extras = extras if extras is not None else {"fisher": FISHER, "gram": GRAM}

    def inputs(n: str) -> tuple[Any, ...]:
        b = _t(BASE[n], storage) if base else None
        xs = [_t(x[n], storage) for x in XS]
        ex = {
            kind: [None if n not in e else _t(e[n], storage) for e in extras[kind]]
            for kind in strategy.extra_inputs
            if kind in extras
        }
        return b, xs, ex

    model = None
    if strategy.model_pass is not None:
        summaries = {}
        for n in SHAPES:
            b, xs, ex = inputs(n)
            stored = registry.StoredInputs(n, b, xs, IDS, weights, rng, compute, extras=ex)
            summaries[n] = registry.collect_statistics(strategy, stored, params)
        numels = {n: math.prod(s) for n, s in SHAPES.items()}
        model = registry.finish_statistics(
            strategy, summaries, numels, IDS, weights, params, rng, base
        )
    out = {}
    for n in SHAPES:
        b, xs, ex = inputs(n)
        out[n] = run_strategy(
            strategy, n, b, xs, IDS, weights, params, rng, compute, extras=ex, model=model
        )
    return out, model


def assert_matches(
    out: dict[str, torch.Tensor], expected: dict[str, np.ndarray], tol: float
) -> None:
    for n, e in expected.items():
        np.testing.assert_allclose(out[n].double().numpy(), e, rtol=tol, atol=tol, err_msg=n)


# -- references ---------------------------------------------------------------------------------


def ref_fisher(weights: Sequence[float], eps: float = 1e-8, squared: bool = False) -> dict:
    result = {}
    for n in SHAPES:
        fs = [x[n] ** 2 if squared else f[n] for x, f in zip(XS, FISHER, strict=True)]
        num = sum(w * (f + eps) * x[n] for w, f, x in zip(weights, fs, XS, strict=True))
        den = sum(w * (f + eps) for w, f in zip(weights, fs, strict=True))
        result[n] = num / den
    return result


def ref_average(weights: Sequence[float], n: str) -> np.ndarray:
    return sum(w * x[n] for w, x in zip(weights, XS, strict=True)) / sum(weights)


def ref_regmean(weights: Sequence[float], alpha: float) -> dict:
    result = {}
    for n in SHAPES:
        if n not in GRAM[0]:
            result[n] = ref_average(weights, n)
            continue
        grams = []
        for g in (gr[n] for gr in GRAM):
            reg = alpha * g
            np.fill_diagonal(reg, np.diag(g))
            grams.append(reg)
        a = sum(w * x[n] @ g for w, x, g in zip(weights, XS, grams, strict=True))
        b = sum(w * g for w, g in zip(weights, grams, strict=True))
        result[n] = a @ np.linalg.inv(b)
    return result


def ref_grams(base: bool) -> dict[str, np.ndarray]:
    grams = {}
    for n in SHAPES:
        vs = np.stack([(x[n] - BASE[n] if base else x[n]).reshape(-1) for x in XS])
        grams[n] = vs @ vs.T
    return grams


def ref_shares() -> dict[str, float]:
    total = sum(math.prod(s) for s in SHAPES.values())
    return {n: math.prod(s) / total for n, s in SHAPES.items()}


def ref_retention(g: np.ndarray, lam: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    d = np.diag(g)
    r = g @ lam / d - 1
    wsum = w.sum()
    return float((w * r * r).sum() / wsum), 2 * g.T @ (w * r / d) / wsum


def ref_distance(g: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    d = np.diag(g)
    sq = c @ g @ c - 2 * g @ c + d  # ||sum_j c_j v_j - v_i||^2 for each i
    wsum = w.sum()
    return float((w * sq / d).sum() / wsum), 2 * ((w / d) @ (g @ c - g)) / wsum


def ref_adam(grad: Any, x: np.ndarray, steps: int, lr: float, lo: float, hi: float) -> np.ndarray:
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for t in range(1, steps + 1):
        g = grad(x)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mh, vh = m / (1 - 0.9**t), v / (1 - 0.999**t)
        x = np.clip(x - lr * mh / (np.sqrt(vh) + 1e-8), lo, hi)
    return x


def ref_merge(coeffs: dict[str, np.ndarray], base: bool) -> dict[str, np.ndarray]:
    out = {}
    for n in SHAPES:
        if base:
            out[n] = BASE[n] + sum(c * (x[n] - BASE[n]) for c, x in zip(coeffs[n], XS, strict=True))
        else:
            out[n] = sum(c * x[n] for c, x in zip(coeffs[n], XS, strict=True))
    return out


# -- fisher_merge -------------------------------------------------------------------------------


def test_fisher_merge_matches_the_fisher_weighted_average() -> None:
    out, _ = run("fisher_merge")
    assert_matches(out, ref_fisher(WEIGHTS), 1e-12)
    out32, _ = run("fisher_merge", compute=torch.float32, storage=torch.float32)
    assert_matches(out32, ref_fisher(WEIGHTS), 1e-5)


def test_fisher_merge_honours_weights() -> None:
    uniform, _ = run("fisher_merge", weights=[1.0, 1.0, 1.0])
    weighted, _ = run("fisher_merge")
    assert_matches(uniform, ref_fisher([1.0, 1.0, 1.0]), 1e-12)
    assert not torch.equal(uniform["l0.weight"], weighted["l0.weight"])


def test_fisher_merge_squared_weights_is_the_explicit_data_free_proxy() -> None:
    out, _ = run("fisher_merge", {"fisher_source": "squared_weights"}, extras={})
    assert_matches(out, ref_fisher(WEIGHTS, squared=True), 1e-12)
    assert get_strategy("fisher_merge").needed_extras({"fisher_source": "squared_weights"}) == ()
    assert get_strategy("fisher_merge").needed_extras({"fisher_source": "data"}) == ("fisher",)


def test_fisher_merge_subset_tensors_average_and_partial_ones_are_refused() -> None:
    subset = [{n: f[n] for n in f if n != "l0.bias"} for f in FISHER]
    out, _ = run("fisher_merge", extras={"fisher": subset})
    np.testing.assert_allclose(out["l0.bias"].numpy(), ref_average(WEIGHTS, "l0.bias"), rtol=1e-12)
    assert_matches(
        {"l0.weight": out["l0.weight"]}, {"l0.weight": ref_fisher(WEIGHTS)["l0.weight"]}, 1e-12
    )
    partial = [FISHER[0], FISHER[1], {n: v for n, v in FISHER[2].items() if n != "l0.bias"}]
    with pytest.raises(ResolveError, match="'l0.bias' has a fisher input in some contributions"):
        run("fisher_merge", extras={"fisher": partial})


def test_fisher_merge_with_zero_fisher_and_no_epsilon_is_an_error() -> None:
    zeros = [{n: np.zeros_like(v) for n, v in f.items()} for f in FISHER]
    out, _ = run("fisher_merge", extras={"fisher": zeros})  # epsilon 1e-8: the average
    np.testing.assert_allclose(
        out["l0.weight"].numpy(), ref_average(WEIGHTS, "l0.weight"), rtol=1e-12
    )
    with pytest.raises(ResolveError, match="every Fisher value is 0; set epsilon > 0"):
        run("fisher_merge", {"epsilon": 0.0}, extras={"fisher": zeros})


# -- regression_mean ----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
def test_regression_mean_matches_the_closed_form(alpha: float) -> None:
    out, _ = run("regression_mean", {"alpha": alpha})
    assert_matches(out, ref_regmean(WEIGHTS, alpha), 1e-10)
    out32, _ = run(
        "regression_mean", {"alpha": alpha}, compute=torch.float32, storage=torch.float32
    )
    assert_matches(out32, ref_regmean(WEIGHTS, alpha), 1e-5)


def test_regression_mean_honours_weights_and_reproduces_a_shared_solution() -> None:
    uniform, _ = run("regression_mean", weights=[1.0, 1.0, 1.0])
    assert_matches(uniform, ref_regmean([1.0, 1.0, 1.0], 0.9), 1e-10)
    weighted, _ = run("regression_mean")
    assert not torch.equal(uniform["l0.weight"], weighted["l0.weight"])


def test_regression_mean_singular_gram_is_a_one_line_error() -> None:
    zero = [{n: np.zeros_like(g) for n, g in gr.items()} for gr in GRAM]
    with pytest.raises(ResolveError, match="summed Gram matrix is singular") as info:
        run("regression_mean", extras={"gram": zero})
    assert "\n" not in str(info.value)


# -- ada_merging --------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_ada_merging_matches_an_adam_reference_on_the_retention_surrogate(granularity: str) -> None:
    raw = {"granularity": granularity, "steps": 60, "lr": 0.05}
    out, model = run("ada_merging", raw)
    assert model is not None
    grams, shares, w = ref_grams(True), ref_shares(), np.array(WEIGHTS)
    names = list(SHAPES) if granularity == "layer" else ["all"]
    order = sorted(SHAPES)

    def grad(x: np.ndarray) -> np.ndarray:
        if granularity == "task":
            return sum(shares[n] * ref_retention(grams[n], x, w)[1] for n in SHAPES)
        return np.concatenate(
            [
                shares[n] * ref_retention(grams[n], x[3 * i : 3 * i + 3], w)[1]
                for i, n in enumerate(order)
            ]
        )

    x = ref_adam(grad, np.full(3 * len(names), 0.3), 60, 0.05, 0.0, 1.0)
    coeffs = {
        n: x[:3] if granularity == "task" else x[3 * order.index(n) : 3 * order.index(n) + 3]
        for n in SHAPES
    }
    found = model.per_tensor
    for n in SHAPES:
        np.testing.assert_allclose(found[n], coeffs[n], rtol=1e-9, atol=1e-12)
    assert_matches(out, ref_merge(coeffs, True), 1e-9)
    loss = sum(shares[n] * ref_retention(grams[n], coeffs[n], w)[0] for n in SHAPES)
    assert model.report["loss"] == pytest.approx(loss, rel=1e-9)
    assert model.report["granularity"] == granularity and model.report["objective"] == "data-free"


def test_ada_merging_weights_change_the_objective() -> None:
    _, weighted = run("ada_merging", {"granularity": "task"})
    _, uniform = run("ada_merging", {"granularity": "task"}, weights=[1.0, 1.0, 1.0])
    assert weighted is not None and uniform is not None
    assert weighted.report["coefficients"] != uniform.report["coefficients"]


# -- dam ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reg", [{}, {"cosine_weight": 0.01, "l1_weight": 0.001, "l2_weight": 0.01}]
)
def test_dam_matches_an_adam_reference_on_the_distance_surrogate(reg: dict[str, float]) -> None:
    raw = {"steps": 50, "lr": 0.02, **reg}
    out, model = run("dam", raw, base=False)
    assert model is not None
    grams, shares, w = ref_grams(False), ref_shares(), np.array(WEIGHTS)
    order = sorted(SHAPES)
    gc, g1, g2 = reg.get("cosine_weight", 0.0), reg.get("l1_weight", 0.0), reg.get("l2_weight", 0.0)

    def penalty(x: np.ndarray) -> float:
        c = x.reshape(len(order), 3).T  # c[i] = contribution i's coefficients over tensors
        cos = [
            c[i] @ c[j] / (np.linalg.norm(c[i]) * np.linalg.norm(c[j]))
            for i in range(3)
            for j in range(i + 1, 3)
        ]
        return gc * np.mean(cos) + g1 * np.abs(x).mean() + g2 * (x * x).mean()

    def grad(x: np.ndarray) -> np.ndarray:
        data = np.concatenate(
            [
                shares[n] * ref_distance(grams[n], x[3 * i : 3 * i + 3], w)[1]
                for i, n in enumerate(order)
            ]
        )
        h = 1e-6  # the penalty's gradient by central differences (it is smooth here)
        num = np.array(
            [(penalty(x + h * e) - penalty(x - h * e)) / (2 * h) for e in np.eye(len(x))]
        )
        return data + num

    x0 = np.tile(np.array(WEIGHTS) / sum(WEIGHTS), len(order))
    x = ref_adam(grad, x0, 50, 0.02, -np.inf, np.inf)
    coeffs = {n: x[3 * order.index(n) : 3 * order.index(n) + 3] for n in SHAPES}
    for n in SHAPES:
        np.testing.assert_allclose(model.per_tensor[n], coeffs[n], rtol=1e-6, atol=1e-7)
    assert_matches(out, ref_merge(coeffs, False), 1e-6)


def test_dam_without_penalties_approaches_the_distance_optimum() -> None:
    _, model = run("dam", {"steps": 400, "lr": 0.01}, base=False)
    assert model is not None
    grams, w = ref_grams(False), np.array(WEIGHTS)
    for n in SHAPES:  # the minimiser of sum_i w_i ||m - X_i||^2 / G_ii over m in the span
        g = grams[n]
        a = (w / np.diag(g)).sum() * g
        b = g @ (w / np.diag(g))
        np.testing.assert_allclose(model.per_tensor[n], np.linalg.solve(a, b), atol=0.02)


# -- evolutionary and genetic searches ----------------------------------------------------------


@pytest.mark.parametrize("name", ["evolutionary_merge", "genetic_merge"])
@pytest.mark.parametrize("base", [True, False])
def test_search_merges_apply_the_best_coefficients_found(name: str, base: bool) -> None:
    raw = {"population_size": 8, "generations": 6}
    out, model = run(name, raw, base=base)
    assert model is not None
    c = np.array(model.report["coefficients"])
    grams, shares, w = ref_grams(base), ref_shares(), np.array(WEIGHTS)
    loss = sum(shares[n] * ref_retention(grams[n], c, w)[0] for n in SHAPES)
    assert model.report["loss"] == pytest.approx(loss, rel=1e-9)
    centre = np.ones(3) if base else w / w.sum()
    centre_loss = sum(shares[n] * ref_retention(grams[n], centre, w)[0] for n in SHAPES)
    assert loss <= centre_loss  # the centre is in the first population and the best is kept
    assert_matches(out, ref_merge({n: c for n in SHAPES}, base), 1e-12)
    again, model2 = run(name, raw, base=base)
    assert model2 is not None and model2.report == model.report
    _, other = run(name, raw, base=base, root=bytes(range(2, 34)))
    assert other is not None and other.report["coefficients"] != model.report["coefficients"]


def test_search_merges_move_toward_the_retention_optimum() -> None:
    grams, shares, w = ref_grams(False), ref_shares(), np.array(WEIGHTS)
    for name in ("evolutionary_merge", "genetic_merge"):
        _, model = run(name, {"population_size": 16, "generations": 40}, base=False)
        assert model is not None
        c = np.array(model.report["coefficients"])
        loss = sum(shares[n] * ref_retention(grams[n], c, w)[0] for n in SHAPES)
        centre = sum(shares[n] * ref_retention(grams[n], w / w.sum(), w)[0] for n in SHAPES)
        assert loss < centre, name


# -- shared properties --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NEW)
def test_output_keeps_the_storage_dtype(name: str, dtype: torch.dtype) -> None:
    raw = {"steps": 5} if name in ("ada_merging", "dam") else {}
    if name in ("evolutionary_merge", "genetic_merge"):
        raw = {"population_size": 4, "generations": 2}
    out, _ = run(name, raw, compute=torch.float32, storage=dtype)
    for n, s in SHAPES.items():
        assert out[n].dtype == dtype and tuple(out[n].shape) == s
        assert bool(torch.isfinite(out[n]).all())


@pytest.mark.parametrize("name", NEW)
def test_non_positive_weights_are_refused(name: str) -> None:
    with pytest.raises(ResolveError, match="weight") as info:
        run(
            name,
            {"fisher_source": "data"} if name == "fisher_merge" else {},
            weights=[1.0, 0.0, 2.0],
        )
    assert "\n" not in str(info.value)


def test_integer_and_empty_tensors_pass_through_the_statistics_pass() -> None:
    strategy = get_strategy("ada_merging")
    params = resolve_params(strategy, {}, [(c, c) for c in IDS[:2]])
    rng = RandomStream(ROOT)
    ints = torch.arange(5)
    assert (
        registry.collect_statistics(
            strategy, registry.StoredInputs("i", ints, [ints + 1] * 2, IDS[:2], [1, 1], rng), params
        )
        is None
    )
    empty = torch.zeros(0, 3)
    assert (
        registry.collect_statistics(
            strategy, registry.StoredInputs("e", empty, [empty] * 2, IDS[:2], [1, 1], rng), params
        )
        is None
    )
    model = registry.finish_statistics(
        strategy, {"i": None, "e": None}, {"i": 5, "e": 0}, IDS[:2], [1, 1], params, rng, True
    )
    assert torch.equal(
        run_strategy(
            strategy, "i", ints, [ints + 1] * 2, IDS[:2], [1, 1], params, rng, model=model
        ),
        ints,
    )
    with pytest.raises(ResolveError, match="needs its whole-model statistics pass"):
        run_strategy(strategy, "i", ints, [ints + 1] * 2, IDS[:2], [1, 1], params, rng)


def test_parameter_validation_errors_are_one_line() -> None:
    contribs = [(c, c) for c in IDS]
    bad: list[tuple[str, dict[str, Any], str]] = [
        ("fisher_merge", {"fisher_source": "hessian"}, "fisher_source must be one of data"),
        ("fisher_merge", {"epsilon": -1.0}, "epsilon must be >= 0"),
        ("regression_mean", {"alpha": 1.5}, "alpha must be in \\[0, 1\\]"),
        ("ada_merging", {"granularity": "block"}, "granularity must be task or layer"),
        ("ada_merging", {"init": 2.0}, "init must be in \\[0, 1\\]"),
        ("ada_merging", {"lr": 0.0}, "lr must be > 0"),
        ("dam", {"steps": -1}, "steps must be >= 0"),
        ("dam", {"l2_weight": -1.0}, "l2_weight must be >= 0"),
        ("evolutionary_merge", {"population_size": 1}, "population_size must be >= 2"),
        ("evolutionary_merge", {"sigma": 0.0}, "sigma must be > 0"),
        ("genetic_merge", {"mutation_rate": 0.0}, "mutation_rate must be in \\(0, 1\\]"),
        ("genetic_merge", {"generations": -2}, "generations must be >= 0"),
    ]
    for name, raw, message in bad:
        with pytest.raises(ResolveError, match=f"{name}: .*{message}") as info:
            run(name, raw)
        assert "\n" not in str(info.value)
    with pytest.raises(ResolveError, match="ada_merging: parameter steps must be an integer"):
        resolve_params(get_strategy("ada_merging"), {"steps": 1.5}, contribs)


def test_registry_declares_inputs_and_passes() -> None:
    assert get_strategy("fisher_merge").extra_inputs == ("fisher",)
    assert get_strategy("regmean") is get_strategy("regression_mean")
    assert get_strategy("regression_mean").extra_inputs == ("gram",)
    for name in ("ada_merging", "dam", "evolutionary_merge", "genetic_merge"):
        assert get_strategy(name).model_pass is not None
    assert get_strategy("ada_merging").base == "required"
    assert get_strategy("dam").base == "ignored"
    assert all(get_strategy(n).uses_weights for n in NEW)
    assert get_strategy("genetic_merge").stochastic and not get_strategy("dam").stochastic


# -- objective plugins through entry points -----------------------------------------------------

PLUGIN_MODULE = '''
def pull_to_half(candidate):
    """Loss: squared distance of every coefficient to 0.5."""
    total = 0.0
    for coeffs in candidate.coefficients.values():
        total += sum((c - 0.5) ** 2 for c in coeffs)
    return total / len(candidate.coefficients)


def broken(candidate):
    raise ValueError("no eval data here")


not_callable = 3
'''


@pytest.fixture
def fitness_plugins(tmp_path: Path) -> Iterator[Path]:
    """A distribution with git_crdt_merge.fitness entry points, importable from tmp_path."""
    (tmp_path / "crdt_test_fitness.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "crdt_test_fitness-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crdt-test-fitness\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[git_crdt_merge.fitness]\n"
        "pull-to-half = crdt_test_fitness:pull_to_half\n"
        "broken = crdt_test_fitness:broken\n"
        "not-callable = crdt_test_fitness:not_callable\n"
        "missing-module = crdt_no_such_module:f\n"
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("crdt_test_fitness", None)
        importlib.invalidate_caches()


def test_plugin_objective_is_found_through_its_entry_point(fitness_plugins: Path) -> None:
    assert plugins.load_plugin(plugins.FITNESS_GROUP, "pull-to-half").__name__ == "pull_to_half"
    _, ada = run(
        "ada_merging",
        {"granularity": "task", "objective": "pull-to-half", "steps": 300, "lr": 0.01},
    )
    assert ada is not None and ada.report["objective"] == "pull-to-half"
    np.testing.assert_allclose(ada.report["coefficients"], [0.5] * 3, atol=0.02)
    for name in ("evolutionary_merge", "genetic_merge"):
        raw = {"fitness": "pull-to-half", "population_size": 10, "generations": 30}
        _, model = run(name, raw)
        assert model is not None
        data_free = run(name, {"population_size": 10, "generations": 30})[1]
        assert data_free is not None
        assert model.report["loss"] < 0.25  # from the centre (all 1) at 0.75
        assert model.report["coefficients"] != data_free.report["coefficients"]
    _, dam = run("dam", {"objective": "pull-to-half", "steps": 100, "lr": 0.02}, base=False)
    assert dam is not None and dam.report["objective"] == "pull-to-half"


def test_missing_or_broken_plugins_are_one_line_errors(fitness_plugins: Path) -> None:
    cases = [
        (
            {"objective": "nope"},
            "plugin 'nope' not found in entry point group 'git_crdt_merge.fitness'",
        ),
        ({"objective": "missing-module"}, "plugin 'missing-module' .* failed to load"),
        ({"objective": "not-callable"}, "plugin 'not-callable' .* is not callable"),
        ({"objective": "broken"}, "objective plugin 'broken' failed: no eval data here"),
    ]
    for raw, message in cases:
        with pytest.raises(ResolveError, match=message) as info:
            run("ada_merging", {**raw, "steps": 1})
        assert "\n" not in str(info.value)


# -- third-party strategies through entry points ------------------------------------------------

STRATEGY_MODULE = '''
from git_crdt_merge import numerics
from git_crdt_merge.strategies.registry import Param, Strategy


def merge_first_times(inputs, params):
    """out = scale * X_1 (a test strategy)."""
    return inputs.tensors[0] * numerics.scalar(params["scale"], inputs.tensors[0])


first_times = Strategy(
    name="first_times", aliases=(), params=(Param("scale", float, 2.0),), base="ignored",
    min_inputs=1, max_inputs=None, stochastic=False, merge=merge_first_times,
    summary="test", uses_weights=False,
)
misnamed = Strategy(
    name="something_else", aliases=(), params=(), base="ignored", min_inputs=1,
    max_inputs=None, stochastic=False, merge=merge_first_times, summary="test",
)
not_a_strategy = 3
'''


def test_an_installed_third_party_strategy_is_registered_on_first_use(tmp_path: Path) -> None:
    (tmp_path / "crdt_test_strategy.py").write_text(STRATEGY_MODULE)
    info = tmp_path / "crdt_test_strategy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crdt-test-strategy\nVersion: 1\n")
    (info / "entry_points.txt").write_text(
        "[git_crdt_merge.strategies]\n"
        "first_times = crdt_test_strategy:first_times\n"
        "misnamed = crdt_test_strategy:misnamed\n"
        "not_a_strategy = crdt_test_strategy:not_a_strategy\n"
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        strategy = get_strategy("first_times")
        params = resolve_params(strategy, {"scale": 3.0}, [("a1", "a")])
        out = run_strategy(
            strategy, "w", None, [torch.ones(2)], ["a1"], [1.0], params, RandomStream(ROOT)
        )
        assert torch.equal(out, torch.full((2,), 3.0))
        assert get_strategy("first_times") is strategy
        with pytest.raises(ResolveError, match="declares the strategy name 'something_else'"):
            get_strategy("misnamed")
        with pytest.raises(ResolveError, match="'not_a_strategy' .* is not a git_crdt_merge"):
            get_strategy("not_a_strategy")
    finally:
        registry._REGISTRY.pop("first_times", None)  # keep the built-in catalogue for others
        sys.path.remove(str(tmp_path))
        sys.modules.pop("crdt_test_strategy", None)
        importlib.invalidate_caches()
    with pytest.raises(ResolveError, match="unknown strategy 'first_times'"):
        get_strategy("first_times")
