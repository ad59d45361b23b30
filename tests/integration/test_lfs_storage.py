"""The ``lfs`` storage mode against git-lfs's ``file://`` standalone transfer: chunks committed
as LFS pointers, their bytes in ``.git/lfs/objects``, uploaded by git-lfs's pre-push (chained
with ours), downloaded by resolve (only the visible set's chunks, one batch); the same ids,
descriptors and merged bytes as the ``git`` mode."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import blake3
import numpy as np
import pytest
from helpers import crdt, git, random_model

from git_crdt_merge.replicated import lfs

CHUNK = 65536


def make_repo(path: Path, storage: str, remote: Path | None = None) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    git(path, "config", "crdt.autoResolve", "false")
    crdt(path, "init", "-q", "--storage", storage)
    crdt(path, "chunk-size", str(CHUNK))
    git(path, "commit", "-q", "-m", "init")
    if remote is not None:
        git(path, "remote", "add", "origin", remote.as_uri())
    return path


def bare(path: Path) -> Path:
    git(path.parent, "init", "-q", "--bare", path.name)
    crdt(path, "install", "-q")
    return path


def lfs_files(repo_git_dir: Path) -> dict[str, int]:
    """sha256 -> size of every LFS object under ``<git dir>/lfs/objects``."""
    objects = repo_git_dir / "lfs" / "objects"
    if not objects.exists():
        return {}
    return {p.name: p.stat().st_size for p in objects.rglob("*") if p.is_file()}


def chunk_blobs(repo: Path, rev: str = "HEAD") -> dict[str, bytes]:
    """path -> blob of every object under .crdt/objects in ``rev``."""
    paths = git(repo, "ls-tree", "-r", "--name-only", rev, "--", ".crdt/objects/").stdout.split()
    return {
        p: subprocess.run(
            ["git", "cat-file", "blob", f"{rev}:{p}"], cwd=repo, capture_output=True, check=True
        ).stdout
        for p in paths
    }


def contributions(repo: Path) -> dict[str, str]:
    listing = json.loads(crdt(repo, "list", "--json").stdout)
    return {c["name"]: c["id"] for c in listing}


def merged(repo: Path) -> bytes:
    crdt(repo, "resolve", "-q")
    return (repo / "merged" / "model.safetensors").read_bytes()


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    frozen = np.random.default_rng(99).bytes(4 * 30_000)
    return [random_model(tmp_path / f"m{i}.safetensors", i, frozen) for i in (1, 2, 3)]


def test_lfs_mode_commits_pointers_and_keeps_the_bytes_in_lfs_objects(
    tmp_path: Path, models: list[Path]
) -> None:
    repo = make_repo(tmp_path / "a", "lfs")
    assert (repo / ".crdt" / "storage").read_text() == "lfs\n"
    assert crdt(repo, "storage").stdout == "lfs\n"
    crdt(repo, "add-contribution", str(models[0]), "--name", "m1")
    git(repo, "commit", "-q", "-m", "m1")
    blobs = chunk_blobs(repo)
    pointers = {p: lfs.parse_pointer(b) for p, b in blobs.items()}
    chunk_pointers = {p: ptr for p, ptr in pointers.items() if ptr is not None}
    # 60,000 + 20,000 + 30,000 float32 in 64 KiB chunks: 4 + 2 + 2 chunks, the descriptor a blob
    assert len(chunk_pointers) == 8 and len(blobs) == 9
    store = lfs_files(repo / ".git")
    for path, ptr in chunk_pointers.items():
        data = (
            repo / ".git" / "lfs" / "objects" / ptr.oid[:2] / ptr.oid[2:4] / ptr.oid
        ).read_bytes()
        assert hashlib.sha256(data).hexdigest() == ptr.oid and len(data) == ptr.size
        assert blake3.blake3(data).hexdigest() == path.replace("/", "")[len(".crdtobjects") :]
    assert sorted(store) == sorted(p.oid for p in chunk_pointers.values())
    # git-lfs itself accepts the store
    fsck = git(repo, "lfs", "fsck")
    assert "Git LFS fsck OK" in fsck.stdout
    out = crdt(repo, "verify", "--full").stdout + crdt(repo, "verify", "--full").stderr
    assert "ok" in out


def test_same_bytes_are_one_lfs_object(tmp_path: Path, models: list[Path]) -> None:
    """Identical chunks (a frozen tensor in three models, the same model twice) are stored
    once in the LFS store."""
    repo = make_repo(tmp_path / "a", "lfs")
    crdt(repo, "add-contribution", str(models[0]), "--name", "m1")
    one = lfs_files(repo / ".git")
    crdt(repo, "add-contribution", str(models[1]), "--name", "m2")
    two = lfs_files(repo / ".git")
    # the frozen tensor's 2 chunks are shared: m2 brings only its own 6
    assert len(two) - len(one) == 6
    crdt(repo, "add-contribution", str(models[1]), "--name", "m2-again")
    assert lfs_files(repo / ".git") == two


def test_push_clone_pull_and_resolve_byte_identical_with_git_mode(
    tmp_path: Path, models: list[Path]
) -> None:
    origin = bare(tmp_path / "origin.git")
    a = make_repo(tmp_path / "a", "lfs", origin)
    for i, m in enumerate(models[:2], 1):
        crdt(a, "add-contribution", str(m), "--name", f"m{i}")
    git(a, "commit", "-q", "-m", "two")
    git(a, "push", "-q", "origin", "main")
    assert lfs_files(origin) == lfs_files(a / ".git")  # git-lfs's pre-push uploaded them

    plain = make_repo(tmp_path / "plain", "git")
    for i, m in enumerate(models[:2], 1):
        crdt(plain, "add-contribution", str(m), "--name", f"m{i}")
    git(plain, "commit", "-q", "-m", "two")
    assert not lfs_files(plain / ".git")
    assert contributions(plain) == contributions(a)
    # descriptors: the same blobs in both modes (only chunks become pointers)
    descs_a = {p: b for p, b in chunk_blobs(a).items() if lfs.parse_pointer(b) is None}
    descs_plain = {p: b for p, b in chunk_blobs(plain).items() if len(b) < 4096}
    assert descs_a == descs_plain and len(descs_a) == 2
    assert chunk_blobs(a).keys() == chunk_blobs(plain).keys()

    crdt(tmp_path, "clone", "-q", origin.as_uri(), "b")
    b = tmp_path / "b"
    expected = merged(plain)
    assert (b / "merged" / "model.safetensors").read_bytes() == expected
    assert merged(a) == expected
    assert "ok" in crdt(b, "verify", "--full").stdout + crdt(b, "verify", "--full").stderr

    # pull between two clones: b adds, pushes (uploads), a pulls and resolves (downloads)
    crdt(b, "add-contribution", str(models[2]), "--name", "m3")
    git(b, "commit", "-q", "-m", "m3")
    git(b, "push", "-q", "origin", "main")
    git(a, "pull", "-q", "--no-rebase", "origin", "main")
    crdt(plain, "add-contribution", str(models[2]), "--name", "m3")
    git(plain, "commit", "-q", "-m", "m3")
    assert merged(a) == merged(plain) == merged(b)


def test_clone_fetches_only_the_visible_sets_chunks(tmp_path: Path, models: list[Path]) -> None:
    origin = bare(tmp_path / "origin.git")
    a = make_repo(tmp_path / "a", "lfs", origin)
    for i, m in enumerate(models, 1):
        crdt(a, "add-contribution", str(m), "--name", f"m{i}")
    crdt(a, "remove-contribution", "m3")
    git(a, "commit", "-q", "-m", "m1 m2, m3 removed")
    git(a, "push", "-q", "origin", "main")
    assert len(lfs_files(origin)) == 2 + 3 * 6  # every chunk was pushed
    crdt(tmp_path, "clone", "-q", origin.as_uri(), "b")
    b = tmp_path / "b"
    # m3's own 6 chunks were not downloaded: the visible set needs 2 shared + 2 x 6
    assert len(lfs_files(b / ".git")) == 2 + 2 * 6
    assert (b / "merged" / "model.safetensors").read_bytes() == merged(a)


def test_verify_names_absent_lfs_chunks_and_fetch_downloads_them(
    tmp_path: Path, models: list[Path]
) -> None:
    origin = bare(tmp_path / "origin.git")
    a = make_repo(tmp_path / "a", "lfs", origin)
    crdt(a, "add-contribution", str(models[0]), "--name", "m1")
    git(a, "commit", "-q", "-m", "m1")
    git(a, "push", "-q", "origin", "main")
    crdt(tmp_path, "clone", "-q", "--no-resolve", origin.as_uri(), "b")
    b = tmp_path / "b"
    assert not lfs_files(b / ".git")
    proc = crdt(b, "verify", check=False)
    assert proc.returncode != 0
    assert "is in Git LFS and not fetched yet" in proc.stdout + proc.stderr
    crdt(b, "verify", "--fetch", "--full")
    assert lfs_files(b / ".git") == lfs_files(a / ".git")


def test_switching_modes_reads_both_forms(tmp_path: Path, models: list[Path]) -> None:
    """A git-mode repository switched to lfs: old chunks stay blobs, new ones are pointers,
    and the merged bytes are those of a repository that never switched."""
    repo = make_repo(tmp_path / "a", "git")
    crdt(repo, "add-contribution", str(models[0]), "--name", "m1")
    git(repo, "commit", "-q", "-m", "m1")
    crdt(repo, "storage", "lfs")
    assert git(repo, "diff", "--cached", "--name-only").stdout.split() == [".crdt/storage"]
    crdt(repo, "add-contribution", str(models[1]), "--name", "m2")
    git(repo, "commit", "-q", "-m", "m2 in lfs")
    pointers = [b for b in chunk_blobs(repo).values() if lfs.parse_pointer(b) is not None]
    assert len(pointers) == 6  # m2's own chunks; the shared ones were blobs already
    plain = make_repo(tmp_path / "plain", "git")
    for i, m in enumerate(models[:2], 1):
        crdt(plain, "add-contribution", str(m), "--name", f"m{i}")
    git(plain, "commit", "-q", "-m", "two")
    assert merged(repo) == merged(plain)
    crdt(repo, "verify", "--full")


def test_a_pointer_file_as_input_names_git_lfs_pull(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "a", "git")
    pointer = lfs.Pointer("ab" * 32, 123456789).encode()
    (tmp_path / "model.safetensors").write_bytes(pointer)
    for cmd in (["add-contribution"], ["set-base"]):
        proc = crdt(repo, *cmd, str(tmp_path / "model.safetensors"), check=False)
        assert proc.returncode == 4, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "git lfs pull" in lines[0] and "Traceback" not in proc.stderr
    (tmp_path / "model.bin").write_bytes(pointer)
    proc = crdt(repo, "add-contribution", str(tmp_path / "model.bin"), check=False)
    assert proc.returncode == 4 and "git lfs pull" in proc.stderr


def test_doctor_reports_an_lfs_rule_that_captures_the_chunks_in_git_mode(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "a", "git")
    assert "LFS" not in crdt(repo, "doctor", check=False).stdout
    with open(repo / ".gitattributes", "a") as fh:
        fh.write(".crdt/** filter=lfs diff=lfs merge=lfs -text\n")
    proc = crdt(repo, "doctor", check=False)
    assert proc.returncode != 0
    assert "filter=lfs" in proc.stdout + proc.stderr


def test_doctor_checks_the_lfs_modes_set_up(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "a", "lfs")
    text = crdt(repo, "doctor", check=False)
    assert "git-lfs" in text.stdout + text.stderr
    git(repo, "config", "--unset", "filter.lfs.process")
    proc = crdt(repo, "doctor", check=False)
    assert proc.returncode != 0
    assert "git crdt install" in proc.stdout + proc.stderr


def test_a_corrupt_lfs_object_is_refused(tmp_path: Path, models: list[Path]) -> None:
    repo = make_repo(tmp_path / "a", "lfs")
    crdt(repo, "add-contribution", str(models[0]), "--name", "m1")
    git(repo, "commit", "-q", "-m", "m1")
    victim = sorted((repo / ".git" / "lfs" / "objects").rglob("*"))[-1]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 6 and "blake3" in proc.stderr
    proc = crdt(repo, "verify", "--full", check=False)
    assert proc.returncode != 0 and "does not match its blake3 name" in proc.stdout + proc.stderr


def storage_bytes(repo: Path) -> int:
    """Bytes of the LFS store plus git's object database."""
    git(repo, "gc", "-q")
    total = sum(lfs_files(repo / ".git").values())
    objects = repo / ".git" / "objects"
    return total + sum(p.stat().st_size for p in objects.rglob("*") if p.is_file())


