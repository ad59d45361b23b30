"""representation_surgery: task arithmetic plus per-task linear surgery modules.

Against an independent float64 numpy reference written from the formula in docs/strategies.md
(W_m by task arithmetic, S_t = (W_t G_t W_m^T + lambda I)(W_m G_t W_m^T + lambda I)^-1, the
module M_t = I - S_t), and through the real CLI in temporary git repositories: the output
folder holds the model, surgery.safetensors and resolution.json, byte-identical in a clone and
in a repository that added the same contributions in another order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import crdt, git, make_model, new_repo
from safetensors import safe_open
from safetensors.torch import save_file

from git_crdt_merge.errors import ResolveError
from git_crdt_merge.faults import ENV
from git_crdt_merge.numerics import RandomStream
from git_crdt_merge.strategies import get_strategy, resolve_params, run_strategy

ROOT = bytes(range(2, 34))
IDS = ["a1", "b2", "c3"]
SHAPES = {"l0.weight": (6, 10), "l0.bias": (6,), "l1.weight": (4, 6)}
STRATEGY = "representation_surgery"


def _grid(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Values on a 1/64 grid (exact in float32)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-40, 41, size=shape).astype(np.float64) / 64 * scale


BASE = {n: _grid(i, s) for i, (n, s) in enumerate(SHAPES.items())}
XS = [
    {n: BASE[n] + _grid(10 * k + i + 1, s, 0.25) for i, (n, s) in enumerate(SHAPES.items())}
    for k in range(3)
]
# each task's layer inputs: 30 rows of data, so every Gram matrix has full rank
DATA = [
    {
        n: _grid(300 + 10 * k + i, (30, s[1]))
        for i, (n, s) in enumerate(SHAPES.items())
        if len(s) == 2
    }
    for k in range(3)
]
GRAM = [{n: x.T @ x for n, x in d.items()} for d in DATA]


def _t(a: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype)


def run(
    raw: dict[str, Any] | None = None,
    *,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    grams: Sequence[dict[str, np.ndarray]] = GRAM,
    compute: torch.dtype = torch.float64,
    storage: torch.dtype = torch.float64,
    side: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every tensor of the small model: (merged tensors, side tensors)."""
    strategy = get_strategy(STRATEGY)
    params = resolve_params(strategy, raw or {}, [(c, c.upper()) for c in IDS])
    merged: dict[str, torch.Tensor] = {}
    modules: dict[str, torch.Tensor] | None = {} if side else None
    for n in SHAPES:
        extras = {"gram": [None if n not in g else _t(g[n], storage) for g in grams]}
        merged[n] = run_strategy(
            strategy,
            n,
            _t(BASE[n], storage),
            [_t(x[n], storage) for x in XS],
            IDS,
            list(weights),
            params,
            RandomStream(ROOT),
            compute,
            extras=extras,
            side=modules,
        )
    return merged, modules or {}


def ref_merged(weights: Sequence[float], lam: float = 1.0, normalize: bool = False) -> dict:
    total = sum(weights) if normalize else 1.0
    return {
        n: BASE[n]
        + lam * sum(w * (x[n] - BASE[n]) for w, x in zip(weights, XS, strict=True)) / total
        for n in SHAPES
    }


def ref_module(wm: np.ndarray, wt: np.ndarray, g: np.ndarray, ridge: float) -> np.ndarray:
    """M = I - S, S = (W_t G W_m^T + lambda I)(W_m G W_m^T + lambda I)^-1 (the brief's form)."""
    out = wm.shape[0]
    p = wm @ g @ wm.T
    lam = ridge * np.trace(p) / out
    eye = np.eye(out)
    s = (wt @ g @ wm.T + lam * eye) @ np.linalg.inv(p + lam * eye)
    return eye - s


def representation_error(s: np.ndarray, wm: np.ndarray, wt: np.ndarray, x: np.ndarray) -> float:
    """sum over the rows x of ||S W_m x - W_t x||^2."""
    return float(np.sum((x @ wm.T @ s.T - x @ wt.T) ** 2))


