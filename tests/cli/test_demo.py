"""``git crdt demo`` end to end: real training, real git, three clones (one run, ~30 s here)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import crdt, git


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_clones_agree_and_merged_models_beat_each_fine_tune(tmp_path: Path) -> None:
    origin = git(tmp_path, "config", "--global", "--list", "--show-origin").stdout.split()[0]
    gconf = Path(origin.removeprefix("file:"))
    before = gconf.read_bytes()
    keep = tmp_path / "demo"
    # Not a terminal: one line per step instead of a bar, tables on stderr, nothing on stdout.
    proc = subprocess.run(
        ["git", "crdt", "demo", "--keep", str(keep)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == ""
    assert "[1/14] loading the digits data set" in proc.stderr
    assert "[14/14] measuring accuracy" in proc.stderr
    assert "test accuracy by digit subset" in proc.stderr
    assert "every clone holds the same merged model" in proc.stderr

    report = json.loads((keep / "report.json").read_text())
    assert report["identical"] is True
    assert set(report["roots"]) == {"ties", "task_arithmetic"}
    for strategy, roots in report["roots"].items():
        assert set(roots) == {"alice", "bob", "carol"}
        assert len(set(roots.values())) == 1, strategy
        files = report["files"][strategy]
        assert len({json.dumps(f, sort_keys=True) for f in files.values()}) == 1
    assert report["roots"]["ties"]["alice"] != report["roots"]["task_arithmetic"]["alice"]

    acc = {row["model"]: row for row in report["accuracy"]}
    assert list(acc) == ["base", "alice", "bob", "carol", "ties", "task_arithmetic"]
    for who, task in (("alice", "0-3"), ("bob", "4-6"), ("carol", "7-9")):
        assert acc[who][task] > acc["base"][task]  # fine-tuning helped its own digits
        assert acc[who]["all"] < acc["base"]["all"]  # ... and forgot the others
    for merged in ("ties", "task_arithmetic"):
        assert acc[merged]["all"] > max(acc[w]["all"] for w in ("alice", "bob", "carol"))
        assert acc[merged]["all"] > acc["base"]["all"]
        assert f"{100 * acc[merged]['all']:.1f}%" in proc.stderr

    # --keep leaves real, installed clones; check their agreement independently of the report.
    roots, models = set(), set()
    for who in ("alice", "bob", "carol"):
        status = json.loads(crdt(keep / who, "status", "--json").stdout)
        assert sorted(c["name"] for c in status["contributions"]) == ["alice", "bob", "carol"]
        assert status["strategy"]["name"] == "task_arithmetic"
        roots.add(status["merkle_root"])
        models.add(_sha(keep / who / "merged" / "model.safetensors"))
        assert crdt(keep / who, "doctor").returncode == 0
    assert roots == {report["roots"]["task_arithmetic"]["alice"]}
    assert models == {report["files"]["task_arithmetic"]["alice"]["model.safetensors"]}
    # bob merged alice's work; carol rebased her commit onto bob's merge
    carol = git(keep / "carol", "log", "--format=%P", "--grep=^carol:", "HEAD").stdout.split()
    assert len(carol) == 1
    assert len(git(keep / "carol", "log", "-1", "--format=%P", carol[0]).stdout.split()) == 2
    # the demo used its own git config, never the user's
    assert gconf.read_bytes() == before
    assert (keep / "home" / ".gitconfig").exists()


def test_demo_refuses_a_non_empty_keep_folder(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = crdt(tmp_path, "demo", "--keep", str(tmp_path / "full"), check=False)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x"]


def test_demo_killed_midway_removes_its_temporary_folder(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen(["git-crdt", "demo", "-q"], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp.glob("git-crdt-demo-*/models/base.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert list(tmp.glob("git-crdt-demo-*")) == []
