"""Same inputs, same output bytes under every CPU capability, thread count and number of
worker processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import choose, crdt, digests, fresh_repo, git, isolate_git, make_model
from safetensors.numpy import load_file, save_file

from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution.pool import choose_workers
from git_crdt_merge.resolution.resolve import resolve
from git_crdt_merge.strategies import REQUIRED, all_strategies, get_strategy, registry

WORKER = Path(__file__).with_name("_determinism_worker.py")


def _capabilities() -> list[str]:
    caps = ["default", "avx2"]
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return caps
    if " avx512f" in flags:
        caps.append("avx512")
    return caps


def _run(capability: str, threads: int) -> subprocess.Popen[str]:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    # what MKL would pick by itself on such a CPU; the package must override it
    env.pop("MKL_CBWR", None)
    if capability in ("avx2", "avx512"):
        env["MKL_CBWR"] = capability.upper()
    env["PYTHONPATH"] = str(WORKER.parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(threads)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_strategy_gives_identical_bytes_across_capabilities_and_threads() -> None:
    configs = [(cap, threads) for cap in _capabilities() for threads in (1, 2)]
    outputs: dict[tuple[str, int], str] = {}
    # two 1-thread workers at a time, 2-thread workers alone: keeps the 2 cores busy, no more
    for batch in ([c for c in configs if c[1] == 1], [c for c in configs if c[1] == 2]):
        width = 2 if batch and batch[0][1] == 1 else 1
        for start in range(0, len(batch), width):
            procs = {cfg: _run(*cfg) for cfg in batch[start : start + width]}
            for cfg, proc in procs.items():
                out, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, f"{cfg}: {err}"
                outputs[cfg] = out
    reference_cfg = configs[0]
    reference = outputs[reference_cfg]
    assert reference.count("\n") > 40
    for cfg, out in outputs.items():
        if out != reference:
            diff = [
                (a, b)
                for a, b in zip(reference.splitlines(), out.splitlines(), strict=False)
                if a != b
            ]
            pytest.fail(f"{cfg} differs from {reference_cfg}: {diff[:5]}")


# -- the workers axis: every strategy through real repositories, 1, 2 and 4 processes ------------

WORKER_SHAPES = {
    "emb.weight": (12, 16),
    "head.weight": (8, 16),
    "l0.bias": (24,),
    "l0.weight": (24, 16),
    "l1.bias": (16,),
    "l1.weight": (16, 24),
    "norm.weight": (16,),
}


def _contribution(models: Path, seed: int) -> list[str]:
    """A contribution (base + noise) with Fisher diagonals and Gram matrices: the
    ``add-contribution`` arguments."""
    rng = np.random.default_rng(seed)
    base = load_file(str(models / "base.safetensors"))
    noise = {k: rng.standard_normal(v.shape, np.float32) for k, v in base.items()}
    model = {k: v + np.float32(0.05) * noise[k] for k, v in base.items()}
    fisher = {k: rng.random(v.shape, np.float32) + np.float32(0.1) for k, v in model.items()}
    gram = {}
    for k, v in model.items():
        if v.ndim == 2:
            x = rng.standard_normal((32, v.shape[1])).astype(np.float32)
            gram[k] = (x.T @ x).astype(np.float32)
    paths = [models / f"{kind}{seed}.safetensors" for kind in ("c", "f", "g")]
    for path, tensors in zip(paths, (model, fisher, gram), strict=True):
        save_file(tensors, str(path))
    return [str(paths[0]), "--fisher", str(paths[1]), "--gram", str(paths[2])]


@pytest.fixture(scope="module")
def worker_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Repositories holding a base and K = 1, 2, 3 contributions."""
    tmp = tmp_path_factory.mktemp("workers")
    with pytest.MonkeyPatch.context() as mp:  # built once, before the per-test isolation
        isolate_git(tmp_path_factory.mktemp("home"), mp)
        make_model(tmp / "models" / "base.safetensors", 0, shapes=WORKER_SHAPES)
        repos = {}
        for k in (1, 2, 3):
            repo = fresh_repo(tmp / f"k{k}")
            crdt(repo, "set-base", str(tmp / "models" / "base.safetensors"), "-q")
            for seed in range(1, k + 1):
                crdt(repo, "add-contribution", *_contribution(tmp / "models", seed), "-q")
            git(repo, "commit", "-q", "-m", f"{k} contributions")
            repos[k] = repo
        return repos


def _strategy_params(strategy: registry.Strategy) -> dict[str, object]:
    params: dict[str, object] = {}
    for p in strategy.params:
        if p.name == "density":
            params["density"] = 0.5
        elif p.default is REQUIRED and p.type is float:
            params[p.name] = 0.5
    return params


