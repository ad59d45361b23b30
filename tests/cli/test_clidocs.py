"""The generated CLI reference, man page and completion: current, installed, and working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import crdt

from git_crdt_merge.cli import docs as clidocs
from git_crdt_merge.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
GIT_COMPLETION = Path("/usr/share/bash-completion/completions/git")


def test_generated_files_are_current() -> None:
    stale = [
        str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        for path, text in clidocs.generated_files(ROOT, app).items()
        if not path.exists() or path.read_text() != text
    ]
    assert stale == [], f"run: .venv/bin/python scripts/gen_cli_docs.py ({stale})"


def test_reference_covers_every_command_and_option() -> None:
    import typer.main

    from git_crdt_merge.cli.app import app

    group = typer.main.get_command(app)
    text = (ROOT / "docs" / "cli.md").read_text()
    page = clidocs.MAN_PAGE.read_text()
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        assert f"## git crdt {name}\n" in text
        assert f"\\fBgit crdt {name.replace('-', chr(92) + '-')} [OPTIONS]" in page
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("--"):
                    assert f"`{opt}" in text or f" {opt}" in text, (name, opt)
    for code, _ in clidocs.exit_codes():
        assert f"| {code} |" in text
    assert {c for c, _ in clidocs.exit_codes()} >= {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 130}


def test_short_help_lists_the_commands(tmp_path: Path) -> None:
    for argv in (["git", "crdt", "-h"], ["git-crdt", "--help"]):
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=True)
        for name in ("demo", "diff", "show", "add-contribution", "completion", "man"):
            assert name in proc.stdout, (argv, name)
    sub = crdt(tmp_path, "diff", "-h")
    assert "--tensors" in sub.stdout


def test_man_page_is_installed_where_git_help_finds_it(tmp_path: Path) -> None:
    """``git crdt --help`` is ``git help crdt`` -> ``man git-crdt``: the page must be on the
    manpath that man derives from PATH (<venv>/bin -> <venv>/share/man)."""
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    page = Path(sys.prefix) / "share" / "man" / "man1" / "git-crdt.1"
    assert page.exists(), "run scripts/setup.sh (it links the page into the venv)"
    assert page.read_text() == clidocs.MAN_PAGE.read_text()
    env = dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="100")
    env.pop("MANPATH", None)
    proc = subprocess.run(
        ["git", "crdt", "--help"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "GIT-CRDT(1)" in proc.stdout
    assert "git crdt demo" in proc.stdout and "EXIT STATUS" in proc.stdout
    # the fallback that needs no MANPATH
    shown = subprocess.run(
        ["git", "crdt", "man"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0 and "GIT-CRDT(1)" in shown.stdout
    assert crdt(tmp_path, "man", "--path").stdout.strip() == str(clidocs.MAN_PAGE)


def _complete(tmp_path: Path, script: str) -> list[str]:
    path = crdt(tmp_path, "completion", "--path").stdout.strip()
    assert crdt(tmp_path, "completion").stdout == Path(path).read_text()
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f'source "{path}"\n{script}'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_completion_of_git_crdt_tab_lists_the_commands(tmp_path: Path) -> None:
    names = clidocs.commands(app)
    # 'git-crdt <TAB>' and 'git-crdt st<TAB>', with our own completion function
    direct = _complete(
        tmp_path,
        'COMP_WORDS=(git-crdt ""); COMP_CWORD=1; _git_crdt_direct; echo "${COMPREPLY[@]}"',
    )
    assert direct == [c.name for c in names]
    st = _complete(
        tmp_path, 'COMP_WORDS=(git-crdt st); COMP_CWORD=1; _git_crdt_direct; echo "${COMPREPLY[@]}"'
    )
    assert st == ["storage", "strategy", "strategies", "status"]
    opts = _complete(
        tmp_path,
        'COMP_WORDS=(git-crdt diff --t); COMP_CWORD=2; _git_crdt_direct; echo "${COMPREPLY[@]}"',
    )
    assert opts == ["--tensors"]


def test_completion_through_gits_own_bash_completion(tmp_path: Path) -> None:
    if not GIT_COMPLETION.exists():
        pytest.skip("git's bash completion is not installed")
    call = (
        'comp() { COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; '
        "COMP_POINT=${#COMP_LINE}; COMPREPLY=(); __git_wrap__git_main; "
        'echo "${COMPREPLY[@]}"; }\n'
    )
    prelude = f'source {GIT_COMPLETION}\nsource "$(git-crdt completion --path)"\n{call}'
    everything = _complete(tmp_path, prelude + 'comp git crdt ""')
    assert sorted(everything) == sorted(c.name for c in clidocs.commands(app))
    assert sorted(_complete(tmp_path, prelude + "comp git crdt d")) == ["demo", "diff", "doctor"]
    assert _complete(tmp_path, prelude + "comp git crdt show --j") == ["--json"]
