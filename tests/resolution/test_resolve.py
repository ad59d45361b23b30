"""Layer 2 end to end: the merged model that ``git crdt resolve`` writes.

The promise of DESIGN.md checked here with real git: clones that hold the same set hold
byte-identical output folders (every file, resolution.json included) whatever the merge order;
the output is Hugging Face style safetensors whose tensors match an independent computation;
results are cached by Merkle root and published as hard links; resolution streams, so its peak
memory does not grow with the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    choose,
    crdt,
    digests,
    fresh_repo,
    git,
    make_model,
    new_repo,
    origin_copy,
    set_base,
)
from safetensors import safe_open

from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution.resolve import resolve

SHAPES = {"layer.0.weight": (64, 64), "layer.0.bias": (64,), "head.weight": (16, 64)}
STRATEGIES = {
    "linear": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
}


# -- helpers ------------------------------------------------------------------------------------
def model(tmp: Path, seed: int, **kw: object) -> Path:
    kw.setdefault("shapes", SHAPES)
    return make_model(tmp / "models" / f"m{seed}.safetensors", seed, **kw)  # type: ignore[arg-type]


@pytest.fixture
def origin(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of a bare origin whose one commit holds a base set by ``set-base``."""

    def with_base(seed: Path, scratch: Path) -> None:
        git(seed, "config", "crdt.autoResolve", "false")
        crdt(seed, "set-base", str(model(scratch, 0)), "-q")
        git(seed, "commit", "-q", "-m", "base")

    return origin_copy("base", tmp_path, tmp_path_factory, with_base)


def clone(origin: Path, dest: Path) -> Path:
    git(dest.parent, "clone", "-q", str(origin), str(dest))
    crdt(dest, "install", "-q")
    git(dest, "config", "crdt.autoResolve", "false")
    return dest


def add(repo: Path, path: Path, *extra: str, commit: bool = True) -> str:
    cid = json.loads(crdt(repo, "add-contribution", str(path), "--json", *extra).stdout)["id"]
    if commit:
        git(repo, "commit", "-q", "-m", f"add {path.stem}")
    return cid


def status(repo: Path) -> dict:
    return json.loads(crdt(repo, "status", "--json").stdout)


def resolve_cli(repo: Path, *args: str) -> dict:
    """``git crdt resolve --json ARGS`` as a user runs it (about a second: it imports torch)."""
    return json.loads(crdt(repo, "resolve", "--json", *args).stdout)


