"""``git crdt install`` / ``uninstall``: idempotent, chains foreign hooks, honours hooksPath."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from helpers import crdt, git, new_repo

from git_crdt_merge.integration.install import HOOK_MARKER, HOOKS, driver_command


def snapshot(repo: Path, hooks: Path | None = None) -> dict[str, object]:
    """Everything install writes: hooks (content and mode), local config, attributes, sparse."""
    hooks = hooks or repo / ".git" / "hooks"
    files = {
        p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(hooks.iterdir())
        if p.is_file()
    }
    sparse = repo / ".git" / "info" / "sparse-checkout"
    return {
        "hooks": files,
        "config": git(repo, "config", "--local", "--list").stdout,
        "attributes": (repo / ".gitattributes").read_bytes(),
        "sparse": sparse.read_bytes() if sparse.exists() else None,
    }


def marker_hook(marker: Path, name: str, *, read_stdin: bool = False, status: int = 0) -> str:
    stdin = f'cat >> "{marker}"\n' if read_stdin else ""
    return f'#!/bin/sh\necho "{name} $*" >> "{marker}"\n{stdin}exit {status}\n'


def write_hook(hooks: Path, name: str, text: str) -> Path:
    hooks.mkdir(parents=True, exist_ok=True)
    path = hooks / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_install_is_idempotent(repo: Path) -> None:
    first = snapshot(repo)
    assert set(HOOKS) <= set(first["hooks"])  # type: ignore[arg-type]
    for _ in range(2):
        crdt(repo, "install", "-q")
        assert snapshot(repo) == first
    assert not [p for p in (repo / ".git" / "hooks").iterdir() if ".legacy" in p.name]
    config = git(repo, "config", "--local", "--get-all", "merge.crdt.driver").stdout
    assert config.splitlines() == [driver_command()]
    assert (
        git(repo, "check-attr", "merge", "--", ".crdt/manifest")
        .stdout.strip()
        .endswith("merge: crdt")
    )
    assert git(repo, "status", "--porcelain").stdout == ""


def test_installed_hooks_are_executable_and_ours(repo: Path) -> None:
    for name in HOOKS:
        path = repo / ".git" / "hooks" / name
        assert HOOK_MARKER in path.read_text()
        assert os.access(path, os.X_OK)


def test_foreign_hook_is_chained_and_still_runs_with_the_same_args(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r", init_crdt=False)
    hooks = repo / ".git" / "hooks"
    marker = tmp_path / "marker"
    original = marker_hook(marker, "legacy-post-checkout")
    write_hook(hooks, "post-checkout", original)
    write_hook(hooks, "post-rewrite", marker_hook(marker, "legacy-post-rewrite", read_stdin=True))
    proc = crdt(repo, "init")
    assert "post-checkout: existing hook kept as post-checkout.crdt-chained" in proc.stderr
    crdt(repo, "install", "-q")  # a second install must not chain our own hook
    assert (hooks / "post-checkout.crdt-chained").read_text() == original
    assert HOOK_MARKER in (hooks / "post-checkout").read_text()
    git(repo, "config", "crdt.autoResolve", "false")
    git(repo, "commit", "-q", "-m", "init")
    first = git(repo, "rev-parse", "HEAD").stdout.strip()
    marker.write_text("")
    git(repo, "switch", "-q", "-c", "topic")
    assert marker.read_text() == f"legacy-post-checkout {first} {first} 1\n"
    # post-rewrite gets its arguments and its standard input
    marker.write_text("")
    git(repo, "commit", "-q", "--amend", "-m", "amended")
    new = git(repo, "rev-parse", "HEAD").stdout.strip()
    assert marker.read_text() == f"legacy-post-rewrite amend\n{first} {new}\n"


def test_failing_legacy_pre_commit_still_blocks_the_commit(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r", init_crdt=False)
    marker = tmp_path / "marker"
    write_hook(
        repo / ".git" / "hooks", "pre-commit", marker_hook(marker, "legacy-pre-commit", status=3)
    )
    crdt(repo, "init", "-q")
    proc = git(repo, "commit", "-q", "-m", "blocked", check=False)
    assert proc.returncode != 0
    assert marker.read_text() == "legacy-pre-commit \n"
    assert git(repo, "rev-parse", "--verify", "HEAD", check=False).returncode != 0


def test_uninstall_restores_the_foreign_hook(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r", init_crdt=False)
    hooks = repo / ".git" / "hooks"
    original = marker_hook(tmp_path / "marker", "mine")
    write_hook(hooks, "post-merge", original)
    crdt(repo, "init", "-q")
    crdt(repo, "uninstall")
    assert (hooks / "post-merge").read_text() == original
    assert os.access(hooks / "post-merge", os.X_OK)
    assert not (hooks / "post-merge.crdt-chained").exists()
    for name in HOOKS:
        if name != "post-merge":
            assert not (hooks / name).exists()
    assert git(repo, "config", "--local", "--get", "merge.crdt.driver", check=False).stdout == ""
    # and install again chains it again
    crdt(repo, "install", "-q")
    assert (hooks / "post-merge.crdt-chained").read_text() == original


def test_install_never_clobbers_an_existing_legacy_hook(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r", init_crdt=False)
    hooks = repo / ".git" / "hooks"
    write_hook(hooks, "post-commit.legacy", "#!/bin/sh\necho older\n")
    write_hook(hooks, "post-commit", "#!/bin/sh\necho newer\n")
    crdt(repo, "init", "-q")
    assert (hooks / "post-commit.legacy").read_text() == "#!/bin/sh\necho older\n"
    assert (hooks / "post-commit.crdt-chained").read_text() == "#!/bin/sh\necho newer\n"


def test_install_honours_an_absolute_core_hooks_path(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r", init_crdt=False)
    shared = tmp_path / "shared-hooks"
    marker = tmp_path / "marker"
    write_hook(shared, "post-checkout", marker_hook(marker, "shared"))
    git(repo, "config", "core.hooksPath", str(shared))
    crdt(repo, "init", "-q")
    assert all(HOOK_MARKER in (shared / h).read_text() for h in HOOKS)
    assert not any((repo / ".git" / "hooks" / h).exists() for h in HOOKS)
    assert (shared / "post-checkout.crdt-chained").exists()
    git(repo, "config", "crdt.autoResolve", "false")
    git(repo, "commit", "-q", "-m", "init")
    git(repo, "switch", "-q", "-c", "topic")
    assert marker.read_text().startswith("shared ")
    assert crdt(repo, "doctor", check=False).returncode == 0


def test_install_honours_a_relative_core_hooks_path_from_a_subdirectory(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r")
    git(repo, "config", "core.hooksPath", "githooks")
    (repo / "sub").mkdir()
    crdt(repo / "sub", "install", "-q")
    assert all(HOOK_MARKER in (repo / "githooks" / h).read_text() for h in HOOKS)
    assert not (repo / "sub" / "githooks").exists()
    assert crdt(repo / "sub", "doctor", check=False).returncode == 0


def test_install_global_writes_only_the_isolated_global_config(tmp_path: Path) -> None:
    gconf = Path(os.environ["GIT_CONFIG_GLOBAL"])
    before = gconf.read_text()
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    crdt(outside, "install", "--global", "-q")
    assert (
        git(outside, "config", "--global", "--get", "merge.crdt.driver").stdout.strip()
        == driver_command()
    )
    assert gconf.read_text().startswith(before)
    assert list(outside.iterdir()) == []
    # a repository without local driver config now sees the global one; its config is untouched
    plain = new_repo(tmp_path / "plain", init_crdt=False)
    local_before = (plain / ".git" / "config").read_bytes()
    assert git(plain, "config", "--get", "merge.crdt.driver").stdout.strip() == driver_command()
    crdt(plain, "install", "--global", "-q")
    assert (plain / ".git" / "config").read_bytes() == local_before
    assert not any((plain / ".git" / "hooks" / h).exists() for h in HOOKS)
    crdt(outside, "uninstall", "--global")
    assert (
        git(outside, "config", "--global", "--get", "merge.crdt.driver", check=False).returncode
        == 1
    )
    assert "Test User" in gconf.read_text()


def test_install_outside_a_repository_is_a_one_line_error(tmp_path: Path) -> None:
    proc = crdt(tmp_path, "install", check=False)
    assert proc.returncode == 3
    assert proc.stderr.strip().startswith("git-crdt: error:")
    assert len(proc.stderr.strip().splitlines()) == 1