# -- the formula --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "weights"),
    [
        ({}, (1.0, 1.0, 1.0)),
        ({"lambda": 0.4, "ridge": 0.05}, (1.0, 0.5, 2.0)),
        ({"normalize": True, "ridge": 0.0}, (1.0, 0.5, 2.0)),
    ],
)
def test_merged_weights_and_every_module_match_the_float64_reference(
    raw: dict[str, Any], weights: tuple[float, ...]
) -> None:
    merged, modules = run(raw, weights=weights)
    expected = ref_merged(weights, raw.get("lambda", 1.0), raw.get("normalize", False))
    for n in SHAPES:
        np.testing.assert_allclose(merged[n].numpy(), expected[n], rtol=1e-12, atol=1e-12)
    want = {f"{cid}/{n}" for cid in IDS for n in SHAPES if len(SHAPES[n]) == 2}
    assert set(modules) == want
    for k, cid in enumerate(IDS):
        for n in GRAM[k]:
            m = ref_module(expected[n], XS[k][n], GRAM[k][n], raw.get("ridge", 1e-3))
            got = modules[f"{cid}/{n}"]
            assert got.dtype == torch.float64 and got.shape == (SHAPES[n][0],) * 2
            np.testing.assert_allclose(got.numpy(), m, rtol=1e-8, atol=1e-9, err_msg=n)


def test_weights_change_the_merged_model_and_the_modules() -> None:
    plain, plain_modules = run(weights=(1.0, 1.0, 1.0))
    weighted, weighted_modules = run(weights=(1.0, 0.5, 2.0))
    for n in SHAPES:
        assert not torch.equal(plain[n], weighted[n])
    for key in plain_modules:
        assert not torch.equal(plain_modules[key], weighted_modules[key])


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.1])
def test_surgery_reduces_the_representation_error_on_the_task_data(ridge: float) -> None:
    merged, modules = run({"ridge": ridge, "lambda": 0.6})
    for k, cid in enumerate(IDS):
        for n, x in DATA[k].items():
            wm, wt = merged[n].numpy(), XS[k][n]
            s = np.eye(wm.shape[0]) - modules[f"{cid}/{n}"].numpy()
            before = representation_error(np.eye(wm.shape[0]), wm, wt, x)
            after = representation_error(s, wm, wt, x)
            assert after < 0.9 * before, (cid, n, before, after)
            if ridge == 0.0:  # the least-squares optimum over all linear maps S
                st, *_ = np.linalg.lstsq(x @ wm.T, x @ wt.T, rcond=None)
                best = representation_error(st.T, wm, wt, x)
                assert after == pytest.approx(best, rel=1e-9)


def _objective(m: np.ndarray, wm: np.ndarray, wt: np.ndarray, g: np.ndarray, ridge: float) -> float:
    """sum_x ||(I - M) W_m x - W_t x||^2 + lambda ||M||_F^2, from the Gram matrix."""
    r = (np.eye(wm.shape[0]) - m) @ wm - wt
    lam = ridge * np.trace(wm @ g @ wm.T) / wm.shape[0]
    return float(np.trace(r @ g @ r.T) + lam * np.sum(m * m))


