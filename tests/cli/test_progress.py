"""Progress bars with throughput on stderr: shown on a terminal, off otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import crdt, git, new_repo
from safetensors.numpy import save_file

pytestmark = pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1)")


def _on_a_terminal(cwd: Path, *args: str) -> str:
    """Run ``git crdt ARGS`` with a pseudo-terminal as stdin/stdout/stderr (util-linux
    ``script``); return everything it wrote."""
    cmd = " ".join(["git", "crdt", *args])
    proc = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_ingest_and_resolve_show_bars_only_on_a_terminal(tmp_path: Path) -> None:
    r = new_repo(tmp_path / "repo")
    git(r, "config", "crdt.autoResolve", "false")
    for i in range(3):
        data = np.full((1024, 1024), i, np.float32)  # 4 MiB each
        save_file({"w": data}, str(tmp_path / f"m{i}.safetensors"))

    shown = _on_a_terminal(r, "add-contribution", str(tmp_path / "m0.safetensors"), "-n", "a")
    assert "ingest" in shown and "/4.2 MB" in shown  # a bar with byte counts
    assert "added: a" in shown
    quiet = _on_a_terminal(r, "add-contribution", str(tmp_path / "m1.safetensors"), "-n", "b", "-q")
    assert "ingest" not in quiet and "MB" not in quiet
    piped = crdt(r, "add-contribution", str(tmp_path / "m2.safetensors"), "-n", "c")
    assert "ingest" not in piped.stderr and piped.stderr.startswith("added: c")

    bar = _on_a_terminal(r, "resolve", "-o", "out1")
    assert "resolve" in bar and "MB" in bar
    as_json = _on_a_terminal(r, "resolve", "-o", "out2", "--json")
    assert "MB" not in as_json and '"cache_hit": true' in as_json


def test_verify_full_shows_a_bar_only_on_a_terminal(tmp_path: Path) -> None:
    r = new_repo(tmp_path / "repo")
    git(r, "config", "crdt.autoResolve", "false")
    save_file({"w": np.ones((1024, 1024), np.float32)}, str(tmp_path / "m.safetensors"))
    crdt(r, "add-contribution", str(tmp_path / "m.safetensors"), "-q")
    git(r, "commit", "-q", "-m", "m")
    shown = _on_a_terminal(r, "verify", "--full")
    assert "verify" in shown and "/4.2 MB" in shown  # a bar with byte counts
    quiet = _on_a_terminal(r, "verify", "--full", "-q")
    assert "/4.2 MB" not in quiet
    piped = crdt(r, "verify", "--full")
    assert "/4.2 MB" not in piped.stderr and piped.stderr.startswith("ok:")  # the summary only
