"""The repository's ``.pre-commit-hooks.yaml``, run by the pre-commit framework itself
(``pre-commit try-repo``): the hooks pass a sound state and block a broken one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import crdt, descriptor_address, git, make_model, new_repo

from git_crdt_merge.replicated.manifest import Manifest, add_record
from git_crdt_merge.replicated.repo import new_tag
from git_crdt_merge.replicated.store import ObjectStore, object_path

ROOT = Path(__file__).resolve().parents[2]
PRE_COMMIT = Path(sys.executable).parent / "pre-commit"


def try_repo(repo: Path, hooks: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PRE_COMMIT), "try-repo", str(hooks), *args, "--verbose"],
        cwd=repo,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PRE_COMMIT_HOME": str(home), "PRE_COMMIT_COLOR": "never"},
    )


@pytest.mark.skipif(not PRE_COMMIT.exists(), reason="pre-commit is in the test extra")
def test_pre_commit_framework_hooks_pass_a_sound_state_and_block_a_broken_one(
    tmp_path: Path,
) -> None:
    hooks = tmp_path / "hooks-repo"  # try-repo needs a git repository with a commit
    hooks.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hooks)
    git(hooks, "init", "-q")
    git(hooks, "add", ".pre-commit-hooks.yaml")
    git(hooks, "commit", "-q", "-m", "hooks")
    home = tmp_path / "pre-commit-home"
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    src = make_model(tmp_path / "m.safetensors", 1)
    cid = json.loads(crdt(repo, "add-contribution", str(src), "--json").stdout)["id"]
    ok = try_repo(repo, hooks, home, "git-crdt-verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "git-crdt verify (staged manifest and objects)" in ok.stdout and "Passed" in ok.stdout
    git(repo, "commit", "-q", "-m", "one contribution")

    path = repo / ".crdt" / "manifest"
    ghost = "ab" * 32
    path.write_bytes(
        Manifest.parse(path.read_bytes())
        .with_records([add_record(new_tag(), ghost, "ghost")])
        .serialize()
    )
    git(repo, "add", ".crdt/manifest")
    bad = try_repo(repo, hooks, home, "git-crdt-verify")
    assert bad.returncode == 1
    assert "Failed" in bad.stdout and "pre-commit blocked" in bad.stdout
    assert ghost[:16] in bad.stdout

    # the push hook checks the pushed commit, which pre-commit names in PRE_COMMIT_TO_REF
    git(repo, "reset", "-q", "--hard")
    chunk = json.loads(ObjectStore(repo).get(descriptor_address(repo, cid)))["tensors"][
        "head.weight"
    ]["chunks"][0]
    git(repo, "update-index", "--force-remove", object_path(chunk))
    git(repo, "commit", "-q", "--no-verify", "-m", "broken")
    head = git(repo, "rev-parse", "HEAD").stdout.strip()
    push = try_repo(
        repo,
        hooks,
        home,
        "git-crdt-verify-push",
        "--hook-stage",
        "pre-push",
        "--from-ref",
        "HEAD~1",
        "--to-ref",
        head,
    )
    assert push.returncode == 1, push.stdout + push.stderr
    assert f"commit {head[:10]}" in push.stdout and "pre-push blocked" in push.stdout
    assert not (Path(os.environ["HOME"]) / ".cache" / "pre-commit").exists()