def test_every_strategy_gives_identical_bytes_with_1_2_and_4_workers(
    worker_repos: dict[int, Path], tmp_path: Path
) -> None:
    """Every output file (shards, index, side file, resolution.json) has the same bytes
    whether 1, 2 or 4 worker processes resolved the tensors (three shards: the workers write
    into several files at once)."""
    failures = []
    for strategy in all_strategies():
        k = 3 if strategy.max_inputs is None else min(3, strategy.max_inputs)
        repo = worker_repos[max(k, strategy.min_inputs)]
        choose(repo, strategy.name, **_strategy_params(strategy))
        found = {}
        for workers in (1, 2, 4):
            shutil.rmtree(repo / ".git" / "crdt" / "cache", ignore_errors=True)
            out = tmp_path / f"{strategy.name}-{workers}"
            resolve(Repo.open(repo), output=out, workers=workers, max_shard=2000)
            found[workers] = digests(out)
        assert len([n for n in found[1] if n.startswith("model-")]) == 3
        if strategy.side_output is not None:  # assembled from the workers' data files
            assert strategy.side_output in found[4] and not any(n.startswith(".") for n in found[4])
        if not found[1] == found[2] == found[4]:
            failures.append(strategy.name)
    assert failures == []


def test_the_default_uses_every_core_only_for_compute_bound_strategies() -> None:
    ties, della = get_strategy("ties"), get_strategy("della")
    surgery = get_strategy("representation_surgery")
    assert not ties.compute_bound and della.compute_bound
    assert choose_workers(ties, None, 100, "cpu", cores=8) == 1
    assert choose_workers(della, None, 100, "cpu", cores=8) == 8
    assert choose_workers(della, None, 3, "cpu", cores=8) == 3  # never more than tensors
    assert choose_workers(ties, 4, 100, "cpu", cores=8) == 4  # asked for: as asked
    assert choose_workers(della, 4, 100, "cuda", cores=8) == 1
    # side tensors come back from the workers: a side file does not make it serial
    assert surgery.compute_bound and surgery.side_output is not None
    assert choose_workers(surgery, None, 100, "cpu", cores=8) == 8
    assert choose_workers(surgery, 4, 100, "cpu", cores=8) == 4


def test_the_default_number_of_workers_fits_in_memory() -> None:
    """The default is capped by the memory each worker needs; an explicit number is not (the
    resolve refuses it in one line when it cannot fit)."""
    della = get_strategy("della")
    gib = 1 << 30
    assert choose_workers(della, None, 100, "cpu", cores=8, per_worker=3 * gib) == 8  # unknown
    assert choose_workers(della, None, 100, "cpu", 8, per_worker=3 * gib, available=10 * gib) == 3
    assert choose_workers(della, None, 100, "cpu", 8, per_worker=3 * gib, available=gib) == 1
    assert choose_workers(della, 4, 100, "cpu", 8, per_worker=3 * gib, available=gib) == 4


def test_a_workers_memory_counts_its_slots_extras_and_float64_scratch() -> None:
    from types import SimpleNamespace

    from git_crdt_merge.resolution.plan import TensorSpec
    from git_crdt_merge.resolution.resolve import memory_needed, worker_memory

    specs = [TensorSpec("w", "F32", [300, 200]), TensorSpec("b", "F32", [300])]
    for name in ("linear", "regression_mean", "representation_surgery", "star"):
        strategy = get_strategy(name)
        plan = SimpleNamespace(
            descriptors=[object()] * 3,
            specs=specs,
            strategy=strategy,
            largest_input=lambda: 300 * 200 * 4,
            largest_extra=lambda: 200 * 200 * 4,
        )
        slots = memory_needed(300 * 200 * 4, 3 + 1)
        extras = 3 * len(strategy.extra_inputs) * 200 * 200 * 4
        scratch = strategy.scratch_bytes(300 * 200, 300, 3)
        assert worker_memory(plan, 0) == slots + extras + scratch  # type: ignore[arg-type]
        # the linear-algebra strategies declare float64 working matrices; linear has none
        assert (scratch > 0) == (name != "linear")
    surgery = get_strategy("representation_surgery")
    assert surgery.scratch_bytes(10, 4, 2) == 8 * ((3 + 2) * 10 + 5 * 16)


def test_crdt_workers_is_read_and_a_bad_value_is_a_one_line_error(
    worker_repos: dict[int, Path],
) -> None:
    repo = worker_repos[2]
    choose(repo, "della", density=0.5)
    git(repo, "config", "crdt.workers", "many")
    shutil.rmtree(repo / ".git" / "crdt" / "cache", ignore_errors=True)
    proc = crdt(repo, "resolve", "-o", "out-bad", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "crdt.workers" in proc.stderr
    git(repo, "config", "crdt.workers", "2")
    crdt(repo, "resolve", "-q", "-o", "out-two")
    assert (repo / "out-two" / "model.safetensors").exists()
    git(repo, "config", "--unset", "crdt.workers")