def test_a_model_already_tracked_in_lfs_is_not_stored_twice(
    tmp_path: Path, models: list[Path]
) -> None:
    """The user's own LFS-tracked model becomes a contribution whose chunks are slices of
    its LFS object: the repository grows by a few small blobs, not by the model."""
    origin = bare(tmp_path / "origin.git")
    repo = make_repo(tmp_path / "a", "lfs", origin)
    git(repo, "lfs", "track", "models/*.safetensors")
    (repo / "models").mkdir()
    model = repo / "models" / "ft.safetensors"
    model.write_bytes(models[0].read_bytes())
    git(repo, "add", ".gitattributes", "models/ft.safetensors")
    git(repo, "commit", "-q", "-m", "the fine-tune, in LFS")
    assert len(lfs_files(repo / ".git")) == 1
    before = storage_bytes(repo)
    crdt(repo, "add-contribution", str(model), "--name", "ft")
    git(repo, "commit", "-q", "-m", "contribution")
    after = storage_bytes(repo)
    size = model.stat().st_size
    assert size > 400_000 and after - before < 0.05 * size, (before, after, size)
    assert len(lfs_files(repo / ".git")) == 1  # no second copy of any byte in LFS
    # the same contribution, the same merged bytes as git mode
    plain = make_repo(tmp_path / "plain", "git")
    crdt(plain, "add-contribution", str(models[0]), "--name", "ft")
    git(plain, "commit", "-q", "-m", "ft")
    assert contributions(plain) == contributions(repo)
    assert merged(repo) == merged(plain)
    crdt(repo, "verify", "--full")
    # a clone downloads the model file once, through its pointer, and resolves the same
    git(repo, "push", "-q", "origin", "main")
    crdt(tmp_path, "clone", "-q", origin.as_uri(), "b")
    b = tmp_path / "b"
    assert (b / "merged" / "model.safetensors").read_bytes() == merged(plain)
    crdt(b, "verify", "--full")


