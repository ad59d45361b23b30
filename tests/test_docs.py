"""Every command example in README.md and docs/*.md is run, in order, by this test.

Convention for writing docs (follow it when you add examples):

- Put commands a reader can run in fenced ```console blocks, one command per line, each
  starting with ``$ ``.  Lines after a command, up to the next ``$ `` line, are expected
  output: each non-empty line must appear in the command's stdout or stderr (spaces collapsed;
  a line ``...`` is skipped).  Keep expected lines short: rich tables wrap.
- A command must exit 0, unless its line ends with ``# exits N``.
- ``$ cd DIR`` changes the directory for the following commands of the block; every other
  line runs with ``bash -c`` (pipes, ``&&`` and variables work; a ``cd`` inside them does not
  persist).  Each block starts in the sandbox folder.
- Each file gets a fresh sandbox, shared by its blocks in order, whose folder holds
  ``models/`` (``base.safetensors``, ``math.safetensors``, ``code.safetensors`` and the
  Hugging Face style folder ``chat/``, small models fine-tuned from the same base) and
  ``origin.git``, a bare repository whose ``main`` is a ``git crdt init`` commit.  Git runs with
  the isolated global config of tests/conftest.py.
- Commands that must not run here (installing, running the whole test suite) go in ```sh
  blocks, and each such line must be listed in ``NOT_RUN`` below with the reason.  Any other
  ```sh / ```bash / ```shell block fails this test, so no command example goes untested.
  Plain ``` blocks (output, file layouts) and other languages are not commands.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import git, make_model, origin_copy

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"sh", "bash", "shell", "console"}
EXIT = re.compile(r"\s+#\s*exits\s+(\d+)\s*$")

# sh-block lines that are not run here, and why.
NOT_RUN = {
    "bash scripts/demo.sh": (
        "installs into .venv, then runs 'git crdt demo' (tests/cli/test_demo.py)"
    ),
    "bash scripts/test.sh": "runs this very test suite",
    'export PATH="$PWD/.venv/bin:$PATH"': "shell set-up for the reader",
    "git crdt demo --keep demo": "tests/cli/test_demo.py runs it with --keep",
    # docs/security.md: commit signing needs the reader's own key and trusted signers
    "git config gpg.format ssh": "needs the reader's signing key",
    "git config user.signingkey ~/.ssh/id_ed25519.pub": "needs the reader's signing key",
    "git config commit.gpgsign true": "needs the reader's signing key",
    "git config gpg.ssh.allowedSignersFile ~/.config/git/allowed_signers": (
        "needs the reader's list of trusted signers"
    ),
    "git log --show-signature -- .crdt/manifest": "needs signed commits",
    "git crdt log": "run by the README's console examples",
    "git merge --verify-signatures origin/main": "needs signed commits on a remote",
}


@dataclass
class Command:
    line: str
    expect_exit: int
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    path: Path
    lineno: int
    lang: str
    lines: list[str]


def fenced_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    current: Block | None = None
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if current is None:
            m = re.match(r"^```(\w*)\s*$", line)
            if m:
                current = Block(path, i, m.group(1), [])
        elif line.startswith("```"):
            blocks.append(current)
            current = None
        else:
            current.lines.append(line)
    return blocks


def commands_of(block: Block) -> list[Command]:
    out: list[Command] = []
    for line in block.lines:
        if line.startswith("$ "):
            text = line[2:].strip()
            m = EXIT.search(text)
            out.append(Command(text, int(m.group(1)) if m else 0))
        elif out and line.strip() and line.strip() != "...":
            out[-1].expected.append(line.strip())
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _sandbox(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path / "sandbox"
    models = work / "models"
    shapes = {"layer.0.weight": (16, 8), "layer.0.bias": (16,), "head.weight": (4, 16)}
    make_model(models / "base.safetensors", 0, shapes)
    # fine-tunes: the base plus small, different deltas (so the merges mean something)
    from safetensors.numpy import load_file, save_file

    base = load_file(str(models / "base.safetensors"))
    for seed, name in ((1, "math"), (2, "code"), (3, "chat")):
        rng = np.random.default_rng(seed)
        tuned = {
            k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()
        }
        if name == "chat":
            (models / "chat").mkdir()
            save_file(tuned, str(models / "chat" / "model.safetensors"))
            (models / "chat" / "config.json").write_text('{"model_type": "toy"}\n')
        else:
            save_file(tuned, str(models / f"{name}.safetensors"))
    origin = origin_copy("docs", tmp_path, tmp_path_factory)
    origin.rename(work / "origin.git")
    git(work / "origin.git", "symbolic-ref", "HEAD", "refs/heads/main")
    return work


def _run(cmd: Command, cwd: Path, where: str) -> None:
    proc = subprocess.run(
        ["bash", "-c", cmd.line],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, COLUMNS="200", NO_COLOR="1"),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == cmd.expect_exit, (
        f"{where}: '{cmd.line}' exited {proc.returncode}, expected {cmd.expect_exit}:\n{output}"
    )
    for expected in cmd.expected:
        assert _norm(expected) in _norm(output), (
            f"{where}: '{cmd.line}' did not print {expected!r}; it printed:\n{output}"
        )


def _docs_with_console() -> list[Path]:
    return [p for p in DOCS if any(b.lang == "console" for b in fenced_blocks(p))]


def test_every_shell_block_is_run_or_listed() -> None:
    problems = []
    for path in DOCS:
        for block in fenced_blocks(path):
            if block.lang not in SHELL_LANGS:
                continue
            where = f"{path.relative_to(ROOT)}:{block.lineno}"
            if block.lang == "console":
                bad = [ln for ln in block.lines if ln.strip() and not commands_of(block)]
                if bad:
                    problems.append(f"{where}: console block without '$ ' commands")
                continue
            for line in block.lines:
                text = line.split("  #")[0].strip()
                if text and not text.startswith("#") and text not in NOT_RUN:
                    problems.append(f"{where}: '{text}' is in a ```{block.lang} block (not run)")
    assert problems == [], "\n".join(problems)


def test_every_not_run_line_is_still_in_the_docs() -> None:
    lines = {
        line.split("  #")[0].strip()
        for path in DOCS
        for block in fenced_blocks(path)
        if block.lang in SHELL_LANGS - {"console"}
        for line in block.lines
    }
    assert set(NOT_RUN) <= lines, set(NOT_RUN) - lines


def test_the_docs_have_runnable_examples() -> None:
    names = {p.name for p in _docs_with_console()}
    assert {"README.md", "quickstart.md", "faq.md"} <= names


@pytest.mark.parametrize("doc", _docs_with_console(), ids=lambda p: p.name)
def test_console_examples_run(
    doc: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = _sandbox(tmp_path, tmp_path_factory)
    ran = 0
    for block in fenced_blocks(doc):
        if block.lang != "console":
            continue
        cwd = work
        for n, cmd in enumerate(commands_of(block)):
            where = f"{doc.relative_to(ROOT)}:{block.lineno} command {n + 1}"
            cd = re.fullmatch(r"cd\s+(\S+)", cmd.line)
            if cd:
                cwd = (cwd / cd.group(1)).resolve()
                assert cwd.is_dir(), f"{where}: no folder {cwd}"
                continue
            _run(cmd, cwd, where)
            ran += 1
    assert ran > 0
