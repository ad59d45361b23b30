"""MKL's AVX2 reproducibility branch: set by the package, and the linear algebra refuses to run
on a CPU without AVX2 (where MKL would silently give other bits) while everything else runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import choose, crdt, fresh_repo, git, make_model
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from git_crdt_merge import errors, numerics
from git_crdt_merge.cli.app import app
from git_crdt_merge.numerics import linalg

NO_AVX2 = frozenset({"fpu", "sse", "sse2", "sse4_2", "avx"})  # e.g. a Sandy Bridge or a VM


def test_importing_the_package_selects_mkls_avx2_branch_in_a_fresh_process() -> None:
    """Whatever the environment held before (here: the branch of the old releases)."""
    code = "import os, git_crdt_merge; print(os.environ['MKL_CBWR'])"
    env = dict(os.environ, MKL_CBWR="COMPATIBLE")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout == "AVX2\n"
    assert linalg.MKL_BRANCH == "AVX2" == os.environ["MKL_CBWR"]


def test_the_cpu_flags_reader_reads_this_machines_cpuinfo() -> None:
    flags = linalg._read_cpu_flags()
    if not Path("/proc/cpuinfo").exists():
        assert flags is None
        return
    assert flags is not None
    text = Path("/proc/cpuinfo").read_text()
    assert ("avx2" in flags) == (" avx2" in text)


def _kernels() -> dict[str, object]:
    a = torch.arange(16, dtype=torch.float64).reshape(4, 4) / 8 + torch.eye(4) * 4
    return {
        "matmul": lambda: numerics.matmul(a, a),
        "svd": lambda: numerics.svd(a),
        "eigh": lambda: numerics.eigh(a + a.T),
        "solve": lambda: numerics.solve(a, a),
    }


@pytest.mark.parametrize("kernel", ["matmul", "svd", "eigh", "solve"])
def test_the_linear_algebra_refuses_a_cpu_without_avx2(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linalg, "_cpu_flags", lambda: NO_AVX2)
    before = torch.get_num_threads()
    with pytest.raises(errors.CpuError) as info:
        _kernels()[kernel]()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message and "x86-64 CPU with AVX2" in message
    assert "/proc/cpuinfo lists no avx2" in message
    assert isinstance(info.value, errors.ResolveError) and info.value.exit_code == 9
    assert torch.get_num_threads() == before  # refused before touching the thread count


@pytest.mark.parametrize("flags", [None, NO_AVX2 | {"avx2"}])
def test_the_linear_algebra_runs_with_avx2_or_where_the_flags_cannot_be_read(
    flags: frozenset[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linalg, "_cpu_flags", lambda: flags)
    results = {name: kernel() for name, kernel in _kernels().items()}  # type: ignore[operator]
    assert torch.equal(results["matmul"], _kernels()["matmul"]())  # type: ignore[operator]


# -- through the CLI: a one-line error naming the strategy, exit code 9; others keep working ------

SHAPES = {"l0.weight": (8, 6), "l0.bias": (8,), "l1.weight": (4, 8)}


@pytest.fixture
def gram_repo(tmp_path: Path) -> Path:
    repo = fresh_repo(tmp_path / "repo")
    base = make_model(tmp_path / "base.safetensors", 0, SHAPES)
    crdt(repo, "set-base", str(base), "-q")
    rng = np.random.default_rng(5)
    for seed in (1, 2):
        model = make_model(tmp_path / f"c{seed}.safetensors", seed, SHAPES)
        grams = {}
        for name, value in load_file(str(model)).items():
            if value.ndim == 2:
                x = rng.standard_normal((16, value.shape[1])).astype(np.float32)
                grams[name] = x.T @ x
        save_file(grams, str(tmp_path / f"g{seed}.safetensors"))
        crdt(repo, "add-contribution", str(model), "--gram", str(tmp_path / f"g{seed}.safetensors"))
    git(repo, "commit", "-q", "-m", "two contributions")
    return repo


@pytest.mark.parametrize("strategy", ["regression_mean", "representation_surgery"])
def test_a_linear_algebra_strategy_on_a_cpu_without_avx2_is_a_one_line_error(
    gram_repo: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linalg, "_cpu_flags", lambda: NO_AVX2)
    choose(gram_repo, strategy)
    monkeypatch.chdir(gram_repo)
    result = CliRunner().invoke(app, ["resolve", "-q", "--workers", "1", "-o", "out"])
    assert result.exit_code == errors.CpuError.exit_code == 9, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"git-crdt: error: strategy {strategy}: its float64 linear algebra")
    assert "needs an x86-64 CPU with AVX2" in lines[0]
    assert not (gram_repo / "out").exists()


def test_a_strategy_without_linear_algebra_runs_on_a_cpu_without_avx2(
    gram_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linalg, "_cpu_flags", lambda: NO_AVX2)
    choose(gram_repo, "ties", density=0.5)
    monkeypatch.chdir(gram_repo)
    result = CliRunner().invoke(app, ["resolve", "-q", "--workers", "1", "-o", "out"])
    assert result.exit_code == 0, result.stderr
    assert (gram_repo / "out" / "model.safetensors").exists()
