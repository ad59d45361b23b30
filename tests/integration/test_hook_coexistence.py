"""git-crdt's hooks beside the real pre-commit framework and the real git-lfs, in both install
orders, and after uninstalling either tool (install.install_hooks, hooks/git-crdt-hook.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import crdt, git, make_model, new_repo

from git_crdt_merge.integration.install import HOOKS, hook_owner

PC_CONFIG = """\
repos:
- repo: local
  hooks:
  - id: mark
    name: mark
    entry: sh -c 'echo ran >> "$(git rev-parse --git-dir)/pc-ran"'
    language: system
    always_run: true
    pass_filenames: false
"""
GHOST = "ab" * 32

needs_lfs = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed")


def pre_commit(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["pre-commit", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def pc_runs(repo: Path) -> int:
    marks = repo / ".git" / "pc-ran"
    return len(marks.read_text().splitlines()) if marks.exists() else 0


def framework_repo(tmp_path: Path) -> Path:
    repo = new_repo(tmp_path / "repo", init_crdt=False)
    (repo / ".pre-commit-config.yaml").write_text(PC_CONFIG)
    git(repo, "add", ".pre-commit-config.yaml")
    return repo


def stage_ghost(repo: Path) -> None:
    """Stage a manifest whose contribution has no descriptor: our pre-commit hook blocks it."""
    line = json.dumps(
        {"id": GHOST, "name": "ghost", "op": "add", "tag": "cd" * 16}, separators=(",", ":")
    )
    manifest = repo / ".crdt" / "manifest"
    manifest.write_text("".join(sorted(manifest.read_text().splitlines(True) + [line + "\n"])))
    git(repo, "add", ".crdt/manifest")


def assert_both_run_on_commit(repo: Path) -> None:
    before = pc_runs(repo)
    git(repo, "commit", "-q", "--allow-empty", "-m", "clean")
    assert pc_runs(repo) == before + 1
    stage_ghost(repo)
    proc = git(repo, "commit", "-q", "-m", "ghost", check=False)
    assert proc.returncode != 0
    assert "pre-commit blocked" in proc.stderr and GHOST[:16] in proc.stderr
    assert "unknown hook" not in proc.stderr and "migration mode" not in proc.stderr
    assert pc_runs(repo) == before + 2  # the framework's hooks ran too
    git(repo, "reset", "-q", "--hard")


@pytest.mark.parametrize("order", ["pre-commit first", "git-crdt first"])
def test_precommit_framework_and_crdt_both_run_in_either_order(tmp_path: Path, order: str) -> None:
    repo = framework_repo(tmp_path)
    if order == "pre-commit first":
        pre_commit(repo, "install")
        crdt(repo, "init", "-q")
    else:
        crdt(repo, "init", "-q")
        pre_commit(repo, "install")
    hooks = repo / ".git" / "hooks"
    # the same end state either way: pre-commit owns the slot and runs ours as .legacy
    assert hook_owner(hooks / "pre-commit", "pre-commit") == "pre-commit"
    assert hook_owner(hooks / "pre-commit.legacy", "pre-commit") == "ours"
    assert all(hook_owner(hooks / h, h) == "ours" for h in HOOKS if h != "pre-commit")
    assert crdt(repo, "doctor", check=False).returncode == 0
    crdt(repo, "install", "-q")  # idempotent: nothing moves
    assert hook_owner(hooks / "pre-commit", "pre-commit") == "pre-commit"
    assert not (hooks / "pre-commit.legacy.bak").exists()
    git(repo, "commit", "-q", "-m", "init")
    assert_both_run_on_commit(repo)


def test_uninstalling_precommit_leaves_our_hooks_working(tmp_path: Path) -> None:
    repo = framework_repo(tmp_path)
    crdt(repo, "init", "-q")
    pre_commit(repo, "install")
    git(repo, "commit", "-q", "-m", "init")
    pre_commit(repo, "uninstall")
    hooks = repo / ".git" / "hooks"
    assert hook_owner(hooks / "pre-commit", "pre-commit") == "ours"
    assert crdt(repo, "doctor", check=False).returncode == 0
    before = pc_runs(repo)
    stage_ghost(repo)
    proc = git(repo, "commit", "-q", "-m", "ghost", check=False)
    assert proc.returncode != 0 and "pre-commit blocked" in proc.stderr
    assert pc_runs(repo) == before


def test_uninstalling_crdt_leaves_the_framework_working(tmp_path: Path) -> None:
    repo = framework_repo(tmp_path)
    pre_commit(repo, "install")
    crdt(repo, "init", "-q")
    git(repo, "commit", "-q", "-m", "init")
    crdt(repo, "uninstall")
    hooks = repo / ".git" / "hooks"
    assert hook_owner(hooks / "pre-commit", "pre-commit") == "pre-commit"
    assert not (hooks / "pre-commit.legacy").exists()
    assert not any(hook_owner(hooks / h, h) == "ours" for h in HOOKS)
    before = pc_runs(repo)
    git(repo, "commit", "-q", "--allow-empty", "-m", "after")
    assert pc_runs(repo) == before + 1


@pytest.mark.parametrize("order", ["pre-commit first", "git-crdt first"])
def test_a_users_own_hook_survives_both_tools_and_their_uninstall(
    tmp_path: Path, order: str
) -> None:
    """The pre-commit framework overwrites HOOK.legacy: a user's hook must never sit there
    while ours is in the slot (the old layout lost it)."""
    repo = framework_repo(tmp_path)
    hooks = repo / ".git" / "hooks"
    mine = '#!/bin/sh\necho mine >> "$(git rev-parse --git-dir)/user-ran"\n'
    (hooks / "pre-commit").write_text(mine)
    (hooks / "pre-commit").chmod(0o755)
    steps = [lambda: pre_commit(repo, "install"), lambda: crdt(repo, "init", "-q")]
    for step in steps if order == "pre-commit first" else steps[::-1]:
        step()
    git(repo, "commit", "-q", "-m", "init")
    assert (repo / ".git" / "user-ran").read_text() == "mine\n"
    assert pc_runs(repo) == 1
    assert_both_run_on_commit(repo)
    crdt(repo, "uninstall")
    pre_commit(repo, "uninstall")
    assert (hooks / "pre-commit").read_text() == mine
    assert sorted(p.name for p in hooks.iterdir() if p.name.startswith("pre-commit.")) == [
        "pre-commit.sample"
    ]


def test_old_layout_with_precommit_moved_to_legacy_bak_is_repaired(tmp_path: Path) -> None:
    """What an older git-crdt left after 'pre-commit install' then 'git crdt install':
    pre-commit's hook in .legacy.bak (not running), ours in the slot and in .legacy."""
    repo = framework_repo(tmp_path)
    crdt(repo, "init", "-q")
    pre_commit(repo, "install")
    hooks = repo / ".git" / "hooks"
    os.replace(hooks / "pre-commit", hooks / "pre-commit.legacy.bak")
    shutil.copy(hooks / "pre-commit.legacy", hooks / "pre-commit")
    assert crdt(repo, "doctor", check=False).returncode == 1
    crdt(repo, "install", "-q")
    assert hook_owner(hooks / "pre-commit", "pre-commit") == "pre-commit"
    assert hook_owner(hooks / "pre-commit.legacy", "pre-commit") == "ours"
    assert not (hooks / "pre-commit.legacy.bak").exists()
    git(repo, "commit", "-q", "-m", "init")
    assert_both_run_on_commit(repo)


