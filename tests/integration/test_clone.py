"""``git crdt clone`` never writes a chunk into the work tree; ``git stash pop`` of a staged
add does, and the next command or hook takes the chunks out again (doctor says so)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import crdt, git, new_repo, origin_copy, random_model

from git_crdt_merge.integration.clone import default_directory

CHUNK = 65536


def chunk_paths(repo: Path) -> list[str]:
    return git(repo, "ls-files", "--", ".crdt/objects/").stdout.split()


def files_under_objects(repo: Path) -> list[str]:
    objects = repo / ".crdt" / "objects"
    return sorted(str(p.relative_to(repo)) for p in objects.rglob("*") if p.is_file())


def _prepare(seed: Path, scratch: Path) -> None:
    git(seed, "config", "crdt.autoResolve", "false")
    crdt(seed, "set-base", str(random_model(scratch / "base.safetensors", 0)), "-q")
    for i in (1, 2):
        model = random_model(scratch / f"m{i}.safetensors", i)
        crdt(seed, "add-contribution", str(model), "-n", f"m{i}", "-q", "--chunk-size", str(CHUNK))
        git(seed, "commit", "-q", "-m", f"m{i}")
    git(seed, "switch", "-q", "-c", "other")
    crdt(seed, "remove-contribution", "m1")
    git(seed, "commit", "-q", "-m", "drop m1")
    git(seed, "switch", "-q", "main")


@pytest.fixture
def origin(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare remote (installed) whose main holds a base and two contributions, and a branch
    ``other`` that removed one of them (built once per session, copied per test)."""
    remote = origin_copy("clone", tmp_path, tmp_path_factory, _prepare)
    crdt(remote, "install", "-q")
    return remote


def recorder_hooks(tmp_path: Path) -> tuple[Path, Path]:
    """A global core.hooksPath whose post-checkout records the files under .crdt/objects/ at
    the moment git finished checking out (install chains it as post-checkout.legacy)."""
    hooks = tmp_path / "global-hooks"
    hooks.mkdir()
    log = tmp_path / "post-checkout.log"
    hook = hooks / "post-checkout"
    hook.write_text(
        f'#!/bin/sh\necho "post-checkout $3" >> "{log}"\n'
        f'find .crdt/objects -type f >> "{log}" 2>/dev/null\nexit 0\n'
    )
    hook.chmod(0o755)
    git(tmp_path, "config", "--global", "core.hooksPath", str(hooks))
    return hooks, log


def test_clone_never_writes_a_chunk_into_the_work_tree(tmp_path: Path, origin: Path) -> None:
    _, log = recorder_hooks(tmp_path)
    proc = crdt(tmp_path, "clone", f"file://{origin}", "b")
    b = tmp_path / "b"
    assert "cloned into" in proc.stderr
    # right after git's checkout (before we resolve) nothing was under .crdt/objects/ ...
    assert log.read_text() == "post-checkout 1\n"
    # ... and nothing is now; git keeps every chunk as skip-worktree
    ls = git(b, "ls-files", "-t", "--", ".crdt/objects/").stdout.splitlines()
    assert len(ls) > 8 and all(line.startswith("S ") for line in ls)
    assert files_under_objects(b) == [] and not (b / ".crdt" / "objects").exists()
    assert git(b, "status", "--porcelain").stdout == ""
    assert json.loads(crdt(b, "doctor", "--json").stdout)["problems"] == []
    # the merged model is the one a plain clone + install + resolve computes
    c = tmp_path / "c"
    git(tmp_path, "config", "--global", "--unset", "core.hooksPath")
    git(tmp_path, "clone", "-q", str(origin), str(c))
    assert files_under_objects(c)  # the plain clone did write the chunks (the control)
    crdt(c, "install", "-q")
    crdt(c, "resolve", "-q")
    for name in ("model.safetensors", "resolution.json"):
        assert (b / "merged" / name).read_bytes() == (c / "merged" / name).read_bytes()


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return (
        subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True).returncode == 0
    )


def _created_chunk_paths(trace: Path) -> list[str]:
    return [
        line
        for line in trace.read_text().splitlines()
        if ".crdt/objects/" in line and ("O_CREAT" in line or "rename" in line)
    ]


@pytest.mark.skipif(not _strace_works(), reason="needs a working strace")
def test_clone_creates_no_chunk_file_at_any_moment_strace(tmp_path: Path, origin: Path) -> None:
    """Every file creation of the clone and its children, traced: none is a chunk path (a
    plain ``git clone`` makes one per chunk: the control)."""
    trace = tmp_path / "crdt.trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,creat,rename,renameat,renameat2",
         "-o", str(trace), "git", "crdt", "clone", "-q", "--no-resolve", str(origin), "b"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    assert _created_chunk_paths(trace) == []
    plain = tmp_path / "plain.trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,creat", "-o", str(plain),
         "git", "clone", "-q", str(origin), "c"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    assert len(_created_chunk_paths(plain)) >= len(chunk_paths(tmp_path / "c"))


