"""The installed hooks with real git: they write the merged model after every command that
changes the set, stay silent when the cache already has it, never fail the user's command on a
resolution error, and block a commit whose staged manifest references a missing object.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import crdt, git, make_model, origin_copy

from git_crdt_merge.replicated.contributions import set_register
from git_crdt_merge.replicated.manifest import Manifest, add_record, set_record
from git_crdt_merge.replicated.repo import Repo, new_tag


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def origin(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of a bare origin holding one commit made by ``git crdt init``."""
    return origin_copy("init", tmp_path, tmp_path_factory)


def clone(origin: Path, dest: Path, *, driver: bool = True) -> Path:
    """A clone with our hooks, the resolving ones off until ``auto(repo)``."""
    git(dest.parent, "clone", "-q", str(origin), str(dest))
    crdt(dest, "install", "-q")
    if not driver:
        git(dest, "config", "--remove-section", "merge.crdt")
    auto(dest, False)
    return dest


def auto(repo: Path, on: bool = True) -> None:
    git(repo, "config", "crdt.autoResolve", "true" if on else "false")


def model(tmp: Path, seed: int) -> Path:
    return make_model(tmp / "models" / f"m{seed}.safetensors", seed)


def add(repo: Path, path: Path) -> str:
    cid = json.loads(crdt(repo, "add-contribution", str(path), "--json").stdout)["id"]
    git(repo, "commit", "-q", "-m", f"add {path.stem}")
    return cid


def status(repo: Path) -> dict:
    return json.loads(crdt(repo, "status", "--json").stdout)


def written_root(repo: Path) -> str | None:
    """The Merkle root of the model in the output folder, None if there is none."""
    path = repo / "merged" / "resolution.json"
    if not path.is_file():
        return None
    assert (repo / "merged" / "model.safetensors").is_file()
    return str(json.loads(path.read_text())["merkle_root"])


def assert_model_is_current(repo: Path, n_contributions: int) -> None:
    st = status(repo)
    assert len(st["contributions"]) == n_contributions
    assert written_root(repo) == st["merkle_root"]


def remove_hooks(repo: Path, *names: str) -> None:
    hooks = Path(git(repo, "rev-parse", "--git-path", "hooks").stdout.strip())
    for name in names:
        (repo / hooks / name).unlink()


def write_manifest(repo: Path, extra: list) -> None:
    path = repo / ".crdt" / "manifest"
    path.write_bytes(Manifest.parse(path.read_bytes()).with_records(extra).serialize())


