"""The ``lfs`` storage mode against a real Git LFS server on loopback: giftless (local
storage), started and stopped by the ``lfs_server`` fixture.  Push, ``git crdt clone``, pull
between clones, resolve byte-identical with ``git`` mode; a server that refuses uploads or
dies in the middle of a push gives a clear error, loses nothing, and a retry completes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import crdt, git, random_model

SERVER = Path(__file__).resolve().parent.parent / "lfs_server.py"
CHUNK = 65536


@dataclass
class LfsServer:
    """A giftless process on 127.0.0.1: ``url`` for ``lfs.url``; ``fault`` sets what the
    next uploads meet (tests/lfs_server.py); ``restart`` starts it again on the same port
    and storage."""

    storage: Path
    control: Path
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(self.storage), str(self.control), str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line.isdigit(), f"giftless did not start (exit {self.proc.poll()})"
        self.port = int(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/team/models"

    def fault(self, text: str) -> None:
        self.control.write_text(text)

    def objects(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.storage.rglob("*") if p.is_file()}


@pytest.fixture
def lfs_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LfsServer]:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")
    server = LfsServer(tmp_path / "lfs-storage", tmp_path / "lfs-fault")
    server.storage.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_repo(path: Path, storage: str, *, lfs_url: str | None = None) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    git(path, "config", "crdt.autoResolve", "false")
    crdt(path, "init", "-q", "--storage", storage)
    crdt(path, "chunk-size", str(CHUNK))
    if lfs_url is not None:
        # committed, so every clone uploads to and downloads from the same LFS server
        (path / ".lfsconfig").write_text(f"[lfs]\n\turl = {lfs_url}\n\tlocksverify = false\n")
        git(path, "add", ".lfsconfig")
        fast_retries(path)
    git(path, "commit", "-q", "-m", "init")
    return path


def fast_retries(repo: Path) -> None:
    """git-lfs retries a failed transfer 8 times with back-off: twice, quickly, here (with
    ``maxretries`` 1, git-lfs 3.3.0 panics on an HTTP 500: "negative WaitGroup counter")."""
    git(repo, "config", "lfs.transfer.maxretries", "2")
    git(repo, "config", "lfs.transfer.maxretrydelay", "1")


def merged(repo: Path) -> bytes:
    crdt(repo, "resolve", "-q")
    return (repo / "merged" / "model.safetensors").read_bytes()


def local_lfs(repo: Path) -> dict[str, int]:
    objects = repo / ".git" / "lfs" / "objects"
    return {p.name: p.stat().st_size for p in objects.rglob("*") if p.is_file()}


def remote_head(origin: Path) -> str | None:
    proc = git(origin, "rev-parse", "--verify", "-q", "refs/heads/main", check=False)
    return proc.stdout.strip() or None


@pytest.fixture
def setup(tmp_path: Path, lfs_server: LfsServer) -> tuple[Path, Path, list[Path]]:
    models = [random_model(tmp_path / f"m{i}.safetensors", i) for i in (1, 2, 3)]
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "origin.git")
    a = make_repo(tmp_path / "a", "lfs", lfs_url=lfs_server.url)
    git(a, "remote", "add", "origin", str(origin))
    for i, m in enumerate(models[:2], 1):
        crdt(a, "add-contribution", str(m), "--name", f"m{i}")
    git(a, "commit", "-q", "-m", "two")
    return a, origin, models


def test_push_clone_pull_through_giftless_resolve_byte_identical_with_git_mode(
    tmp_path: Path, lfs_server: LfsServer, setup: tuple[Path, Path, list[Path]]
) -> None:
    a, origin, models = setup
    git(a, "push", "-q", "origin", "main")
    assert lfs_server.objects() == local_lfs(a) and len(local_lfs(a)) == 12
    crdt(tmp_path, "clone", "-q", str(origin), "b")
    b = tmp_path / "b"
    fast_retries(b)
    plain = make_repo(tmp_path / "plain", "git")
    for i, m in enumerate(models[:2], 1):
        crdt(plain, "add-contribution", str(m), "--name", f"m{i}")
    git(plain, "commit", "-q", "-m", "two")
    assert (b / "merged" / "model.safetensors").read_bytes() == merged(plain)
    assert local_lfs(b) == local_lfs(a)
    # b adds and pushes (to giftless), a pulls and resolves (from giftless)
    crdt(b, "add-contribution", str(models[2]), "--name", "m3")
    git(b, "commit", "-q", "-m", "m3")
    git(b, "push", "-q", "origin", "main")
    git(a, "pull", "-q", "--no-rebase", "origin", "main")
    crdt(plain, "add-contribution", str(models[2]), "--name", "m3")
    git(plain, "commit", "-q", "-m", "m3")
    assert merged(a) == merged(plain) == merged(b)
    assert len(lfs_server.objects()) == 18


@pytest.mark.parametrize("status", [403, 500])
def test_a_server_that_refuses_uploads_fails_the_push_clearly_and_a_retry_completes(
    tmp_path: Path, lfs_server: LfsServer, setup: tuple[Path, Path, list[Path]], status: int
) -> None:
    a, origin, _ = setup
    before = local_lfs(a)
    lfs_server.fault(f"refuse {status}")
    proc = git(a, "push", "origin", "main", check=False)
    assert proc.returncode != 0
    said = {403: "Authorization error", 500: "Server error"}[status]
    # git-lfs 3.3 itself sometimes panics while it retries an upload that got a 500 ("sync:
    # negative WaitGroup counter" in its tq/basic_upload.go; about 1 run in 10 here): a race
    # of git-lfs, not of this tool, and the push still fails with nothing lost, which is what
    # the rest of this test holds this tool to.
    lfs_race = status == 500 and "negative WaitGroup counter" in proc.stderr
    assert lfs_race or (said in proc.stderr and "panic" not in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert remote_head(origin) is None  # git pushed nothing: no commit without its chunks
    assert local_lfs(a) == before  # nothing lost here
    lfs_server.fault("")
    git(a, "push", "-q", "origin", "main")
    assert remote_head(origin) == git(a, "rev-parse", "HEAD").stdout.strip()
    crdt(tmp_path, "clone", "-q", str(origin), "b")
    assert (tmp_path / "b" / "merged" / "model.safetensors").read_bytes() == merged(a)


def test_a_server_that_dies_in_the_middle_of_a_push_loses_nothing_and_a_retry_completes(
    tmp_path: Path, lfs_server: LfsServer, setup: tuple[Path, Path, list[Path]]
) -> None:
    a, origin, _ = setup
    git(a, "config", "lfs.concurrenttransfers", "1")  # uploads one at a time: dies after 3
    before = local_lfs(a)
    lfs_server.fault("die 3")
    proc = git(a, "push", "origin", "main", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert lfs_server.proc is not None and lfs_server.proc.wait(10) == 3  # it did die
    assert remote_head(origin) is None
    assert local_lfs(a) == before
    assert 0 < len(lfs_server.objects()) < len(before)  # part of the push arrived
    lfs_server.fault("")
    lfs_server.restart()
    git(a, "push", "-q", "origin", "main")
    assert lfs_server.objects() == before
    crdt(tmp_path, "clone", "-q", str(origin), "b")
    b = tmp_path / "b"
    assert (b / "merged" / "model.safetensors").read_bytes() == merged(a)
    crdt(b, "verify", "--full")


def test_a_clone_whose_lfs_server_is_down_says_so_and_resolves_later(
    tmp_path: Path, lfs_server: LfsServer, setup: tuple[Path, Path, list[Path]]
) -> None:
    a, origin, _ = setup
    git(a, "push", "-q", "origin", "main")
    lfs_server.stop()
    proc = crdt(tmp_path, "clone", str(origin), "b", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "git lfs fetch failed" in lines[0], proc.stderr
    b = tmp_path / "b"
    assert not (b / "merged").exists() and not local_lfs(b)
    lfs_server.start()
    fast_retries(b)
    assert merged(b) == merged(a)
    assert os.path.isfile(b / "merged" / "model.safetensors")