# -- git-lfs -----------------------------------------------------------------------------------
def lfs(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["git", "lfs", *args], cwd=cwd, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def lfs_objects(remote: Path) -> set[str]:
    return {p.name for p in (remote / "lfs" / "objects").rglob("*") if p.is_file()}


def push_lfs_file(repo: Path, remote: Path, name: str) -> str:
    """Commit an LFS-tracked file and push; return its LFS oid (sha256)."""
    import hashlib

    data = os.urandom(3000)
    (repo / name).write_bytes(data)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"add {name}")
    git(repo, "push", "-q", "origin", "main")
    return hashlib.sha256(data).hexdigest()


def lfs_repo(tmp_path: Path, order: str) -> tuple[Path, Path]:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    repo = new_repo(tmp_path / "repo", init_crdt=False)
    git(repo, "remote", "add", "origin", str(remote))
    if order == "git-lfs first":
        lfs(repo, "install")
        crdt(repo, "init", "-q")
    else:
        crdt(repo, "init", "-q")
        proc = lfs(repo, "install", check=False)  # it refuses to replace our hooks ...
        assert "Hook already exists" in proc.stderr + proc.stdout
    lfs(repo, "track", "*.bin")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-q", "-m", "init")
    return repo, remote


def assert_ours_resolve(repo: Path, tmp_path: Path, seed: int) -> None:
    src = make_model(tmp_path / f"m{seed}.safetensors", seed)
    crdt(repo, "add-contribution", str(src), "-q", "--name", f"m{seed}")
    git(repo, "commit", "-q", "-m", f"m{seed}")  # post-commit resolves
    res = json.loads((repo / "merged" / "resolution.json").read_text())
    assert len(res["contributions"]) == seed


@needs_lfs
@pytest.mark.parametrize("order", ["git-lfs first", "git-crdt first"])
def test_git_lfs_and_crdt_both_run_in_either_order(tmp_path: Path, order: str) -> None:
    repo, remote = lfs_repo(tmp_path, order)
    hooks = repo / ".git" / "hooks"
    assert all(hook_owner(hooks / h, h) == "ours" for h in HOOKS)
    assert not list(hooks.glob("*.crdt-chained"))  # git-lfs's own hooks are not kept twice
    oid = push_lfs_file(repo, remote, "a.bin")
    assert oid in lfs_objects(remote)  # git lfs pre-push ran from our pre-push hook
    assert_ours_resolve(repo, tmp_path, 1)
    doctor = crdt(repo, "doctor", check=False)
    assert doctor.returncode == 0 and "git-lfs is set up" in doctor.stderr


@needs_lfs
def test_uninstalling_crdt_gives_git_lfs_its_hooks_back(tmp_path: Path) -> None:
    repo, remote = lfs_repo(tmp_path, "git-crdt first")
    crdt(repo, "uninstall")
    hooks = repo / ".git" / "hooks"
    assert all(hook_owner(hooks / h, h) == "git-lfs" for h in ("pre-push", "post-checkout"))
    oid = push_lfs_file(repo, remote, "b.bin")
    assert oid in lfs_objects(remote)


@needs_lfs
def test_uninstalling_git_lfs_leaves_our_hooks_working(tmp_path: Path) -> None:
    repo, remote = lfs_repo(tmp_path, "git-lfs first")
    lfs(repo, "uninstall")
    hooks = repo / ".git" / "hooks"
    assert all(hook_owner(hooks / h, h) == "ours" for h in HOOKS)
    assert_ours_resolve(repo, tmp_path, 1)
    git(repo, "push", "-q", "origin", "main")  # no git-lfs hook command left to fail
    assert crdt(repo, "doctor", check=False).returncode == 0