def test_rank_r_modules_are_the_reduced_rank_optimum_as_two_factors() -> None:
    ridge, rank = 0.01, 2
    merged, modules = run({"ridge": ridge, "rank": rank})
    full, full_modules = run({"ridge": ridge})
    assert all(torch.equal(merged[n], full[n]) for n in SHAPES)
    assert set(modules) == {f"{k}.{f}" for k in full_modules for f in ("up", "down")}
    for k, cid in enumerate(IDS):
        for n, g in GRAM[k].items():
            up, down = modules[f"{cid}/{n}.up"].numpy(), modules[f"{cid}/{n}.down"].numpy()
            out = SHAPES[n][0]
            assert up.shape == (out, rank) and down.shape == (rank, out)
            np.testing.assert_allclose(up.T @ up, np.eye(rank), atol=1e-12)
            wm, wt = merged[n].numpy(), XS[k][n]
            m = ref_module(wm, wt, g, ridge)
            p = wm @ g @ wm.T
            lam = ridge * np.trace(p) / out
            values, vectors = np.linalg.eigh(m @ (p + lam * np.eye(out)) @ m.T)
            u = vectors[:, ::-1][:, :rank]
            np.testing.assert_allclose(up @ down, u @ u.T @ m, rtol=1e-7, atol=1e-9)
            # no rank-r module does better; the truncated SVD of M, for one, does worse
            svd_u, svd_s, svd_vh = np.linalg.svd(m)
            truncated = svd_u[:, :rank] @ np.diag(svd_s[:rank]) @ svd_vh[:rank]
            best = _objective(up @ down, wm, wt, g, ridge)
            assert best <= _objective(truncated, wm, wt, g, ridge) * (1 + 1e-12)
            assert best < _objective(np.zeros_like(m), wm, wt, g, ridge)
    _, wide = run({"ridge": ridge, "rank": 100})  # rank >= out: the full module
    for key, m in full_modules.items():
        product = wide[f"{key}.up"] @ wide[f"{key}.down"]
        np.testing.assert_allclose(product.numpy(), m.numpy(), rtol=1e-8, atol=1e-10)


def test_merged_model_is_bit_identical_to_task_arithmetic_in_every_storage_dtype() -> None:
    ta = get_strategy("task_arithmetic")
    for storage in (torch.float32, torch.float16, torch.bfloat16):
        merged, modules = run(
            {"lambda": 0.5}, weights=(1.0, 0.5, 2.0), compute=torch.float32, storage=storage
        )
        for n in SHAPES:
            expected = run_strategy(
                ta,
                n,
                _t(BASE[n], storage),
                [_t(x[n], storage) for x in XS],
                IDS,
                [1.0, 0.5, 2.0],
                resolve_params(ta, {"lambda": 0.5}, [(c, c) for c in IDS]),
                RandomStream(ROOT),
                torch.float32,
            )
            assert merged[n].dtype == storage and torch.equal(merged[n], expected), n
        assert modules and all(m.dtype == storage for m in modules.values())
        assert all(bool(torch.isfinite(m).all()) for m in modules.values())


def test_without_a_side_dict_the_merged_weights_are_the_same() -> None:
    with_side, _ = run({"ridge": 0.01})
    without, modules = run({"ridge": 0.01}, side=False)
    assert modules == {}
    for n in SHAPES:
        assert torch.equal(with_side[n], without[n])


def test_a_task_without_the_gram_of_a_layer_gets_no_module_there() -> None:
    grams = [GRAM[0], {"l0.weight": GRAM[1]["l0.weight"]}, {}]
    merged, modules = run(grams=grams)
    assert set(modules) == {"a1/l0.weight", "a1/l1.weight", "b2/l0.weight"}
    full, _ = run()
    for n in SHAPES:
        assert torch.equal(merged[n], full[n])


def test_parameters_and_singular_systems_are_one_line_errors() -> None:
    with pytest.raises(ResolveError, match="ridge must be >= 0"):
        run({"ridge": -1.0})
    with pytest.raises(ResolveError, match="rank must be >= 0"):
        run({"rank": -1})
    with pytest.raises(ResolveError, match="rank must be an integer"):
        run({"rank": 1.5})
    with pytest.raises(ResolveError, match="unknown parameter 'alpha'"):
        run({"alpha": 0.5})
    with pytest.raises(ResolveError, match="must be a number"):
        run({"ridge": "big"})
    # two samples for six outputs: W_m G W_m^T has rank 2, so ridge 0 cannot be solved
    thin = [{n: x[:2].T @ x[:2] for n, x in d.items()} for d in DATA]
    with pytest.raises(ResolveError, match=r"tensor 'l0.weight', contribution a1: .*ridge > 0"):
        run({"ridge": 0.0}, grams=thin)
    _, modules = run({"ridge": 1e-3}, grams=thin)  # regularised: solvable
    assert all(bool(torch.isfinite(m).all()) for m in modules.values())


