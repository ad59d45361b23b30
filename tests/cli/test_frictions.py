"""The small frictions of issue 15: human sizes, the hooks' shard size as a setting, the demo's
dependency as an extra, typo suggestions, structured ``log --json``, mergekit's accepted and
ignored parameters.  Real git in temporary repositories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import choose, crdt, fresh_repo, git, make_model, set_base
from safetensors import safe_open

from git_crdt_merge import errors
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution.resolve import resolve
from git_crdt_merge.sizes import parse_size
from git_crdt_merge.strategies.registry import check_weights, get_strategy

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"a.weight": (64, 64), "b.weight": (64, 64), "c.bias": (64,)}


# -- sizes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500000000", 500_000_000),
        ("50MB", 50_000_000),
        ("50mb", 50_000_000),
        ("2GB", 2_000_000_000),
        ("2 GiB", 2 * 1024**3),
        ("64MiB", 64 * 1024**2),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1.5GB", 1_500_000_000),
        ("20g", 20 * 1024**3),  # git config's k/m/g
        ("512m", 512 * 1024**2),
        ("10B", 10),
        ("1TB", 10**12),
        ("0.5KiB", 512),
        ("1.0001KB", 1000),  # rounded down to a whole byte
    ],
)
def test_sizes_follow_the_documented_rules_exactly(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MB", "-5MB", "5XB", "1e9", "5 M B", "nan", "inf"])
def test_a_bad_size_is_a_usage_error(text: str) -> None:
    with pytest.raises(errors.UsageError, match="is not a size"):
        parse_size(text)


def add(repo: Path, seed: int, *extra: str) -> None:
    path = make_model(repo.parent / "models" / f"m{seed}.safetensors", seed, SHAPES)
    crdt(repo, "add-contribution", str(path), "-q", *extra)
    git(repo, "commit", "-q", "-m", f"add {seed}")


def test_human_sizes_on_chunk_size_options_and_the_register(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    crdt(repo, "chunk-size", "50MB")
    shown = json.loads(crdt(repo, "chunk-size", "--json").stdout)
    assert shown == {"chunk_size": 50_000_000, "default": False}
    add(repo, 1, "--chunk-size", "4KiB")
    desc = json.loads(crdt(repo, "show", "m1", "--json").stdout)
    assert desc["chunk_size"] == 4096
    bad = crdt(repo, "chunk-size", "50XB", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "KiB=1024" in bad.stderr
    big = crdt(repo, "chunk-size", "2GiB", check=False)
    assert big.returncode == 2 and "chunk size must be 1 to 1073741824 bytes" in big.stderr


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))


def test_max_shard_size_takes_a_size_and_crdt_max_shard_size_sets_the_hooks(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, 1)
    add(repo, 2)
    out = json.loads(crdt(repo, "resolve", "--json", "--max-shard-size", "20KB").stdout)
    assert len(shard_names(Path(out["output"]))) == 2  # 16384 | 16384 + 256 <= 20000
    # the setting: the hooks (and resolve without the option) write shards of that size
    git(repo, "config", "crdt.maxShardSize", "16KiB")  # 16384 | 16384 | 256
    git(repo, "config", "--unset", "crdt.autoResolve")
    add(repo, 3)  # post-commit resolves
    assert len(shard_names(repo / "merged")) == 3
    assert (repo / "merged" / "model.safetensors.index.json").is_file()
    git(repo, "config", "crdt.maxShardSize", "lots")
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9 and "crdt.maxShardSize 'lots' is not a size" in proc.stderr


def test_cache_budget_and_gc_take_human_sizes(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, 1)
    crdt(repo, "resolve", "-q")
    git(repo, "config", "crdt.cacheMaxBytes", "10GB")
    kept = json.loads(crdt(repo, "gc", "--json").stdout)
    assert len(kept["kept"]) == 1 and not kept["removed"]
    pruned = json.loads(crdt(repo, "gc", "--json", "--max-bytes", "1KB").stdout)
    assert len(pruned["kept"]) == 1  # never the last entry, whatever the budget
    bad = crdt(repo, "gc", "--max-bytes", "ten", check=False)
    assert bad.returncode == 2 and "--max-bytes 'ten' is not a size" in bad.stderr


# -- typo suggestions -----------------------------------------------------------------------
def test_a_mistyped_strategy_parameter_or_contribution_name_gets_a_suggestion(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, 1, "--name", "alice")
    proc = crdt(repo, "strategy", "tiess", check=False)
    assert proc.returncode == 9 and proc.stderr.count("\n") == 1
    assert "unknown strategy 'tiess' (did you mean 'ties'?)" in proc.stderr
    proc = crdt(repo, "strategy", "ties", "-p", "densty=0.5", check=False)
    assert "unknown parameter 'densty' (did you mean 'density'?)" in proc.stderr
    proc = crdt(repo, "remove-contribution", "alicee", check=False)
    assert proc.returncode == 8
    assert "no visible contribution named 'alicee' (did you mean 'alice'?)" in proc.stderr
    proc = crdt(repo, "strategy", "zzzzzz", check=False)
    assert "did you mean" not in proc.stderr  # nothing close: no guess
    model = make_model(tmp_path / "models" / "x.safetensors", 5, SHAPES)
    proc = crdt(repo, "add-contribution", str(model), "--extra", f"fishr={model}", check=False)
    assert proc.returncode == 4
    assert "unknown kind 'fishr' (did you mean 'fisher'?)" in proc.stderr
    proc = crdt(repo, "output-dtype", "bf61", check=False)
    assert proc.returncode == 2 and "(did you mean 'bf16'?)" in proc.stderr


# -- log --json -----------------------------------------------------------------------------
def test_log_json_gives_each_record_as_an_object(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, 1, "--name", "alice")
    entries = json.loads(crdt(repo, "log", "--json").stdout)
    manifest = (repo / ".crdt" / "manifest").read_text().splitlines()
    assert sorted(e["line"] for e in entries) == sorted(manifest)
    for e in entries:
        assert isinstance(e["record"], dict)
        assert e["record"] == json.loads(e["line"])
    adds = [e for e in entries if e["record"]["op"] == "add"]
    assert [e["record"]["name"] for e in adds] == ["alice"]
    assert adds[0]["subject"] == "add 1" and len(adds[0]["commit"]) == 40


# -- mergekit's accepted-and-ignored parameters ---------------------------------------------
def merged_tensors(repo: Path) -> dict[str, bytes]:
    out = resolve(Repo.open(repo)).output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118


def test_task_arithmetic_accepts_and_ignores_density_and_rescale(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, make_model(tmp_path / "models" / "base.safetensors", 0, SHAPES))
    add(repo, 1)
    add(repo, 2)
    choose(repo, "task_arithmetic", **{"lambda": 0.5})
    root_plain = Repo.open(repo).read_manifest().merkle_root()
    plain = merged_tensors(repo)
    crdt(repo, "strategy", "task_arithmetic", "-p", "lambda=0.5", "-p", "density=0.3")
    assert merged_tensors(repo) == plain
    choose(repo, "task_arithmetic", **{"lambda": 0.5, "density": 0.3, "rescale": True})
    assert merged_tensors(repo) == plain
    choose(repo, "task_arithmetic", **{"lambda": 0.5})  # absent again: the same root as before
    assert Repo.open(repo).read_manifest().merkle_root() == root_plain
    help_ = {p.name: p.help for p in get_strategy("task_arithmetic").params}
    assert "accepted and ignored" in help_["density"] and "accepted and ignored" in help_["rescale"]


def test_slerp_and_model_stock_ignore_weights_and_other_unweighted_methods_refuse_them() -> None:
    contributions = [("id1", "alice"), ("id2", "bob")]
    for name in ("slerp", "model_stock"):
        strategy = get_strategy(name)
        assert strategy.weights_ignored and not strategy.uses_weights
        check_weights(strategy, [1.0, 2.0], contributions)  # accepted
    with pytest.raises(errors.ResolveError, match="karcher takes no per-contribution weights"):
        check_weights(get_strategy("karcher"), [1.0, 2.0], contributions)


# -- the demo's dependency ------------------------------------------------------------------
def test_scikit_learn_is_the_demo_extra_and_not_a_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith(("scikit-learn", "scipy")) for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("scikit-learn") for d in extras["demo"])
    assert any(d.startswith("scikit-learn") for d in extras["test"])  # the demo's tests
    assert ".[demo]" in (ROOT / "scripts" / "demo.sh").read_text()


def test_the_demo_without_scikit_learn_says_in_one_line_how_to_get_it(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "sklearn"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('scikit-learn is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "git_crdt_merge.entry", "demo", "--keep", str(work)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "pip install 'git-crdt-merge[demo]'" in proc.stderr
