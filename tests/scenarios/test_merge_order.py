"""Merge-order independence of every registered strategy, through real repositories.

Two repositories receive the same base and contributions (with Fisher diagonals and Gram
matrices, so the data-aware strategies have their inputs) in opposite orders; for every
strategy in the registry, ``resolve()`` must write byte-identical output folders.  Strategies
that take one or two contributions get their own pairs of repositories.  The per-family test
modules check the formulas; this one checks that no strategy depends on arrival order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import choose, crdt, fresh_repo, git, isolate_git, make_model
from safetensors.numpy import save_file

from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution.resolve import resolve
from git_crdt_merge.strategies import REQUIRED, all_strategies

SHAPES = {"layer.0.weight": (8, 16), "layer.0.bias": (8,), "head.weight": (4, 8)}


def _inputs(tmp: Path, seed: int) -> tuple[Path, list[str]]:
    """A contribution (base + small noise) with its Fisher diagonals and Gram matrices."""
    base = tmp / "models" / "base.safetensors"
    rng = np.random.default_rng(seed)
    from safetensors.numpy import load_file

    values = load_file(str(base))
    model = {
        k: v + np.float32(0.05) * rng.standard_normal(v.shape, dtype=np.float32)
        for k, v in values.items()
    }
    path = tmp / "models" / f"c{seed}.safetensors"
    save_file(model, str(path))
    fisher = {k: rng.random(v.shape, dtype=np.float32) + np.float32(0.1) for k, v in model.items()}
    save_file(fisher, str(tmp / "models" / f"f{seed}.safetensors"))
    gram = {}
    for k, v in model.items():
        if v.ndim == 2:
            x = rng.standard_normal((32, v.shape[1])).astype(np.float32)
            gram[k] = (x.T @ x).astype(np.float32)
            gram[k] = (gram[k] + gram[k].T) / np.float32(2)
    save_file(gram, str(tmp / "models" / f"g{seed}.safetensors"))
    extras = ["--fisher", str(tmp / "models" / f"f{seed}.safetensors")]
    extras += ["--gram", str(tmp / "models" / f"g{seed}.safetensors")]
    return path, extras


def _repo(tmp: Path, name: str, seeds: list[int], base_first: bool) -> Path:
    repo = fresh_repo(tmp / name)
    base = tmp / "models" / "base.safetensors"
    if base_first:
        crdt(repo, "set-base", str(base), "-q")
    for seed in seeds:
        path, extras = _inputs(tmp, seed)
        crdt(repo, "add-contribution", str(path), "-q", *extras)
        git(repo, "commit", "-q", "-m", f"add {seed}")
    if not base_first:
        crdt(repo, "set-base", str(base), "-q")
        git(repo, "commit", "-q", "-m", "base")
    return repo


def _params(strategy_params: tuple) -> dict[str, object]:
    params: dict[str, object] = {}
    for p in strategy_params:
        if p.name == "density":
            params["density"] = 0.5
        elif p.default is REQUIRED and p.type is float:
            params[p.name] = 0.5
    return params


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("order")
    with pytest.MonkeyPatch.context() as mp:  # built once, before the per-test isolation
        isolate_git(tmp_path_factory.mktemp("home"), mp)
        make_model(tmp / "models" / "base.safetensors", 0, shapes=SHAPES)
        return {
            3: (_repo(tmp, "a3", [1, 2, 3], True), _repo(tmp, "b3", [3, 2, 1], False)),
            2: (_repo(tmp, "a2", [1, 2], True), _repo(tmp, "b2", [2, 1], False)),
            1: (_repo(tmp, "a1", [1], True), _repo(tmp, "b1", [1], False)),
        }


@pytest.mark.parametrize("name", [s.name for s in all_strategies()])
def test_every_strategy_resolves_to_the_same_bytes_whatever_the_arrival_order(
    name: str, pairs: dict[int, tuple[Path, Path]]
) -> None:
    strategy = next(s for s in all_strategies() if s.name == name)
    k = 3 if strategy.max_inputs is None else min(3, strategy.max_inputs)
    k = max(k, strategy.min_inputs)
    found = []
    for repo in pairs[k]:
        choose(repo, name, **_params(strategy.params))
        outcome = resolve(Repo.open(repo))
        found.append(_digests(outcome.output))
    assert found[0] == found[1], f"strategy {name}: arrival orders disagree"
    assert "model.safetensors" in found[0] and "resolution.json" in found[0]