# -- the resolving hooks --------------------------------------------------------------------------
def test_pull_that_merges_writes_the_merged_model_through_post_merge(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    add(b, model(tmp_path, 2))
    git(b, "push", "-q", "origin", "main")
    add(a, model(tmp_path, 1))
    auto(a)
    pull = git(a, "pull", "-q", "--no-rebase", "--no-edit")
    assert git(a, "rev-list", "--count", "--merges", "HEAD").stdout.strip() == "1"
    assert "merged model written" in pull.stderr
    assert_model_is_current(a, 2)
    assert git(a, "status", "--porcelain").stdout == ""  # merged/ is ignored


def test_branch_switch_writes_the_model_of_the_new_branch_through_post_checkout(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    add(a, model(tmp_path, 1))
    git(a, "switch", "-q", "-c", "feature")
    add(a, model(tmp_path, 2))
    git(a, "switch", "-q", "main")
    auto(a)
    git(a, "switch", "-q", "feature")
    assert_model_is_current(a, 2)
    git(a, "switch", "-q", "main")
    assert_model_is_current(a, 1)


def test_pull_rebase_writes_the_model_through_post_rewrite(tmp_path: Path, origin: Path) -> None:
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    add(b, model(tmp_path, 2))
    git(b, "push", "-q", "origin", "main")
    add(a, model(tmp_path, 1))
    remove_hooks(a, "post-checkout", "post-commit")  # so only post-rewrite can resolve
    auto(a)
    pull = git(a, "pull", "-q", "--rebase")
    assert git(a, "rev-list", "--count", "--merges", "HEAD").stdout.strip() == "0"
    assert "merged model written" in pull.stderr
    assert_model_is_current(a, 2)


def test_commit_of_a_hand_resolved_conflict_writes_the_model_through_post_commit(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a", driver=False)  # text merge: the manifest conflicts
    b = clone(origin, tmp_path / "b")
    add(b, model(tmp_path, 2))
    git(b, "push", "-q", "origin", "main")
    add(a, model(tmp_path, 1))
    auto(a)
    pull = git(a, "pull", "--no-rebase", "--no-edit", check=False)
    assert pull.returncode != 0
    assert "CONFLICT" in pull.stdout + pull.stderr
    assert written_root(a) is None  # no post-merge on a conflict
    crdt(a, "repair")
    commit = git(a, "commit", "-q", "--no-edit")
    assert "merged model written" in commit.stderr
    assert git(a, "rev-list", "--count", "--merges", "HEAD").stdout.strip() == "1"
    assert_model_is_current(a, 2)


def test_auto_resolve_false_turns_the_resolving_hooks_off(tmp_path: Path, origin: Path) -> None:
    a = clone(origin, tmp_path / "a")  # autoResolve false
    b = clone(origin, tmp_path / "b")
    add(b, model(tmp_path, 2))
    git(b, "push", "-q", "origin", "main")
    add(a, model(tmp_path, 1))  # post-commit
    git(a, "pull", "-q", "--no-rebase", "--no-edit")  # post-merge
    git(a, "switch", "-q", "-c", "other", "HEAD~1")  # post-checkout
    git(a, "commit", "-q", "--amend", "-m", "amended")  # post-commit, post-rewrite
    git(a, "switch", "-q", "main")
    assert not (a / "merged").exists()
    assert not (a / ".git" / "crdt" / "cache").exists()


def test_hooks_are_silent_on_a_cache_hit(tmp_path: Path, origin: Path) -> None:
    a = clone(origin, tmp_path / "a")
    auto(a)
    add(a, model(tmp_path, 1))
    git(a, "switch", "-q", "-c", "feature")
    add(a, model(tmp_path, 2))
    roots = {}
    for branch in ("main", "feature"):
        git(a, "switch", "-q", branch)
        roots[branch] = written_root(a)
    entries = sorted(p.name for p in (a / ".git" / "crdt" / "cache").iterdir())
    for branch in ("main", "feature", "main"):
        switch = git(a, "switch", "-q", branch)
        assert switch.stderr == ""
        assert written_root(a) == roots[branch]
    git(a, "checkout", "-q", "HEAD", "--", ".")  # a file checkout: nothing to resolve
    amend = git(a, "commit", "-q", "--amend", "--no-edit")  # post-commit + post-rewrite
    assert amend.stderr == ""
    assert sorted(p.name for p in (a / ".git" / "crdt" / "cache").iterdir()) == entries


# -- resolution errors never fail git --------------------------------------------------------------
def test_unknown_strategy_in_the_manifest_never_fails_the_git_command(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    add(a, model(tmp_path, 1))
    clock = Manifest.parse((a / ".crdt" / "manifest").read_bytes()).max_clock() + 1
    bogus = set_record("strategy", {"name": "no_such_strategy", "params": {}}, clock, "f" * 16)
    write_manifest(a, [bogus])
    git(a, "add", ".crdt/manifest")
    auto(a)
    commit = git(a, "commit", "-q", "-m", "bogus strategy")  # exit 0 (git() checks)
    assert "unknown strategy 'no_such_strategy'" in commit.stderr
    switch = git(a, "switch", "-q", "-c", "elsewhere")  # post-checkout exits 0 as well
    assert "no_such_strategy" in switch.stderr
    assert status(a)["strategy"]["name"] == "no_such_strategy"
    assert written_root(a) is None


def test_strategy_whose_contract_is_not_met_never_fails_the_git_command(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    add(a, model(tmp_path, 1))
    # ties needs a base and there is none (what 'git crdt strategy ties' writes)
    set_register(Repo.open(a), "strategy", {"name": "ties", "params": {"density": 0.5}})
    git(a, "add", ".crdt/manifest")
    auto(a)
    commit = git(a, "commit", "-q", "-m", "ties without a base")
    assert commit.returncode == 0
    assert "requires a base model" in commit.stderr
    assert written_root(a) is None
    assert git(a, "log", "-1", "--format=%s").stdout.strip() == "ties without a base"


# -- the verifying hooks -------------------------------------------------------------------------
def test_pre_commit_blocks_a_manifest_that_references_a_missing_object(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    add(a, model(tmp_path, 1))
    head = git(a, "rev-parse", "HEAD").stdout
    ghost = "ab" * 32  # no such descriptor in the store
    write_manifest(a, [add_record(new_tag(), ghost, "ghost")])
    git(a, "add", ".crdt/manifest")
    commit = git(a, "commit", "-m", "ghost contribution", check=False)
    assert commit.returncode != 0
    assert ghost[:12] in commit.stderr
    assert "pre-commit blocked" in commit.stderr
    assert git(a, "rev-parse", "HEAD").stdout == head
