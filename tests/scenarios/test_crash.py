"""Crash safety: add-contribution, remove-contribution, the merge driver and resolve are killed
(SIGKILL) at named points and at random times.  Afterwards ``git fsck`` passes, ``verify`` passes
or names a recoverable state with its fix, nothing half-written is visible, and a re-run
succeeds.  Two processes adding at once both get recorded.

Kill points are set with ``GIT_CRDT_KILL_AT`` (``git_crdt_merge/faults.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import crdt, git, make_model, new_repo

from git_crdt_merge.faults import ENV
from git_crdt_merge.query.verify import verify
from git_crdt_merge.replicated.manifest import Manifest
from git_crdt_merge.replicated.repo import Repo

SHAPES = {"a.weight": (64, 64), "b.weight": (64, 64), "c.bias": (64,)}


def killed(repo: Path, point: str, *args: str) -> None:
    """Run ``git-crdt ARGS`` and require it to die at ``point``."""
    proc = subprocess.run(
        ["git-crdt", *args], cwd=repo, env={**os.environ, ENV: point}, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr)


def visible(repo: Path) -> list[str]:
    return sorted(n for _, n in Repo.open(repo).read_manifest().visible_contributions())


def assert_recoverable(repo: Path, *, merged_may_exist: bool = True) -> list[str]:
    """The invariants after any crash; returns verify's notes (recoverable states)."""
    fsck = git(repo, "fsck", "--no-progress", "--no-dangling", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "error" not in fsck.stderr.lower()
    report = verify(Repo.open(repo), None, resolvable=True)
    assert report.problems == [], report.problems
    untracked = [
        line
        for line in git(repo, "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
        if line.startswith("??")
    ]
    assert untracked == [], untracked  # no temporary file or folder in the work tree
    out = repo / "merged"
    if out.exists():
        assert merged_may_exist
        from safetensors import safe_open

        assert json.loads((out / "resolution.json").read_text())["merkle_root"]
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert sorted(f.keys()) == sorted(SHAPES)
    return report.notes


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = new_repo(tmp_path / "repo")
    git(r, "config", "crdt.autoResolve", "false")
    return r


def model(tmp: Path, seed: int) -> Path:
    return make_model(tmp / "models" / f"m{seed}.safetensors", seed, SHAPES)


ADD_POINTS = [
    "object:tmp-written",
    "add:objects-written",
    "add:objects-staged",
    "write:manifest",
    "manifest:written",
]
REMOVE_POINTS = ["write:manifest", "manifest:written"]


def test_killed_add_and_remove_leave_a_recoverable_state_and_a_rerun_succeeds(
    repo: Path, tmp_path: Path
) -> None:
    names = []
    for seed, point in enumerate(ADD_POINTS, 1):
        src = model(tmp_path, seed)
        killed(repo, point, "add-contribution", str(src), "--chunk-size", "4096")
        notes = assert_recoverable(repo)
        if point in ("add:objects-staged", "write:manifest"):
            assert any("referenced by no record" in n for n in notes), (point, notes)
        if point in ("write:manifest", "manifest:written"):
            # killed inside the manifest's index transaction: the lock it left names a dead
            # git-crdt, so the re-run below takes it over
            assert (repo / ".git" / "index.lock").read_text().startswith("git-crdt ")
        if point == "manifest:written":
            assert any("not staged" in n for n in notes), notes
        crdt(repo, "add-contribution", str(src), "--chunk-size", "4096", "-q")
        names.append(src.stem)
        assert visible(repo) == sorted(names)
        git(repo, "commit", "-q", "-m", f"add {src.stem}")  # the pre-commit hook verifies
        assert git(repo, "show", "HEAD:.crdt/manifest").stdout.count(src.stem) == 1
    for point, name in zip(REMOVE_POINTS, names, strict=False):
        killed(repo, point, "remove-contribution", name)
        assert_recoverable(repo)
        crdt(repo, "remove-contribution", name)
        names.remove(name)
        assert visible(repo) == sorted(names)
        git(repo, "commit", "-q", "-m", f"remove {name}")
        head = Manifest.parse(git(repo, "show", "HEAD:.crdt/manifest").stdout.encode())
        assert sorted(n for _, n in head.visible_contributions()) == sorted(names)
    assert_recoverable(repo)
    assert git(repo, "status", "--porcelain").stdout == ""
    assert crdt(repo, "verify", "--full").returncode == 0  # the command itself agrees


def test_add_killed_at_random_times_never_corrupts_the_repository(
    repo: Path, tmp_path: Path
) -> None:
    big = make_model(tmp_path / "big.safetensors", 7, {"w": (1024, 1024), "v": (512, 512)})
    for delay in (0.3, 0.6, 0.9, 1.4):
        proc = subprocess.Popen(
            ["git-crdt", "add-contribution", str(big), "--chunk-size", "65536", "-q"], cwd=repo
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_recoverable(repo)
    crdt(repo, "add-contribution", str(big), "--chunk-size", "65536", "-q")
    assert visible(repo) == ["big"]
    git(repo, "commit", "-q", "-m", "big")
    assert verify(Repo.open(repo), "HEAD", full=True).problems == []


def test_two_processes_adding_at_once_are_both_recorded(repo: Path, tmp_path: Path) -> None:
    srcs = [model(tmp_path, 21), model(tmp_path, 22)]
    procs = [
        subprocess.Popen(["git-crdt", "add-contribution", str(s), "-q"], cwd=repo) for s in srcs
    ]
    assert [p.wait() for p in procs] == [0, 0]
    assert visible(repo) == ["m21", "m22"]
    assert_recoverable(repo)
    git(repo, "commit", "-q", "-m", "both")
    assert verify(Repo.open(repo), "HEAD").problems == []


def branches(repo: Path, tmp_path: Path) -> None:
    crdt(repo, "add-contribution", str(model(tmp_path, 1)), "-q")
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "switch", "-q", "-c", "other", "HEAD~1")
    crdt(repo, "add-contribution", str(model(tmp_path, 2)), "-q")
    git(repo, "commit", "-q", "-m", "two")
    git(repo, "switch", "-q", "main")


def test_killed_merge_driver_is_a_conflict_that_repair_or_a_rerun_resolves(
    repo: Path, tmp_path: Path
) -> None:
    branches(repo, tmp_path)
    env = {**os.environ, ENV: "driver:tmp-written"}
    for fix in ("rerun", "repair"):
        merge = subprocess.run(
            ["git", "merge", "--no-edit", "other"], cwd=repo, env=env, capture_output=True
        )
        assert merge.returncode != 0  # git records a conflict: nothing is merged silently
        fsck = git(repo, "fsck", "--no-progress", "--no-dangling", check=False)
        assert fsck.returncode == 0
        report = verify(Repo.open(repo), None)
        assert [p.kind for p in report.problems] == ["conflict"]
        assert "git crdt repair" in report.problems[0].fix
        untracked = git(repo, "status", "--porcelain", "--untracked-files=all").stdout
        assert "??" not in untracked
        if fix == "rerun":
            git(repo, "merge", "--abort")
            git(repo, "merge", "-q", "--no-edit", "other")
            assert visible(repo) == ["m1", "m2"]
            git(repo, "reset", "-q", "--hard", "HEAD~1")
        else:
            crdt(repo, "repair")
            git(repo, "commit", "-q", "--no-edit")
            assert visible(repo) == ["m1", "m2"]
    assert_recoverable(repo)
    assert not list((repo / ".git" / "crdt").glob("merge-driver-*.tmp"))  # cleaned by repair


RESOLVE_POINTS = ["resolve:tensor", "publish:assembled", "publish:old-moved"]


def root_of(repo: Path) -> str:
    return Repo.open(repo).read_manifest().merkle_root()


def written_root(repo: Path) -> str | None:
    path = repo / "merged" / "resolution.json"
    return str(json.loads(path.read_text())["merkle_root"]) if path.exists() else None


def test_killed_resolve_never_shows_a_half_written_model_and_a_rerun_succeeds(
    repo: Path, tmp_path: Path
) -> None:
    crdt(repo, "add-contribution", str(model(tmp_path, 1)), "-q")
    git(repo, "commit", "-q", "-m", "one")
    for seed, point in enumerate(RESOLVE_POINTS, 2):
        before = written_root(repo)
        crdt(repo, "add-contribution", str(model(tmp_path, seed)), "-q")
        killed(repo, point, "resolve")
        assert_recoverable(repo)
        # the output folder holds the previous model or the new one, whole, never a mixture
        assert written_root(repo) in {before, root_of(repo)} - ({None} if before else set())
        crdt(repo, "resolve", "-q")
        assert written_root(repo) == root_of(repo)
        assert_recoverable(repo)
    leftovers = [p.name for p in (repo / ".git" / "crdt" / "cache").iterdir() if p.name[0] == "."]
    assert leftovers == []


def _processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is ``folder`` (the resolve and its workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")) == folder:
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_a_killed_resolve_worker_publishes_nothing_and_a_rerun_succeeds(
    repo: Path, tmp_path: Path
) -> None:
    """A worker process of a parallel resolve dies (SIGKILL, as the out-of-memory killer
    would): the resolve fails with a one-line error, the previous model stays whole, nothing is
    left in the cache, and the next resolve writes the new model."""
    crdt(repo, "add-contribution", str(model(tmp_path, 1)), "-q")
    git(repo, "commit", "-q", "-m", "one")
    crdt(repo, "resolve", "-q")
    before = written_root(repo)
    crdt(repo, "add-contribution", str(model(tmp_path, 2)), "-q")
    proc = subprocess.run(
        ["git-crdt", "resolve", "--workers", "2"],
        cwd=repo,
        env={**os.environ, ENV: "resolve:worker-tensor"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 9, (proc.returncode, proc.stderr)  # ResolveError
    assert "worker" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert written_root(repo) == before
    assert_recoverable(repo)
    assert [p.name for p in (repo / ".git" / "crdt" / "cache").iterdir() if p.name[0] == "."] == []
    crdt(repo, "resolve", "-q", "--workers", "2")
    assert written_root(repo) == root_of(repo)
    assert_recoverable(repo)


def test_a_killed_parallel_resolve_leaves_no_worker_behind_and_a_rerun_succeeds(
    repo: Path, tmp_path: Path
) -> None:
    """The resolving process itself is killed while its workers run: the output folder shows
    no mixture, its workers exit on their own, and a rerun succeeds."""
    crdt(repo, "add-contribution", str(model(tmp_path, 1)), "-q")
    git(repo, "commit", "-q", "-m", "one")
    killed(repo, "resolve:tensor", "resolve", "--workers", "2")
    assert written_root(repo) is None
    deadline = time.monotonic() + 10
    while _processes_in(repo.resolve()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_in(repo.resolve()) == []
    assert_recoverable(repo)
    crdt(repo, "resolve", "-q", "--workers", "2")
    assert written_root(repo) == root_of(repo)
    leftovers = [p.name for p in (repo / ".git" / "crdt" / "cache").iterdir() if p.name[0] == "."]
    assert leftovers == []