def test_a_task_whose_data_never_reaches_the_layer_gets_a_zero_module() -> None:
    zero = [{**GRAM[0], "l1.weight": np.zeros((6, 6))}, GRAM[1], GRAM[2]]
    _, modules = run(grams=zero)
    assert not bool(modules["a1/l1.weight"].any())


def test_the_strategy_is_declared_with_its_side_file_and_gram_input(tmp_path: Path) -> None:
    strategy = get_strategy(STRATEGY)
    assert strategy.extra_inputs == ("gram",) and strategy.uses_weights
    assert strategy.side_output == "surgery.safetensors" and strategy.base == "required"
    assert "Representation Surgery" in strategy.formula and "ICML 2024" in strategy.formula
    rows = {r["name"]: r for r in json.loads(crdt(tmp_path, "strategies", "--json").stdout)}
    assert rows[STRATEGY]["side_output"] == "surgery.safetensors"
    assert rows[STRATEGY]["extra_inputs"] == ["gram"]
    assert rows["task_arithmetic"]["side_output"] is None


# -- through the CLI ----------------------------------------------------------------------------


def _gram_file(tmp: Path, seed: int, skip: Sequence[str] = ()) -> Path:
    rng = np.random.default_rng(500 + seed)
    tensors = {}
    for n, s in SHAPES.items():
        if len(s) == 2 and n not in skip:
            x = rng.standard_normal((25, s[1]))
            tensors[n] = torch.from_numpy(x.T @ x).to(torch.float32)
    path = tmp / "extras" / f"gram{seed}-{len(skip)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _repo(path: Path) -> Path:
    repo = new_repo(path)
    git(repo, "config", "crdt.autoResolve", "false")
    return repo


def _add(repo: Path, *args: str) -> str:
    return str(json.loads(crdt(repo, "add-contribution", "--json", "-q", *args).stdout)["id"])