def test_clone_passes_branch_depth_and_filter_through(tmp_path: Path, origin: Path) -> None:
    out = crdt(tmp_path, "clone", "--json", "-b", "other", "--depth", "1", f"file://{origin}", "d")
    data = json.loads(out.stdout)
    d = tmp_path / "d"
    assert data["path"] == str(d) and data["resolve"]["empty"] is False
    assert git(d, "rev-parse", "--abbrev-ref", "HEAD").stdout.strip() == "other"
    assert git(d, "rev-list", "--count", "HEAD").stdout.strip() == "1"
    assert [c["name"] for c in json.loads(crdt(d, "status", "--json").stdout)["contributions"]] == [
        "m2"
    ]
    assert files_under_objects(d) == []
    # a partial clone: the remote allows filters (install set uploadpack.allowFilter), and the
    # chunks stay on the remote until something reads them
    crdt(tmp_path, "clone", "-q", "--no-resolve", "--filter=blob:none", f"file://{origin}", "e")
    e = tmp_path / "e"
    assert git(e, "config", "remote.origin.partialclonefilter").stdout.strip() == "blob:none"
    missing = git(e, "rev-list", "--objects", "--missing=print", "HEAD").stdout.splitlines()
    assert len([m for m in missing if m.startswith("?")]) >= len(chunk_paths(e)) - 2
    assert files_under_objects(e) == [] and not (e / "merged").exists()
    # doctor looks at how chunks are stored only where that fetches nothing
    assert json.loads(crdt(e, "doctor", "--json").stdout)["problems"] == []
    again = git(e, "rev-list", "--objects", "--missing=print", "HEAD").stdout.splitlines()
    assert again == missing
    # resolve fetches the chunks it needs (in one batch) and still writes none into the tree
    crdt(e, "resolve", "-q")
    assert (e / "merged" / "model.safetensors").is_file() and files_under_objects(e) == []
    assert crdt(e, "verify", "--full").returncode == 0


def test_clone_into_a_folder_that_is_not_empty_is_a_one_line_error(
    tmp_path: Path, origin: Path
) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("mine\n")
    proc = crdt(tmp_path, "clone", "-q", str(origin), "busy", check=False)
    assert proc.returncode == 10
    assert proc.stderr.startswith("git-crdt: error: git clone failed")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "busy" / "file").read_text() == "mine\n"


def test_clone_folder_name_follows_git() -> None:
    assert default_directory("https://host/team/models.git") == "models"
    assert default_directory("git@host:team/models.git/") == "models"
    assert default_directory("/srv/git/models/.git") == "models"
    assert default_directory("../models") == "models"


def test_stash_pop_of_a_staged_add_writes_chunks_and_the_next_command_takes_them_out(
    tmp_path: Path,
) -> None:
    repo = new_repo(tmp_path / "r")
    git(repo, "config", "crdt.autoResolve", "false")
    model = random_model(tmp_path / "m.safetensors", 5)
    crdt(repo, "add-contribution", str(model), "-n", "m", "-q", "--chunk-size", str(CHUNK))
    staged = chunk_paths(repo)
    assert files_under_objects(repo) == []
    git(repo, "stash", "-q")
    git(repo, "stash", "pop", "-q")
    # git's behaviour (2.39): pop without --index re-adds the new files as ordinary entries
    # and writes them into the work tree
    assert files_under_objects(repo) == sorted(staged)
    assert all(
        line.startswith("H ") for line in git(repo, "ls-files", "-t", *staged).stdout.splitlines()
    )
    proc = crdt(repo, "doctor", check=False)
    assert proc.returncode == 1 and "git stash pop" in " ".join(proc.stderr.split())
    # any writing command (here: a resolve) reapplies the sparse pattern first
    crdt(repo, "resolve", "-q")
    assert files_under_objects(repo) == [] and not (repo / ".crdt" / "objects").exists()
    ls = git(repo, "ls-files", "-t", "--", ".crdt/objects/").stdout.splitlines()
    assert sorted(line[2:] for line in ls) == sorted(staged) and all(
        line.startswith("S ") for line in ls
    )
    git(repo, "add", ".crdt/manifest")
    assert crdt(repo, "doctor", check=False).returncode == 0
    # a hook does the same: pop again, commit; post-commit takes them out
    git(repo, "stash", "-q")
    git(repo, "stash", "pop", "-q")
    assert files_under_objects(repo)
    git(repo, "add", ".crdt/manifest")
    commit = git(repo, "commit", "-q", "-m", "add m")
    assert "out of the work tree again" in commit.stderr
    assert files_under_objects(repo) == []
    tree = git(repo, "ls-tree", "-r", "--name-only", "HEAD", "--", ".crdt/objects/").stdout
    assert sorted(tree.split()) == sorted(staged)
    assert crdt(repo, "verify").returncode == 0


def test_stash_pop_with_index_keeps_the_chunks_out(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r")
    git(repo, "config", "crdt.autoResolve", "false")
    model = random_model(tmp_path / "m.safetensors", 6)
    crdt(repo, "add-contribution", str(model), "-n", "m", "-q", "--chunk-size", str(CHUNK))
    git(repo, "stash", "-q")
    git(repo, "stash", "pop", "-q", "--index")
    assert files_under_objects(repo) == []
    ls = git(repo, "ls-files", "-t", "--", ".crdt/objects/").stdout.splitlines()
    assert ls and all(line.startswith("S ") for line in ls)
