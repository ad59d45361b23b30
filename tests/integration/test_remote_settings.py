"""Push, clone and gc with real git: the chunks travel as stored (level 0) zlib, never as
deltas, once ``git crdt install`` has run in the clone and in the bare remote; ``doctor``
reports a remote that would deflate them again or search them for deltas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import crdt, git, new_repo

from git_crdt_merge.integration.install import REMOTE_ATTRIBUTES, TRANSPORT_CONFIG

CHUNK = 1_310_720  # 1.25 MiB: above core.bigFileThreshold=1m, as real 64 MiB chunks are
WORDS = 4 * CHUNK // 2  # one bf16 tensor of four chunks


def bf16_words(seed: int) -> np.ndarray:
    """Random finite bf16 bit patterns; every other word has a zero low byte, so zlib can
    shrink the bytes (~15 %) and a deflated copy is told from a stored one by its size."""
    words = np.random.default_rng(seed).integers(0, 1 << 16, WORDS, dtype=np.uint16)
    words &= 0xBFFF  # exponent never all ones: no NaN or Inf
    words[::2] &= 0xFF00
    return words


def save_bf16(path: Path, words: np.ndarray) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.from_numpy(words.copy()).view(torch.bfloat16)}, str(path))
    return path


def fine_tune(words: np.ndarray, seed: int) -> np.ndarray:
    """A few words changed in every 4 KiB: chunks that delta search would love."""
    out = words.copy()
    idx = np.arange(0, out.size, 2048) + np.random.default_rng(seed).integers(0, 2048)
    out[idx[idx < out.size]] ^= 0x0101
    return out


def bare(path: Path, *, install: bool) -> Path:
    git(path.parent, "init", "-q", "--bare", str(path))
    if install:
        crdt(path, "install", "-q")
    return path


def _batch(repo: Path, fmt: str, shas: list[str]) -> list[str]:
    import subprocess

    proc = subprocess.run(
        ["git", "cat-file", f"--batch-check={fmt}"],
        cwd=repo,
        input="".join(f"{s}\n" for s in shas),
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.splitlines()


def chunks_of(repo: Path) -> dict[str, int]:
    """git SHA-1 -> size of the chunk blobs (>= 1 MiB) under .crdt/objects/ at HEAD."""
    lines = git(repo, "ls-tree", "-r", "HEAD", "--", ".crdt/objects/").stdout.splitlines()
    shas = [line.split()[2] for line in lines]
    out = {}
    for row in _batch(repo, "%(objectname) %(objectsize)", shas):
        sha, size = row.split()
        if int(size) >= 1024**2:
            out[sha] = int(size)
    return out


def pack_entries(repo: Path) -> dict[str, tuple[int, int, bool]]:
    """SHA-1 -> (size, size in pack, is a delta) from ``git verify-pack -v`` of every pack."""
    entries = {}
    for idx in sorted((repo / "objects" / "pack").glob("*.idx")) or sorted(
        (repo / ".git" / "objects" / "pack").glob("*.idx")
    ):
        for line in git(repo, "verify-pack", "-v", str(idx)).stdout.splitlines():
            parts = line.split()
            if len(parts) >= 5 and len(parts[0]) == 40 and parts[1] == "blob":
                entries[parts[0]] = (int(parts[2]), int(parts[3]), len(parts) >= 7)
    return entries


def writer(tmp_path: Path, remote: Path) -> tuple[Path, int]:
    """A clone that pushed a base and a fine-tune (8 chunks); returns (clone, raw bytes)."""
    a = new_repo(tmp_path / "a")
    git(a, "config", "crdt.autoResolve", "false")
    words = bf16_words(1)
    save_bf16(tmp_path / "base.safetensors", words)
    save_bf16(tmp_path / "ft.safetensors", fine_tune(words, 2))
    crdt(a, "add-contribution", str(tmp_path / "base.safetensors"), "-n", "base", "-q",
         "--chunk-size", str(CHUNK))  # fmt: skip
    crdt(a, "add-contribution", str(tmp_path / "ft.safetensors"), "-n", "ft", "-q",
         "--chunk-size", str(CHUNK))  # fmt: skip
    git(a, "commit", "-q", "-m", "two contributions")
    git(a, "remote", "add", "origin", f"file://{remote}")
    git(a, "push", "-q", "origin", "HEAD:main")
    return a, 2 * words.nbytes


def test_install_in_a_bare_remote_sets_what_a_remote_needs(tmp_path: Path) -> None:
    remote = bare(tmp_path / "r.git", install=False)
    before = crdt(remote, "doctor", "--json", check=False)
    assert before.returncode == 1
    problems = json.loads(before.stdout)["problems"]
    for word in ("pack.compression", "core.looseCompression", "receive.unpackLimit",
                 "core.bigFileThreshold", "-delta", "gc.bigPackThreshold"):  # fmt: skip
        assert any(word in p for p in problems), word
    crdt(remote, "install", "-q")
    config = git(remote, "config", "--local", "--list").stdout
    for key, value in TRANSPORT_CONFIG.items():
        assert f"{key.lower()}={value}" in config.splitlines()
    assert "uploadpack.allowfilter=true" in config.splitlines()
    attrs = (remote / "info" / "attributes").read_text()
    assert attrs.splitlines() == list(REMOTE_ATTRIBUTES)
    assert git(remote, "check-attr", "delta", "--", ".crdt/objects/ab/cd").stdout.endswith(
        "delta: unset\n"
    )
    crdt(remote, "install", "-q")  # idempotent
    assert git(remote, "config", "--local", "--list").stdout == config
    assert (remote / "info" / "attributes").read_text() == attrs
    assert not (remote / "hooks" / "post-checkout").exists()  # a remote gets no hooks
    assert json.loads(crdt(remote, "doctor", "--json").stdout)["problems"] == []


def test_push_clone_and_gc_keep_chunks_stored_and_never_deltified(tmp_path: Path) -> None:
    remote = bare(tmp_path / "r.git", install=True)
    a, raw = writer(tmp_path, remote)
    chunks = chunks_of(a)
    assert len(chunks) == 8 and sum(chunks.values()) == raw
    # the push was kept as a pack (receive.unpackLimit=1): nothing was exploded into loose
    assert not [p for p in (remote / "objects").glob("??/*")]
    crdt(tmp_path, "clone", "-q", "--no-resolve", f"file://{remote}", "b")
    b = tmp_path / "b"
    for repo in (remote, b):
        packs = list((repo / "objects" / "pack").glob("*.pack")) or list(
            (repo / ".git" / "objects" / "pack").glob("*.pack")
        )
        entries = pack_entries(repo)
        for sha, size in chunks.items():
            in_size, in_pack, delta = entries[sha]
            assert in_size == size and not delta, (repo, sha)
            # stored blocks: 5 bytes per block (16-64 KiB) over the raw size; deflate would
            # save ~15 % of these bytes
            assert size < in_pack <= size * 1.001 + 64, (repo, sha, in_pack)
        assert raw < sum(p.stat().st_size for p in packs) < raw * 1.001 + 65536
    # gc: the remote keeps its packs of chunks as they are; the clone's too
    for repo in (remote, b):
        git(repo, "gc", "-q")
        entries = pack_entries(repo)
        assert all(not entries[sha][2] and entries[sha][1] > size for sha, size in chunks.items())
    assert json.loads(crdt(b, "doctor", "--json", "--remote", "origin").stdout)["problems"] == []


def test_doctor_reports_a_remote_that_deflates_and_deltifies_the_chunks(tmp_path: Path) -> None:
    remote = bare(tmp_path / "r.git", install=False)
    a, _ = writer(tmp_path, remote)
    git(remote, "gc", "-q")  # git's defaults: deflate, and delta search of similar chunks
    entries = pack_entries(remote)
    chunks = chunks_of(a)
    assert any(entries[s][2] for s in chunks)  # the control: git did make deltas
    proc = crdt(a, "doctor", "--json", "--remote", "origin", check=False)
    assert proc.returncode == 1
    problems = [p for p in json.loads(proc.stdout)["problems"] if p.startswith("remote origin")]
    assert any("stored as deltas" in p for p in problems)
    assert any("stored deflated" in p for p in problems)
    assert any("pack.compression is -1" in p for p in problems)
    assert any("not marked -delta" in p for p in problems)
    # the advice works: install there, repack without reusing objects
    crdt(remote, "install", "-q")
    git(remote, "repack", "-a", "-d", "-F", "-q")
    entries = pack_entries(remote)
    assert all(not entries[s][2] and entries[s][1] > chunks[s] for s in chunks)
    by_path = crdt(a, "doctor", "--json", "--remote", str(remote))
    assert json.loads(by_path.stdout)["problems"] == []


def test_doctor_remote_that_is_not_on_this_machine_is_a_problem_not_a_crash(
    tmp_path: Path,
) -> None:
    a = new_repo(tmp_path / "a")
    git(a, "remote", "add", "origin", "https://example.invalid/models.git")
    proc = crdt(a, "doctor", "--json", "--remote", "origin", check=False)
    assert proc.returncode == 1
    problems = json.loads(proc.stdout)["problems"]
    assert problems == [
        "remote origin: not a repository on this machine, so its settings cannot be read here "
        "(hosted remotes: docs/hosting.md)"
    ]