def resolve_here(repo: Path, **kw: object) -> Path:
    """The same resolution in this process (torch is already imported); returns the output."""
    outcome = resolve(Repo.open(repo), **kw)  # type: ignore[arg-type]
    assert not outcome.empty
    return outcome.output


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def arrays(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def cache_dir(repo: Path, key: str) -> Path:
    return repo / ".git" / "crdt" / "cache" / key


def inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_dev


def leftovers(repo: Path) -> list[str]:
    """Temporary or half-swapped folders that a finished resolve must not leave behind."""
    found = [p.name for p in repo.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    cache = repo / ".git" / "crdt" / "cache"
    if cache.exists():
        found += [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    return found


# -- 1. one set, one model, whatever the merge order ---------------------------------------------
def test_same_set_through_different_merge_orders_gives_identical_files(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    c = clone(origin, tmp_path / "c")
    for repo, other in ((a, b), (b, a), (a, c), (b, c), (c, a)):
        git(repo, "remote", "add", other.name, str(other))
    ids = {add(a, model(tmp_path, 1)), add(b, model(tmp_path, 2)), add(c, model(tmp_path, 3))}
    c_commit = git(c, "rev-parse", "HEAD").stdout.strip()
    # a and b merge each other (both directions, two different merge commits)
    git(a, "fetch", "-q", "b")
    git(b, "fetch", "-q", "a")
    git(a, "merge", "-q", "--no-edit", "b/main")
    git(b, "merge", "-q", "--no-edit", "a/main")
    # c rebases its commit onto a's merge; a cherry-picks c's original commit; b merges c
    git(a, "fetch", "-q", "c")
    git(c, "fetch", "-q", "a")
    git(c, "rebase", "-q", "a/main")
    git(a, "cherry-pick", "-x", c_commit)  # -x: not the same commit as c's rebase
    git(b, "fetch", "-q", "c")
    git(b, "merge", "-q", "--no-edit", "c/main")
    # d is a fresh clone of what a pushed
    git(a, "push", "-q", "origin", "main")
    d = clone(origin, tmp_path / "d")
    clones = (a, b, c, d)
    heads = {git(r, "rev-parse", "HEAD").stdout for r in (a, b, c)}
    assert len(heads) == 3  # three different histories, and a fresh clone ...
    base = status(a)["base"]
    assert base is not None
    for r in clones:  # ... holding one set
        s = status(r)
        assert sorted(x["id"] for x in s["contributions"]) == sorted(ids)
        assert s["base"] == base
    results: dict[str, dict[str, str]] = {}
    for name, params in STRATEGIES.items():
        per_clone = []
        for r in clones:
            choose(r, name, **params)
            outcome = resolve(Repo.open(r))
            assert not outcome.cache_hit
            per_clone.append(digests(outcome.output))
        assert sorted(per_clone[0]) == ["README.md", "model.safetensors", "resolution.json"]
        for found in per_clone[1:]:
            assert found == per_clone[0], f"strategy {name}: clones disagree"
        results[name] = per_clone[0]
    # the three strategies really computed three different models
    models = {d["model.safetensors"] for d in results.values()}
    assert len(models) == 3


# -- 2. the output format -------------------------------------------------------------------------
def test_two_unit_weight_contributions_give_the_exact_float32_average(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    m1, m2 = model(tmp_path, 1), model(tmp_path, 2)
    add(repo, m1)
    add(repo, m2)
    merged = resolve_here(repo)
    assert merged == repo / "merged"
    assert sorted(p.name for p in merged.iterdir()) == [
        "README.md",
        "model.safetensors",
        "resolution.json",
    ]
    got = arrays(merged / "model.safetensors")
    a, b = arrays(m1), arrays(m2)
    assert sorted(got) == sorted(SHAPES)
    for name in SHAPES:
        want = (a[name] + b[name]) / np.float32(2)
        assert got[name].dtype == np.float32
        assert got[name].tobytes() == want.tobytes(), name


def test_weighted_linear_matches_a_float64_reference(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    weights = [1.0, 2.0, 3.5]
    paths = [model(tmp_path, s) for s in (1, 2, 3)]
    for w, p in zip(weights, paths, strict=True):
        add(repo, p, "--weight", str(w))
    merged = resolve_here(repo)
    got = arrays(merged / "model.safetensors")
    inputs = [arrays(p) for p in paths]
    for name in SHAPES:
        terms = [w * x[name].astype(np.float64) for w, x in zip(weights, inputs, strict=True)]
        ref = np.sum(terms, axis=0) / sum(weights)
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-6)
    record = json.loads((merged / "resolution.json").read_text())
    by_id = {c["id"]: c["weight"] for c in record["contributions"]}
    assert sorted(by_id.values()) == weights


def test_a_strategy_without_weights_refuses_a_weighted_contribution(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, model(tmp_path, 1), "--weight", "2")
    add(repo, model(tmp_path, 2))
    choose(repo, "karcher")
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "karcher takes no per-contribution weights" in proc.stderr
    assert not (repo / "merged").exists()


@pytest.mark.parametrize(
    ("strategy", "params", "k"), [("slerp", {"t": 0.3}, 1), ("model_stock", {}, 2)]
)
def test_slerp_and_model_stock_accept_and_ignore_weights_as_mergekit_does(
    tmp_path: Path, strategy: str, params: dict, k: int
) -> None:
    outputs = []
    for weight in ("1", "2.5"):
        repo = fresh_repo(tmp_path / f"repo{weight}")
        set_base(repo, model(tmp_path, 0))
        for seed in range(1, k + 1):
            add(repo, model(tmp_path, seed), "--weight", weight)
        choose(repo, strategy, **params)
        merged = tensors(resolve_here(repo) / "model.safetensors")
        outputs.append({n: t.numpy().tobytes() for n, t in merged.items()})
    assert outputs[0] == outputs[1]  # the same tensor bytes (the headers name other roots)


def test_small_max_shard_size_gives_shards_and_an_index_covering_every_tensor_once(
    tmp_path: Path,
) -> None:
    shapes = {"a.weight": (64, 64), "b.weight": (64, 64), "c.weight": (32, 64), "d.bias": (64,)}
    repo = fresh_repo(tmp_path / "repo")
    m1, m2 = model(tmp_path, 1, shapes=shapes), model(tmp_path, 2, shapes=shapes)
    add(repo, m1)
    add(repo, m2)
    merged = Path(resolve_cli(repo, "--max-shard-size", "20000")["output"])
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(p.name for p in merged.iterdir()) == sorted(
        ["README.md", *shards, "model.safetensors.index.json", "resolution.json"]
    )
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(weight_map) == sorted(shapes)
    seen: list[str] = []
    got: dict[str, np.ndarray] = {}
    for shard in shards:
        with safe_open(str(merged / shard), framework="np") as f:
            names = list(f.keys())
            assert names, f"{shard} is empty"
            assert f.metadata()["merkle_root"] == status(repo)["merkle_root"]
            for n in names:
                assert weight_map[n] == shard
                got[n] = f.get_tensor(n)
        seen += names
    assert sorted(seen) == sorted(shapes)  # every tensor exactly once
    assert set(weight_map.values()) == set(shards)
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    assert index["metadata"]["total_size"] == total
    assert sum((merged / s).stat().st_size for s in shards) > total  # data plus headers
    a, b = arrays(m1), arrays(m2)
    for n in shapes:
        assert got[n].tobytes() == ((a[n] + b[n]) / np.float32(2)).tobytes()


def test_max_shard_size_is_honoured_after_the_set_was_resolved_unsharded(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, model(tmp_path, 1))
    add(repo, model(tmp_path, 2))
    resolve_here(repo)
    out = tmp_path / "sharded"
    resolve_cli(repo, "--output", str(out), "--max-shard-size", "5000")
    assert (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()


def test_resolution_json_records_root_strategy_params_base_and_contributions(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    base = set_base(repo, model(tmp_path, 0))
    ids = [add(repo, model(tmp_path, s), "--weight", w) for s, w in ((1, "1.5"), (2, "0.5"))]
    choose(repo, "ties", density=0.5)
    git(repo, "commit", "-q", "-am", "strategy")
    merged = resolve_here(repo)
    record = json.loads((merged / "resolution.json").read_text())
    st = status(repo)
    assert record["merkle_root"] == st["merkle_root"]
    assert record["cache_key"] == st["merkle_root"]
    assert record["strategy"] == "ties"
    assert record["params"] == {"density": 0.5}
    assert record["base"] == base == st["base"]
    assert record["compute_dtype"] == "float32"
    names = {cid: json.loads(crdt(repo, "show", cid, "--json").stdout)["name"] for cid in ids}
    assert record["contributions"] == [
        {"id": cid, "kind": "full", "name": names[cid], "weight": w}
        for cid, w in sorted(zip(ids, (1.5, 0.5), strict=True))  # canonical order: by id
    ]
    with safe_open(str(merged / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["merkle_root"] == st["merkle_root"]


def hf_dir(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    make_model(path / "model.safetensors", seed, shapes=SHAPES)
    (path / "config.json").write_text('{"architectures": ["Toy"], "hidden_size": 64}\n')
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    return path


def test_hf_base_directory_config_and_tokenizer_are_copied_to_the_output(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    base = hf_dir(tmp_path / "base-hf", 0)
    set_base(repo, base)
    add(repo, model(tmp_path, 1))
    add(repo, model(tmp_path, 2))
    choose(repo, "ties", density=0.5)
    merged = resolve_here(repo)
    assert sorted(p.name for p in merged.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "resolution.json",
        "tokenizer.json",
    ]
    for name in ("config.json", "tokenizer.json"):
        assert (merged / name).read_bytes() == (base / name).read_bytes()


def test_hf_base_files_are_copied_even_when_the_strategy_ignores_the_base(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    base = hf_dir(tmp_path / "base-hf", 0)
    set_base(repo, base)
    add(repo, model(tmp_path, 1))
    add(repo, model(tmp_path, 2))
    merged = resolve_here(repo)  # default strategy: linear
    for name in ("config.json", "tokenizer.json"):
        assert (merged / name).read_bytes() == (base / name).read_bytes()


@pytest.mark.parametrize(("dtype", "tag"), [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_contributions_give_output_of_the_same_dtype(
    tmp_path: Path, dtype: str, tag: str
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    m1, m2 = model(tmp_path, 1, dtype=dtype), model(tmp_path, 2, dtype=dtype)
    add(repo, m1)
    add(repo, m2)
    merged = resolve_here(repo)
    out_file = merged / "model.safetensors"
    header_len = int.from_bytes(out_file.read_bytes()[:8], "little")
    header = json.loads(out_file.read_bytes()[8 : 8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {tag}
    got, a, b = tensors(out_file), tensors(m1), tensors(m2)
    for name in SHAPES:
        assert got[name].dtype == getattr(torch, dtype)
        # exact in float32, then one rounding back to the storage dtype
        want = ((a[name].float() + b[name].float()) / 2).to(getattr(torch, dtype))
        assert torch.equal(got[name], want), name


def test_a_strategy_revision_names_its_own_cache_entry(tmp_path: Path) -> None:
    """star's revision 2 (Gram / subspace-iteration algorithm) resolves under ``<root>.r2``: an
    entry the previous algorithm left under the bare root (a clone's older cache) is not
    served, resolution.json records the revision, and gc removes the old entry."""
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, model(tmp_path, 0))
    for s in (1, 2):
        add(repo, model(tmp_path, s))
    choose(repo, "star")
    git(repo, "commit", "-q", "-am", "strategy")
    root = status(repo)["merkle_root"]
    first = resolve_here(repo)
    fresh = digests(first)
    record = json.loads((first / "resolution.json").read_text())
    assert record["cache_key"] == f"{root}.r2"
    assert record["strategy_revision"] == 2
    assert not cache_dir(repo, root).exists()
    # what revision 1 would have cached: other bytes under the old key
    old = cache_dir(repo, root)
    shutil.copytree(cache_dir(repo, f"{root}.r2"), old)
    planted = old / "model.safetensors"
    planted.write_bytes(planted.read_bytes()[:-4] + b"\0\0\0\0")
    old_record = json.loads((old / "resolution.json").read_text())
    old_record["cache_key"] = root
    del old_record["strategy_revision"]
    (old / "resolution.json").write_text(json.dumps(old_record))
    shutil.rmtree(cache_dir(repo, f"{root}.r2"))
    shutil.rmtree(repo / "merged")
    again = resolve_cli(repo)
    assert again["cache_hit"] is False
    assert digests(repo / "merged") == fresh
    assert (old / "model.safetensors").read_bytes() == planted.read_bytes()  # left alone
    assert resolve_cli(repo)["cache_hit"] is True  # the r2 entry now serves
    # gc drops what revision 1 computed (never served again), keeps the current entry
    pruned = json.loads(crdt(repo, "gc", "--json").stdout)
    assert pruned["removed"] == [root]
    assert not old.exists()
    assert cache_dir(repo, f"{root}.r2").is_dir()
    assert resolve_cli(repo)["cache_hit"] is True


def test_float64_compute_dtype_gets_its_own_cache_entry(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    for s, w in ((1, "1"), (2, "3"), (3, "0.3")):
        add(repo, model(tmp_path, s), "--weight", w)
    root = status(repo)["merkle_root"]
    resolve_here(repo)
    f32 = digests(repo / "merged")
    wide = resolve_cli(repo, "--compute-dtype", "float64")
    assert wide["cache_hit"] is False
    assert wide["merkle_root"] == root
    key = f"{root}.float64.cpu"
    assert (cache_dir(repo, root) / "resolution.json").is_file()
    assert (cache_dir(repo, key) / "resolution.json").is_file()
    record = json.loads((repo / "merged" / "resolution.json").read_text())
    assert record["compute_dtype"] == "float64"
    assert record["cache_key"] == key
    assert record["merkle_root"] == root
    assert digests(repo / "merged") == digests(cache_dir(repo, key))
    assert digests(cache_dir(repo, root)) == f32
    assert f32["model.safetensors"] != digests(repo / "merged")["model.safetensors"]
    assert resolve(Repo.open(repo), compute_dtype="float64").cache_hit


def test_output_option_writes_into_the_given_folder(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, model(tmp_path, 1))
    add(repo, model(tmp_path, 2))
    target = tmp_path / "elsewhere" / "model-out"
    out = resolve_cli(repo, "--output", str(target))
    assert Path(out["output"]) == target
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "model.safetensors",
        "resolution.json",
    ]
    assert not (repo / "merged").exists()
    # the output register moves the default folder
    crdt(repo, "output", "models/merged-here")
    st = status(repo)
    assert resolve_here(repo) == repo / "models" / "merged-here"
    assert (
        json.loads((repo / "models" / "merged-here" / "resolution.json").read_text())["merkle_root"]
        == (st["merkle_root"])
    )


# -- 3. the cache ---------------------------------------------------------------------------------
def test_second_resolve_is_a_cache_hit_with_hard_links_to_the_cache(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, model(tmp_path, 1))
    add(repo, model(tmp_path, 2))
    first = resolve_cli(repo)
    second = resolve_cli(repo)
    assert first["cache_hit"] is False
    assert second["cache_hit"] is True
    root = status(repo)["merkle_root"]
    assert first["merkle_root"] == second["merkle_root"] == root
    cached = cache_dir(repo, root)
    merged = repo / "merged"
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in cached.iterdir())
    for f in merged.iterdir():
        assert inode(f) == inode(cached / f.name), f.name
    assert leftovers(repo) == []
    # a deleted output folder comes back from the cache, still as links
    shutil.rmtree(merged)
    assert resolve(Repo.open(repo)).cache_hit
    for f in merged.iterdir():
        assert inode(f) == inode(cached / f.name), f.name


def test_an_edit_in_the_output_folder_never_changes_what_a_later_resolve_serves(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, model(tmp_path, 1))
    resolve_cli(repo)
    merged = repo / "merged"
    want = digests(merged)
    (merged / "resolution.json").chmod(0o644)  # the files are read-only: a user insists
    with open(merged / "resolution.json", "ab") as fh:  # appended: the cache's file too
        fh.write(b" ")
    again = resolve_cli(repo)
    assert again["cache_hit"] is False  # the shared file's ctime moved: re-hashed, recomputed
    assert digests(merged) == want
    # the same size, other bytes, mtime set back: the ctime still moves
    path = merged / "model.safetensors"
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert crdt(repo, "verify", "--full", check=False).returncode == 1
    assert resolve_cli(repo)["cache_hit"] is False
    assert digests(merged) == want
    assert digests(cache_dir(repo, status(repo)["merkle_root"])) == want
    assert crdt(repo, "verify", "--full", check=False).returncode == 0


def test_gc_prunes_entries_no_ref_reaches_then_the_least_recent_beyond_the_budget(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, model(tmp_path, 1))
    one = resolve_cli(repo)["merkle_root"]
    git(repo, "switch", "-q", "-c", "side")
    add(repo, model(tmp_path, 2))
    two = resolve_cli(repo)["merkle_root"]
    add(repo, model(tmp_path, 3), commit=False)
    three = resolve_cli(repo)["merkle_root"]  # only the work tree and index reach it
    crdt(repo, "remove-contribution", "m3")
    git(repo, "commit", "-q", "-m", "remove m3")
    entries = {p.name for p in (repo / ".git" / "crdt" / "cache").iterdir()}
    assert {one, two, three} <= entries
    out = json.loads(crdt(repo, "gc", "--json").stdout)
    assert out["removed"] == [three] and sorted(out["kept"]) == sorted([one, two])
    # a budget below both: the least recently used goes, the newest stays
    resolve_cli(repo)  # a hit on two: the most recent
    size = sum(f.stat().st_size for f in cache_dir(repo, two).iterdir())
    out = json.loads(crdt(repo, "gc", "--json", "--max-bytes", str(size)).stdout)
    assert out["removed"] == [one] and out["kept"] == [two]
    assert not cache_dir(repo, one).exists() and cache_dir(repo, two).is_dir()
    git(repo, "switch", "-q", "main")
    assert resolve_cli(repo)["cache_hit"] is False  # computed again, identical root
    assert resolve_cli(repo)["merkle_root"] == one


def test_checkout_back_to_a_resolved_set_republishes_the_cached_files(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")  # hooks on
    add(repo, model(tmp_path, 1))  # post-commit resolves set 1
    root1 = status(repo)["merkle_root"]
    cached1 = cache_dir(repo, root1)
    before = {f.name: (inode(f), f.stat().st_mtime_ns) for f in cached1.iterdir()}
    assert before
    add(repo, model(tmp_path, 2))  # post-commit resolves set 2
    root2 = status(repo)["merkle_root"]
    merged = repo / "merged"
    assert json.loads((merged / "resolution.json").read_text())["merkle_root"] == root2
    entries = sorted(p.name for p in cached1.parent.iterdir())
    switch = git(repo, "checkout", "-q", "HEAD~1")
    assert switch.stderr == ""  # a cache hit: nothing to say, nothing computed
    assert json.loads((merged / "resolution.json").read_text())["merkle_root"] == root1
    for f in merged.iterdir():
        assert inode(f) == before[f.name][0], f.name
    # the cache entry was not rewritten, and no new one was made
    assert {f.name: (inode(f), f.stat().st_mtime_ns) for f in cached1.iterdir()} == before
    assert sorted(p.name for p in cached1.parent.iterdir()) == entries
    assert leftovers(repo) == []


def test_republishing_replaces_the_output_folder_whole_without_stale_files(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    add(repo, model(tmp_path, 1))
    add(repo, model(tmp_path, 2))
    resolve_here(repo, max_shard=10000)
    merged = repo / "merged"
    assert (merged / "model.safetensors.index.json").is_file()
    add(repo, model(tmp_path, 3))
    resolve_here(repo)
    assert sorted(p.name for p in merged.iterdir()) == [
        "README.md",
        "model.safetensors",
        "resolution.json",
    ]
    assert leftovers(repo) == []


# -- 5. streaming: peak memory does not grow with the model ---------------------------------------
_MEASURE = """
import sys
import torch  # noqa: F401
import git_crdt_merge.resolution.resolve as r
from git_crdt_merge.replicated.repo import Repo

if len(sys.argv) > 1:
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else None
    assert not r.resolve(Repo.open(sys.argv[1]), workers=workers).cache_hit
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
import resource  # the largest worker process's peak (0 when none ran)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peaks(*args: str) -> tuple[int, int]:
    """Peak resident memory in bytes of a fresh interpreter running ``_MEASURE``, and of its
    largest worker process (0 when none ran)."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True
    )
    caller, worker = proc.stdout.split()[-2:]
    return int(caller), int(worker)


def _peak_rss(*args: str) -> int:
    return _peaks(*args)[0]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_resolve_peak_memory_stays_far_below_the_model_size(tmp_path: Path) -> None:
    shapes = {f"layer.{i:03d}.weight": (256, 256) for i in range(256)}  # 64 MiB per model
    repo = fresh_repo(tmp_path / "repo")
    paths = [model(tmp_path, s, shapes=shapes) for s in (0, 1, 2, 3)]
    set_base(repo, paths[0])
    for p in paths[1:]:
        add(repo, p, commit=False)
    choose(repo, "ties", density=0.5)
    git(repo, "commit", "-q", "-am", "three contributions")
    model_set = sum(p.stat().st_size for p in paths)
    assert model_set > 250 * 2**20
    for p in paths:
        p.unlink()  # nothing left to read but the object store
    idle = _peak_rss()
    busy = _peak_rss(str(repo))
    out = repo / "merged" / "model.safetensors"
    assert out.stat().st_size > 64 * 2**20
    assert busy - idle < 40 * 2**20, f"resolve added {(busy - idle) / 2**20:.1f} MiB"
    # with two worker processes: each stays as small (it holds its own K + 2 tensors), and
    # the caller computes nothing
    reference = hashlib.sha256(out.read_bytes()).hexdigest()
    shutil.rmtree(repo / ".git" / "crdt" / "cache")
    caller, worker = _peaks(str(repo), "2")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == reference
    assert caller - idle < 40 * 2**20, f"the caller added {(caller - idle) / 2**20:.1f} MiB"
    assert 0 < worker - idle < 40 * 2**20, f"a worker added {(worker - idle) / 2**20:.1f} MiB"