def _read(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}  # noqa: SIM118


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resolve_writes_model_and_surgery_file_identically_in_every_order_and_clone(
    tmp_path: Path,
) -> None:
    base = make_model(tmp_path / "models" / "base.safetensors", 0, shapes=SHAPES)
    items = [
        (
            make_model(tmp_path / "models" / f"m{s}.safetensors", s, shapes=SHAPES),
            _gram_file(tmp_path, s, skip=("l1.weight",) if s == 3 else ()),
            w,
        )
        for s, w in ((1, "1"), (2, "0.5"), (3, "2"))
    ]
    outputs = []
    ids: dict[int, str] = {}
    for label, order in (("x", [0, 1, 2]), ("y", [2, 0, 1])):
        repo = _repo(tmp_path / label)
        crdt(repo, "set-base", str(base), "-q")
        for i in order:
            m, g, w = items[i]
            ids[i] = _add(repo, str(m), "--gram", str(g), "--weight", w, "-n", f"c{i}")
            git(repo, "commit", "-q", "-m", f"c{i}")
        crdt(repo, "strategy", STRATEGY, "-p", "lambda=0.5", "-p", "ridge=0.01")
        git(repo, "commit", "-q", "-am", "strategy")
        out = Path(json.loads(crdt(repo, "resolve", "--json", "-q").stdout)["output"])
        outputs.append(out)
    x_files, y_files = _files(outputs[0]), _files(outputs[1])
    assert {"model.safetensors", "surgery.safetensors", "resolution.json"} <= set(x_files)
    assert not [n for n in x_files if n.startswith(".")]  # the side data file is gone
    assert x_files == y_files

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(tmp_path / "x"), str(clone))
    crdt(clone, "install", "-q")
    out = Path(json.loads(crdt(clone, "resolve", "--json", "-q").stdout)["output"])
    assert _files(out) == x_files

    record = json.loads(x_files["resolution.json"])
    assert record["strategy"] == STRATEGY
    assert record["side_output"]["file"] == "surgery.safetensors"
    assert record["side_output"]["tensors"] == 5  # 3 tasks x 2 layers, one Gram left out

    # the model keeps the base's tensor names and dtype; the modules match the reference
    model = _read(outputs[0] / "model.safetensors")
    assert set(model) == set(SHAPES)
    with safe_open(str(outputs[0] / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # noqa: SIM118
    modules = _read(outputs[0] / "surgery.safetensors")
    want = {f"{ids[i]}/{n}" for i in range(3) for n in ("l0.weight", "l1.weight")}
    assert set(modules) == want - {f"{ids[2]}/l1.weight"}
    xs = [_read(m) for m, _, _ in items]
    b = _read(base)
    weights = [1.0, 0.5, 2.0]
    for n in SHAPES:
        expected = b[n] + 0.5 * sum(w * (x[n] - b[n]) for w, x in zip(weights, xs, strict=True))
        np.testing.assert_allclose(model[n], expected, rtol=1e-5, atol=1e-5)
    for i, (_, g, _) in enumerate(items):
        grams = _read(g)
        for n, gram in grams.items():
            ref = ref_module(model[n], xs[i][n], gram, 0.01)
            np.testing.assert_allclose(modules[f"{ids[i]}/{n}"], ref, rtol=1e-3, atol=1e-4)

    # a cache hit publishes the side file too
    for p in outputs[0].iterdir():
        p.unlink()
    outputs[0].rmdir()
    hit = json.loads(crdt(tmp_path / "x", "resolve", "--json", "-q").stdout)
    assert hit["cache_hit"] and _files(outputs[0]) == x_files


def test_contributions_without_gram_are_exit_code_9_in_one_line(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    crdt(repo, "set-base", str(make_model(tmp_path / "b.safetensors", 0, shapes=SHAPES)), "-q")
    _add(repo, str(make_model(tmp_path / "m1.safetensors", 1, shapes=SHAPES)), "-n", "bare")
    crdt(repo, "strategy", STRATEGY)
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9
    message = proc.stderr.strip()
    assert "\n" not in message
    assert f"strategy {STRATEGY} needs a gram extra input" in message and "'bare'" in message
    assert "add-contribution PATH --gram FILE.safetensors" in message
    assert not (repo / "merged").exists()


def test_workers_compute_the_modules_and_a_killed_worker_leaves_nothing(tmp_path: Path) -> None:
    """With 2 workers the side file is assembled from the workers' data files: the output
    folder has the same bytes as one process's, and holds no data file; a worker killed
    mid-resolve is a one-line error that leaves no side data in the cache."""
    repo = _repo(tmp_path / "repo")
    crdt(repo, "set-base", str(make_model(tmp_path / "b.safetensors", 0, shapes=SHAPES)), "-q")
    for s in (1, 2, 3):
        model = make_model(tmp_path / f"m{s}.safetensors", s, shapes=SHAPES)
        _add(repo, str(model), "--gram", str(_gram_file(tmp_path, s)), "-n", f"c{s}")
    crdt(repo, "strategy", STRATEGY, "-p", "ridge=0.01")
    git(repo, "commit", "-q", "-am", "three tasks")
    cache = repo / ".git" / "crdt" / "cache"

    proc = subprocess.run(
        ["git", "crdt", "resolve", "--workers", "2", "-o", str(tmp_path / "dead")],
        cwd=repo,
        env={**os.environ, ENV: "resolve:worker-tensor"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 9 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "dead").exists()
    leftovers = [p for p in cache.rglob("*") if "surgery" in p.name] if cache.exists() else []
    assert leftovers == []

    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        shutil.rmtree(cache, ignore_errors=True)  # resolve again, not a cache hit
        crdt(repo, "resolve", "-q", "--workers", workers, "-o", str(out))
        outputs[workers] = _files(out)
    assert outputs["1"] == outputs["2"]
    assert "surgery.safetensors" in outputs["2"]
    assert not [n for n in outputs["2"] if n.startswith(".")]
    assert json.loads(outputs["2"]["resolution.json"])["side_output"]["tensors"] == 6