def test_sparse_xor_chunks_travel_as_lfs_objects_and_resolve_as_raw_ones(
    tmp_path: Path, models: list[Path]
) -> None:
    """``xor-sparse-zstd`` in ``lfs`` mode: the encoded chunks are LFS objects, a push uploads
    them and the base's chunks they are taken against, a clone downloads and decodes them, and
    the merged bytes are those of a raw ``git``-mode repository of the same models."""
    origin = bare(tmp_path / "origin.git")
    a = make_repo(tmp_path / "a", "lfs", origin)
    plain = make_repo(tmp_path / "plain", "git")
    crdt(a, "set-base", str(models[0]), "-q", "--encoding", "xor-sparse-zstd")
    crdt(plain, "set-base", str(models[0]), "-q")
    for repo, enc in ((a, "xor-sparse-zstd"), (plain, "raw")):
        for i, m in enumerate(models[1:], 2):
            crdt(repo, "add-contribution", str(m), "--name", f"m{i}", "--encoding", enc)
        crdt(repo, "strategy", "task_arithmetic")
        git(repo, "commit", "-q", "-m", "set")
    assert contributions(a) == contributions(plain)
    shown = json.loads(crdt(a, "show", "m2", "--json").stdout)
    assert {t["encoding"] for t in shown["tensors"]} == {"xor-sparse-zstd"}
    git(a, "push", "-q", "origin", "main")
    assert lfs_files(origin) == lfs_files(a / ".git")
    crdt(tmp_path, "clone", "-q", origin.as_uri(), "b")
    b = tmp_path / "b"
    expected = merged(plain)
    assert (b / "merged" / "model.safetensors").read_bytes() == expected
    assert merged(a) == expected
    assert crdt(b, "verify", "--full", check=False).returncode == 0
