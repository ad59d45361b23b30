"""A pull from an untrusted remote deletes nothing, writes nowhere, replaces no model and
exhausts nothing (docs/security.md, one scenario per class of weakness).

Each scenario is real git: an attacker clone commits crafted content with ``--no-verify`` and
pushes; a victim clone with ``git crdt install`` (hooks on) pulls, under an address-space and
a time cap.  Every scenario checks that nothing outside ``merged/`` changed (the work tree,
the ignored files, and a canary folder outside the repository), that no model other than a
resolution of the set is published, and that errors are one line with a documented exit code
and no traceback.  Hypothesis adds hostile descriptors and records beyond the listed cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import choose, crdt, git, origin_copy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from git_crdt_merge.errors import CrdtError, ManifestError
from git_crdt_merge.replicated import descriptor
from git_crdt_merge.replicated.contributions import set_register
from git_crdt_merge.replicated.manifest import Manifest, add_record, canonical_json, remove_record
from git_crdt_merge.replicated.repo import Repo, new_tag
from git_crdt_merge.replicated.store import ObjectStore, object_path

MEMORY_CAP = 3 * 1024**3  # address space of every pull and command of the victim
TIME_CAP = 240.0  # seconds; each finishes in a few under load
SHAPES = {"layer.weight": (64, 64), "layer.bias": (64,)}
EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}  # docs/errors.md


def random_model(path: Path, seed: int, scale: float = 1.0) -> Path:
    """A safetensors model of random float32 bytes (finite: uniform in [-scale, scale])."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    tensors = {
        n: torch.from_numpy((rng.random(s, dtype=np.float32) * 2 - 1) * np.float32(scale))
        for n, s in SHAPES.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _prepare(seed: Path, scratch: Path) -> None:
    (seed / "README.md").write_text("project\n")
    (seed / "docs").mkdir()
    (seed / "docs" / "guide.md").write_text("guide\n")
    git(seed, "add", "README.md", "docs")
    git(seed, "commit", "-q", "-m", "docs")
    git(seed, "config", "crdt.autoResolve", "false")
    crdt(seed, "add-contribution", str(random_model(scratch / "honest.safetensors", 1)), "-q")
    git(seed, "commit", "-q", "--no-verify", "-m", "honest contribution")


@pytest.fixture
def origin(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return origin_copy("hostile", tmp_path, tmp_path_factory, _prepare)


def clone(origin: Path, dest: Path) -> Path:
    git(dest.parent, "clone", "-q", str(origin), str(dest))
    crdt(dest, "install", "-q")
    return dest


def attacker(origin: Path, tmp: Path) -> Path:
    a = clone(origin, tmp / "attacker")
    git(a, "config", "crdt.autoResolve", "false")
    return a


def push(a: Path, message: str) -> None:
    git(a, "commit", "-q", "--no-verify", "-m", message)
    git(a, "push", "-q", "--no-verify", "origin", "HEAD:main")


def victim(origin: Path, tmp: Path) -> Path:
    """A clone whose user has resolved the set, and has files git must never lose: an
    untracked note, an ignored data set, an uncommitted edit, files inside docs/."""
    v = clone(origin, tmp / "victim")
    crdt(v, "resolve", "-q")
    (v / "notes").mkdir()
    (v / "notes" / "todo.txt").write_text("mine\n")
    (v / "data").mkdir()
    (v / "data" / "train.bin").write_bytes(os.urandom(4096))
    (v / "docs" / "notes.md").write_text("untracked notes\n")
    (v / "docs" / "big.bin").write_bytes(os.urandom(2048))
    exclude = v / ".git" / "info" / "exclude"
    exclude.write_text(exclude.read_text() + "/data/\n/docs/big.bin\n")
    (v / "README.md").write_text("project\nmy uncommitted edit\n")
    return v


def canary(tmp: Path) -> Path:
    c = tmp / "canary"
    c.mkdir(exist_ok=True)
    (c / "keep.txt").write_text("outside the repository\n")
    return c


def snapshot(*roots: Path) -> dict[str, str]:
    """path -> content hash (or link target) of every file under ``roots``, except ``.git``
    and the output folder ``merged``: what a pull may not change behind git's back."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            dirnames[:] = [d for d in dirnames if not (rel == "." and d in (".git", "merged"))]
            for name in filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
                p = Path(dirpath, name)
                key = f"{root.name}/{os.path.relpath(p, root)}"
                if p.is_symlink():
                    out[key] = "link:" + os.readlink(p)
                else:
                    out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    exclude = roots[0] / ".git" / "info" / "exclude"
    out["exclude"] = hashlib.sha256(exclude.read_bytes()).hexdigest()
    return out


def changed_by_git(v: Path, old_head: str) -> set[str]:
    """Paths the pull itself brought (tracked changes between the two commits)."""
    names = git(v, "diff", "--name-only", "--no-renames", old_head, "HEAD").stdout.split()
    return {f"{v.name}/{n}" for n in names}


def capped(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command of the victim under the memory and time caps; no traceback, ever."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    t0 = time.monotonic()
    proc = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=TIME_CAP, preexec_fn=limit
    )
    assert time.monotonic() - t0 < TIME_CAP
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr
    assert "\x1b" not in proc.stderr
    return proc


def crdt_error(v: Path, *args: str, code: int) -> str:
    """``git crdt ARGS`` fails with the documented exit ``code`` and a one-line message."""
    proc = capped(["git", "crdt", *args], v)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert code in EXIT_CODES
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("git-crdt: error: "), proc.stderr
    return lines[0]


def pull(v: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``git pull`` with the hooks on; returns the process and the hooks' git-crdt lines."""
    proc = capped(["git", "pull", "-q", "--no-rebase", "--no-edit", "origin", "main"], v)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("git-crdt:")]
    return proc, ours


def published(v: Path) -> dict[str, str]:
    merged = v / "merged"
    if not merged.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in merged.iterdir()}


def assert_untouched(
    v: Path, before: dict[str, str], old_head: str, canary_dir: Path, model_before: dict | None
) -> None:
    after = snapshot(v, canary_dir)
    allowed = changed_by_git(v, old_head)
    for key in set(before) | set(after):
        if before.get(key) != after.get(key):
            assert key in allowed, f"{key} changed outside merged/"
    assert (v / "notes" / "todo.txt").read_text() == "mine\n"
    assert (v / "README.md").read_text() == "project\nmy uncommitted edit\n"
    # no model other than a resolution of a set: the one published before, or the new set's
    now = published(v)
    if model_before is not None and now != model_before:
        proc = capped(["git", "crdt", "resolve", "--json", "-q"], v)
        assert proc.returncode == 0 and json.loads(proc.stdout)["cache_hit"], proc.stderr
        assert published(v) == now


def honest_descriptor(repo: Path) -> tuple[str, dict[str, Any]]:
    """(the object address, the parsed descriptor) of the first visible contribution."""
    m = Repo.open(repo).read_manifest()
    address = m.descriptor_address(m.visible_contributions()[0][0])
    return address, json.loads(ObjectStore(repo).get(address))


def add_descriptor(repo: Path, desc: bytes, name: str, *, remove_others: bool = False) -> str:
    """As a hostile peer: store descriptor bytes as they are and add them to the set, under
    the id their content gives (format 2), as a careful attacker would, so that the defence
    under test is reached and not the identity check."""
    r = Repo.open(repo)
    store = ObjectStore(repo)
    address = store.put(desc)
    store.flush()
    try:
        parsed = json.loads(desc)
        cid = descriptor.contribution_id(parsed, desc) if isinstance(parsed, dict) else address
    except (ValueError, RecursionError, AttributeError, TypeError):
        cid = address
    m = r.read_manifest()
    recs = [add_record(new_tag(), cid, name, desc=address)]
    if remove_others:
        recs.append(remove_record(new_tag(), [a.tag for a in m.visible_adds()]))
    r.write_manifest(m.with_records(recs))
    return cid


def one_tensor_descriptor(repo: Path, *, chunk_bytes: int, repeat: int, claimed: int) -> dict:
    """A descriptor of one U8 tensor ``t`` claiming ``claimed`` bytes, made of one stored chunk
    of ``chunk_bytes`` random bytes listed ``repeat`` times."""
    store = ObjectStore(repo)
    chunk = store.put(os.urandom(chunk_bytes))
    store.flush()
    table = {"bytes": claimed, "chunks": [chunk] * repeat, "dtype": "U8", "shape": [claimed]}
    return {"format": 1, "kind": "full", "tensors": {"t": table}, "files": {}, "metadata": {}}


def write_raw_manifest(repo: Path, lines: list[str]) -> None:
    """Records no validating writer would write, appended as sorted lines, staged."""
    path = repo / ".crdt" / "manifest"
    have = path.read_text().splitlines()
    path.write_text("".join(f"{x}\n" for x in sorted(set(have + lines), key=str.encode)))
    git(repo, "add", ".crdt/manifest")


def start(origin: Path, tmp: Path) -> tuple[Path, Path, Path, dict[str, str], str, dict]:
    a = attacker(origin, tmp)
    v = victim(origin, tmp)
    c = canary(tmp)
    return a, v, c, snapshot(v, c), git(v, "rev-parse", "HEAD").stdout.strip(), published(v)


# -- A hook deletes or replaces only what it created ------------------------------------------
def test_output_register_at_a_user_folder_with_a_planted_marker_deletes_nothing(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    root = Repo.open(a).read_manifest().merkle_root()
    set_register(Repo.open(a), "output", "docs")
    (a / "docs" / "resolution.json").write_text(json.dumps({"cache_key": root}))
    git(a, "add", "docs")
    push(a, "output into docs")
    proc, said = pull(v)
    assert proc.returncode == 0
    assert len(said) == 1 and "refusing to replace it" in said[0], said
    crdt_error(v, "resolve", code=9)
    assert (v / "docs" / "notes.md").read_text() == "untracked notes\n"
    assert (v / "docs" / "big.bin").exists()
    assert_untouched(v, before, head, c, model)


# -- No .crdt through a symbolic link ----------------------------------------------------------
def test_crdt_committed_as_a_symlink_is_never_read_or_written_through(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    git(a, "rm", "-r", "-q", "--cached", ".crdt")
    for p in sorted((a / ".crdt").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (a / ".crdt").rmdir()
    os.symlink(c, a / ".crdt")
    git(a, "add", ".crdt")
    push(a, ".crdt elsewhere")
    proc, said = pull(v)
    assert proc.returncode == 0
    assert len(said) == 1 and ".crdt is a symbolic link" in said[0], said
    m = random_model(tmp_path / "mine.safetensors", 7)
    crdt_error(v, "add-contribution", str(m), code=5)
    crdt_error(v, "strategy", "linear", code=5)
    assert sorted(p.name for p in c.iterdir()) == ["keep.txt"]
    assert_untouched(v, before, head, c, model)


# -- Current means verified content ------------------------------------------------------------
def test_a_committed_merged_folder_of_the_same_size_is_never_taken_as_current(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    crdt(a, "resolve", "-q")
    poisoned = a / "merged" / "model.safetensors"
    data = bytearray(poisoned.read_bytes())
    data[-8:] = bytes(8)  # same size, other weights
    poisoned.chmod(0o644)
    poisoned.write_bytes(bytes(data))
    git(a, "add", "-f", "merged")
    push(a, "a merged model, committed")
    # the victim deleted its output; the cache still has the honest result of this set
    honest = (v / "merged" / "model.safetensors").read_bytes()
    for p in (v / "merged").iterdir():
        p.unlink()
    (v / "merged").rmdir()
    proc, said = pull(v)
    assert proc.returncode == 0
    assert len(said) == 1 and "git tracks merged/" in said[0], said
    line = crdt_error(v, "resolve", code=9)
    assert "git tracks merged/" in line and "cache hit" not in line
    assert (v / "merged" / "model.safetensors").read_bytes() != honest  # git's, left alone
    assert_untouched(v, before, head, c, None)  # merged/ is git's here: not ours to judge
    # the user's own edit of a published file is never served either (issue 13, point 4)
    git(v, "rm", "-r", "-q", "--cached", "merged")
    git(v, "commit", "-q", "--no-verify", "-m", "untrack merged")
    for p in (v / "merged").iterdir():
        p.unlink()
    (v / "merged").rmdir()
    crdt(v, "resolve", "-q")
    assert (v / "merged" / "model.safetensors").read_bytes() == honest
    (v / "merged" / "model.safetensors").chmod(0o644)
    with open(v / "merged" / "model.safetensors", "r+b") as fh:  # the cache's file too
        fh.seek(-8, 2)
        fh.write(bytes(8))
    assert crdt(v, "verify", "--full", check=False).returncode == 1
    out = json.loads(capped(["git", "crdt", "resolve", "--json", "-q"], v).stdout)
    assert not out["cache_hit"]  # found changed: dropped and computed again
    assert (v / "merged" / "model.safetensors").read_bytes() == honest
    assert crdt(v, "verify", "--full", check=False).returncode == 0


# -- A fixed output namespace ------------------------------------------------------------------
def test_contribution_files_never_replace_the_merged_model(tmp_path: Path, origin: Path) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    _, desc = honest_descriptor(a)
    store = ObjectStore(a)
    evil = store.put(b"attacker bytes" * 100)
    desc["files"] = {"model.safetensors": evil, "config.json": evil}
    desc["metadata"] = {"note": "other id"}
    add_descriptor(a, canonical_json(desc).encode(), "evil", remove_others=True)
    push(a, "files that shadow the model")
    proc, said = pull(v)
    assert proc.returncode == 0
    assert len(said) == 1 and "reserved for the merged model" in said[0], said
    crdt_error(v, "resolve", code=6)
    verify = capped(["git", "crdt", "verify"], v)
    assert verify.returncode == 1 and "reserved for the merged model" in verify.stderr
    assert published(v) == model
    assert_untouched(v, before, head, c, model)


# -- Tensor bytes are verified before use, by default ------------------------------------------
def test_objects_rewritten_in_place_are_caught_before_they_are_passed_on(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    cid, desc = honest_descriptor(a)
    chunk = desc["tensors"]["layer.weight"]["chunks"][0]
    size = ObjectStore(a).size(chunk)
    assert size
    sha = subprocess.run(
        ["git", "hash-object", "-w", "--stdin"],
        cwd=a,
        input=os.urandom(size),
        capture_output=True,
        check=True,
    ).stdout.decode()
    git(a, "update-index", "--cacheinfo", f"100644,{sha.strip()},{object_path(chunk)}")
    push(a, "same size, other bytes")
    # a true merge (the victim has a commit of its own): pre-merge-commit re-hashes what the
    # merge brings in and blocks it
    git(v, "commit", "-q", "-am", "my edit")
    head = git(v, "rev-parse", "HEAD").stdout.strip()
    before = snapshot(v, c)
    proc, said = pull(v)
    assert proc.returncode != 0
    assert any("does not match its blake3 name" in s for s in said), said
    assert any("pre-merge-commit blocked" in s for s in said), said
    git(v, "merge", "--abort")  # git keeps a blocked merge for inspection
    assert_untouched(v, before, head, c, model)
    # passing it on: a clone that took it anyway cannot push it to another remote
    git(v, "pull", "-q", "--no-rebase", "--no-edit", "--no-verify", "origin", "main")
    other = tmp_path / "other.git"
    git(tmp_path, "init", "-q", "--bare", str(other))
    proc = capped(["git", "push", "-q", str(other), "HEAD:main"], v)
    assert proc.returncode != 0 and "does not match its blake3 name" in proc.stderr
    assert "pre-push blocked" in proc.stderr


def test_a_chunk_rewritten_in_place_never_reaches_the_merged_model(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    _, desc = honest_descriptor(a)
    chunk = desc["tensors"]["layer.weight"]["chunks"][0]
    size = ObjectStore(a).size(chunk)
    assert size
    forged = (
        subprocess.run(
            ["git", "hash-object", "-w", "--stdin"],
            cwd=a,
            input=os.urandom(size),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    git(a, "update-index", "--cacheinfo", f"100644,{forged},{object_path(chunk)}")
    m = random_model(tmp_path / "second.safetensors", 11)
    crdt(a, "add-contribution", str(m), "-q")  # a new set: the victim must compute it
    push(a, "a new contribution, and a chunk of the old one rewritten")
    proc, said = pull(v)
    assert proc.returncode == 0
    assert any("does not match" in s for s in said), said
    assert published(v) == model
    assert_untouched(v, before, head, c, model)


def test_a_descriptor_rewritten_in_place_never_feeds_a_resolution(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    cid, desc = honest_descriptor(a)
    raw = ObjectStore(a).get(cid)
    forged = raw.replace(b'"F32"', b'"I32"', 1)
    assert len(forged) == len(raw) and forged != raw
    sha = subprocess.run(
        ["git", "hash-object", "-w", "--stdin"], cwd=a, input=forged, capture_output=True
    ).stdout.decode()
    git(a, "update-index", "--cacheinfo", f"100644,{sha.strip()},{object_path(cid)}")
    push(a, "descriptor rewritten")  # the set and its root are the same
    proc, said = pull(v)
    assert proc.returncode == 0 and said == []  # a cache hit: the result was verified before
    # without the cached result, the forged descriptor is refused, never read
    shutil.rmtree(v / ".git" / "crdt" / "cache")
    line = crdt_error(v, "resolve", code=6)
    assert "does not match its blake3 hash" in line
    verify = capped(["git", "crdt", "verify"], v)
    assert verify.returncode == 1 and "does not match its blake3 hash" in verify.stderr
    assert published(v) == model
    assert_untouched(v, before, head, c, model)


# -- Bounded reads ----------------------------------------------------------------------------
def test_unbounded_content_is_refused_without_exhausting_memory_or_time(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    _, desc = honest_descriptor(a)
    # one 64 KiB chunk listed 65,536 times claims a 4 GiB tensor
    big = one_tensor_descriptor(a, chunk_bytes=65536, repeat=65536, claimed=2**32)
    add_descriptor(a, canonical_json(big).encode(), "big", remove_others=True)
    push(a, "a 4 GiB claim")
    proc, said = pull(v)
    assert proc.returncode == 0
    assert len(said) == 1 and "GB of memory" in said[0], said
    crdt_error(v, "resolve", code=9)
    # a descriptor nested 200,000 deep
    add_descriptor(a, b"[" * 200_000 + b"]" * 200_000, "deep")
    push(a, "deep")
    proc, said = pull(v)
    assert proc.returncode == 0 and len(said) == 1 and "nested deeper" in said[0], said
    verify = capped(["git", "crdt", "verify"], v)
    assert verify.returncode == 1 and "nested deeper than 64 levels" in verify.stderr
    # the manifest as a symbolic link to /dev/zero
    (a / ".crdt" / "manifest").unlink()
    os.symlink("/dev/zero", a / ".crdt" / "manifest")
    git(a, "add", ".crdt/manifest")
    push(a, "endless manifest")
    proc, said = pull(v)
    assert proc.returncode == 0 and len(said) == 1 and "symbolic link" in said[0], said
    crdt_error(v, "verify", code=5)
    crdt_error(v, "verify", "--rev", "HEAD", code=5)
    crdt_error(v, "status", code=5)
    assert published(v) == model
    assert_untouched(v, before, head, c, model)


def test_diff_tensors_of_a_hostile_revision_is_refused_as_resolve_refuses_it(
    tmp_path: Path, origin: Path
) -> None:
    """``diff --tensors REV`` computes REV's merged model through resolve's own cache-miss
    path, so a descriptor whose table contradicts its chunks is refused before any buffer is
    sized, with resolve's exit code and message."""
    a = attacker(origin, tmp_path)
    forged = one_tensor_descriptor(a, chunk_bytes=64, repeat=1, claimed=4096)
    add_descriptor(a, canonical_json(forged).encode(), "forged", remove_others=True)
    git(a, "commit", "-q", "--no-verify", "-m", "a table its chunks contradict")
    other = random_model(tmp_path / "other.safetensors", 2)
    refused = crdt_error(a, "diff", "--tensors", "HEAD", str(other), code=6)
    assert "its chunks hold 64 bytes, the descriptor says 4096" in refused
    assert not list((a / ".git" / "crdt" / "cache").glob("[0-9a-f]*"))  # nothing was computed
    assert crdt_error(a, "resolve", code=6) == refused


def test_hostile_extra_inputs_are_checked_like_the_main_table(tmp_path: Path, origin: Path) -> None:
    """A Fisher table whose entry claims a terabyte over one small chunk is refused before any
    buffer is sized from it, and a malformed extras table is a one-line error, not a crash:
    extra inputs are validated as strictly as the tensors they belong to."""
    a = attacker(origin, tmp_path)
    address, desc = honest_descriptor(a)
    entry = desc["tensors"]["layer.bias"]
    claimed = {**entry, "shape": [2**38], "bytes": 2**40}
    hostile = dict(desc, extras={"fisher": {"tensors": {"layer.bias": claimed}}})
    add_descriptor(a, canonical_json(hostile).encode(), "huge-fisher", remove_others=True)
    choose(a, "fisher_merge")
    refused = crdt_error(a, "resolve", code=6)
    assert f"its chunks hold {entry['bytes']} bytes, the descriptor says {2**40}" in refused
    assert not list((a / ".git" / "crdt" / "cache").glob("[0-9a-f]*"))
    for extras, message in [
        ({"fisher": [1]}, "extra input 'fisher' must be"),
        ({"pickle": {"tensors": {}}}, "unknown extra-input kind 'pickle'"),
        ({"fisher": {"tensors": {"no.such": entry}}}, "names tensor 'no.such', not in the model"),
        ({"fisher": {"tensors": {"layer.bias": {**entry, "bytes": 3}}}}, "says 3 bytes"),
    ]:
        bad = dict(desc, extras=extras)
        add_descriptor(a, canonical_json(bad).encode(), "bad-extras", remove_others=True)
        assert message in crdt_error(a, "resolve", code=6)
        assert message in crdt_error(a, "show", "bad-extras", code=6)


def test_encoded_chunks_claiming_huge_decoded_sizes_are_refused_with_bounded_memory(
    tmp_path: Path, origin: Path
) -> None:
    """Compressed chunks (docs/format.md, "Chunk encodings"): a zstd bomb behind a claimed
    4 GiB tensor is refused before any buffer is sized (memory, under the victim's 3 GiB
    cap); a frame declaring more than the descriptor's size, or no size, is refused before
    zstd allocates; a decoded size beyond the object limit is refused as malformed.  Each a
    one-line error."""
    import zstandard

    a, v, c, before, head, model = start(origin, tmp_path)
    store = ObjectStore(a)
    bomb = store.put(zstandard.ZstdCompressor(level=19).compress(bytes(2**30)))  # 32 KiB
    store.flush()
    huge = {
        "blake3": "0" * 64,
        "bytes": 2**32,
        "chunks": [bomb] * 4,
        "dtype": "U8",
        "encoding": {"name": "planes-zstd", "sizes": [2**30] * 4},
        "shape": [2**32],
    }
    desc = {"format": 2, "kind": "full", "tensors": {"t": huge}, "weight": 1.0}
    add_descriptor(a, canonical_json(desc).encode(), "bomb", remove_others=True)
    push(a, "a 4 GiB tensor of zeros in 128 KiB")
    proc, said = pull(v)
    assert proc.returncode == 0
    refused = crdt_error(v, "resolve", code=9)
    assert "resolving needs about" in refused
    # under a small claimed size: the 1 GiB bomb is larger than any encoding of 4096 bytes
    # (refused from the object header), a 16 MiB one (under 1 KiB) from its frame header
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    sizeless = store.put(cobj.compress(bytes(4096)) + cobj.flush())
    small_bomb = store.put(zstandard.ZstdCompressor(level=19).compress(bytes(2**24)))
    store.flush()
    for chunk, message in [
        (bomb, "holds 32786 bytes, more than 4096 can encode to"),
        (small_bomb, "the zstd frame declares 16777216 bytes, the descriptor 4096"),
        (sizeless, "the zstd frame declares no size, the descriptor 4096"),
    ]:
        small = dict(huge, bytes=4096, shape=[4096], chunks=[chunk])
        small["encoding"] = {"name": "planes-zstd", "sizes": [4096]}
        add_descriptor(
            a, canonical_json(dict(desc, tensors={"t": small})).encode(), "s", remove_others=True
        )
        assert message in crdt_error(a, "resolve", code=6)
    over = dict(huge, bytes=2**31, shape=[2**31], chunks=[bomb])
    over["encoding"] = {"name": "planes-zstd", "sizes": [2**31]}
    add_descriptor(
        a, canonical_json(dict(desc, tensors={"t": over})).encode(), "o", remove_others=True
    )
    assert "not whole elements up to the limit" in crdt_error(a, "resolve", code=6)
    assert_untouched(v, before, head, c, model)


# -- Bounded values ---------------------------------------------------------------------------
def test_out_of_range_weights_and_parameters_are_refused_everywhere(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    _, desc = honest_descriptor(a)
    desc["weight"] = 3e38
    add_descriptor(a, canonical_json(desc).encode(), "heavy")
    value = {"name": "karcher", "params": {"max_iter": 10**12}}
    set_register(Repo.open(a), "strategy", value)
    push(a, "huge weight, endless search")
    proc, said = pull(v)  # under the time cap: refused, not run
    assert proc.returncode == 0 and len(said) == 1, said
    verify = capped(["git", "crdt", "verify"], v)
    assert verify.returncode == 1
    assert "weight 3e+38 is outside" in verify.stderr
    assert "max_iter must be <= 1000" in verify.stderr
    crdt_error(v, "resolve", code=9)
    line = crdt_error(v, "strategy", "karcher", "--param", "tol=0", code=9)
    assert "tol must be in (0, 1]" in line
    crdt_error(v, "strategy", "ties", "--param", "density=2", code=9)
    line = crdt_error(v, "strategy", "evolutionary_merge", "--param", "generations=1e12", code=9)
    assert "must be an integer" in line
    big = "population_size=1000000000"
    line = crdt_error(v, "strategy", "evolutionary_merge", "--param", big, code=9)
    assert "population_size must be <= 256" in line
    m = random_model(tmp_path / "mine.safetensors", 8)
    crdt_error(v, "add-contribution", str(m), "--weight", "1e39", code=4)
    assert published(v) == model
    assert_untouched(v, before, head, c, model)


def test_a_weight_in_range_that_overflows_gives_an_error_not_infinities(tmp_path: Path) -> None:
    from helpers import new_repo

    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    m = random_model(tmp_path / "big.safetensors", 3, scale=1e33)
    crdt(repo, "add-contribution", str(m), "--weight", "1e6", "-q")
    crdt(repo, "strategy", "linear", "--param", "normalize=false")
    line = crdt_error(repo, "resolve", code=9)
    assert "non-finite values" in line
    assert not (repo / "merged").exists()


# -- Registers stay writable ------------------------------------------------------------------
def test_a_clock_at_the_limit_or_a_newline_in_a_register_locks_nothing(
    tmp_path: Path, origin: Path
) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    pin = {
        "clock": 2**53 - 1,
        "key": "strategy",
        "op": "set",
        "replica": "f" * 64,
        "value": {"name": "linear", "params": {"normalize": False}},
    }
    write_raw_manifest(a, [canonical_json(pin)])
    push(a, "pinned register")
    proc, said = pull(v)
    assert proc.returncode == 0
    for args in (("strategy", "linear"), ("output", "elsewhere"), ("output", "merged")):
        assert crdt(v, *args, check=False).returncode == 0
    status = json.loads(crdt(v, "status", "--json").stdout)
    assert status["strategy"] == {"name": "linear", "params": {}}
    assert status["output"] == "merged"
    git(v, "commit", "-q", "--no-verify", "-m", "registers")
    git(v, "push", "-q", "--no-verify", "origin", "HEAD:main")
    git(a, "pull", "-q", "--no-rebase", "--no-edit", "--no-verify", "origin", "main")
    head = git(v, "rev-parse", "HEAD").stdout.strip()
    before = snapshot(v, c)
    line = canonical_json(
        {"clock": 99, "key": "output", "op": "set", "replica": "e" * 16, "value": "x\n*"}
    )
    write_raw_manifest(a, [line])
    push(a, "newline in a register")
    proc, said = pull(v)
    assert proc.returncode == 0 and len(said) == 1 and "control or pattern" in said[0], said
    exclude = (v / ".git" / "info" / "exclude").read_text().splitlines()
    assert not [x for x in exclude if x.startswith("*") or x.startswith("/x")], exclude
    crdt_error(v, "status", code=5)
    assert_untouched(v, before, head, c, model)


# -- Displayed text is escaped ----------------------------------------------------------------
def test_pulled_names_and_messages_reach_no_terminal_raw(tmp_path: Path, origin: Path) -> None:
    a, v, c, before, head, model = start(origin, tmp_path)
    m = random_model(tmp_path / "odd.safetensors", 9)
    crdt(a, "add-contribution", str(m), "-n", "evil\u009b31m", "-m", "\x1b]2;owned\x07 hi", "-q")
    push(a, "subject \x1b[2J")
    proc, said = pull(v)
    assert proc.returncode == 0
    for args in (("log",), ("show", "evil\u009b31m"), ("list",), ("status",)):
        out = capped(["git", "crdt", *args], v)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stderr and "\x07" not in out.stderr and "\x9b" not in out.stderr
    assert "evil" in capped(["git", "crdt", "list"], v).stderr
    assert_untouched(v, before, head, c, model)


def test_log_of_an_unknown_revision_is_an_error(tmp_path: Path, origin: Path) -> None:
    v = clone(origin, tmp_path / "v")
    crdt_error(v, "log", "nope", code=8)


# -- Hypothesis: hostile descriptors and records ----------------------------------------------
@pytest.fixture(scope="module")
def honest_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import isolate_git, new_repo

    tmp = tmp_path_factory.mktemp("hypo")
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(tmp, mp)
        repo = new_repo(tmp / "repo")
        git(repo, "config", "crdt.autoResolve", "false")
        crdt(repo, "add-contribution", str(random_model(tmp / "m.safetensors", 5)), "-q")
        git(repo, "commit", "-q", "--no-verify", "-m", "one")
    return repo


def _mutations() -> st.SearchStrategy[tuple[str, Any]]:
    weird = st.one_of(
        st.floats(allow_nan=False),
        st.integers(-(2**70), 2**70),
        st.text(max_size=300),
        st.none(),
        st.booleans(),
        st.lists(st.integers(-3, 2**40), max_size=4),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    )
    file_names = st.one_of(
        st.sampled_from(
            [
                "model.safetensors",
                "resolution.json",
                ".hidden",
                "a/b",
                "x" * 300,
                "n\x00ul",
                "model.safetensors.index.json",
                "config.json",
                "..",
                "MODEL.SAFETENSORS",
            ]
        ),
        st.text(max_size=20),
    )
    return st.one_of(
        st.tuples(st.just("weight"), weird),
        st.tuples(st.just("shape"), weird),
        st.tuples(st.just("bytes"), weird),
        st.tuples(st.just("dtype"), weird),
        st.tuples(st.just("chunks"), st.integers(0, 5000)),
        st.tuples(st.just("file"), file_names),
        st.tuples(
            st.just("tensor_name"),
            st.one_of(st.just("__metadata__"), st.text(min_size=0, max_size=30)),
        ),
        st.tuples(st.just("nest"), st.integers(1, 5000)),
        st.tuples(st.just("drop"), st.sampled_from(["tensors", "format", "files", "kind"])),
    )


def _mutate(desc: dict[str, Any], chunk: str, how: str, value: Any, store: ObjectStore) -> bytes:
    tensors = desc.get("tensors")
    if not isinstance(tensors, dict) or not tensors:  # an earlier mutation dropped the table
        tensors = desc["tensors"] = {"t": {}}
    name = next(iter(tensors))
    info = tensors[name]
    if how in ("weight",):
        desc["weight"] = value
    elif how in ("shape", "bytes", "dtype"):
        info[how] = value
    elif how == "chunks":
        info["chunks"] = [chunk] * value
    elif how == "file":
        desc["files"] = {value: chunk}
    elif how == "tensor_name":
        desc["tensors"] = {value: info, **{k: v for k, v in desc["tensors"].items() if k != name}}
    elif how == "nest":
        return json.dumps(desc)[:-1].encode() + b',"x":' + b"[" * value + b"]" * value + b"}"
    elif how == "drop":
        desc.pop(value, None)
    try:
        return canonical_json(desc).encode()
    except ValueError:
        return json.dumps(desc, allow_nan=True).encode()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(_mutations(), min_size=1, max_size=3))
@example(mutations=[("file", "0")])  # a plain file name: written beside the model
@example(mutations=[("chunks", 0)])  # storage fields forged: same id, the cached model
def test_hostile_descriptors_give_one_line_errors_or_a_sound_model(
    honest_repo: Path, mutations: list[tuple[str, Any]]
) -> None:
    from git_crdt_merge.query.verify import verify
    from git_crdt_merge.resolution.resolve import resolve

    repo = Repo.open(honest_repo)
    saved = (honest_repo / ".crdt" / "manifest").read_bytes()
    before = snapshot(honest_repo)
    try:
        cid, desc = honest_descriptor(honest_repo)
        chunk = desc["tensors"]["layer.bias"]["chunks"][0]
        store = ObjectStore(honest_repo)
        data = b""
        for how, value in mutations:
            data = _mutate(desc, chunk, how, value, store)
            try:
                desc = json.loads(data)
            except (ValueError, RecursionError):
                break
        try:
            add_descriptor(honest_repo, data, "hostile", remove_others=True)
        except CrdtError:
            return
        report = verify(repo, None, resolvable=True)
        try:
            outcome = resolve(repo)
        except CrdtError as exc:
            assert "\n" not in str(exc)
            assert 1 <= exc.exit_code <= 10
        else:
            # resolved: then verify found nothing wrong, unless the set's root was cached (a
            # descriptor whose storage fields were forged keeps its content id, and the cache
            # serves the verified model of that id without reading it); and only the model's
            # files, its generated card and the descriptor's own files were written
            if not outcome.cache_hit:
                assert not report.problems, report.problems
            names = sorted(p.name for p in outcome.output.iterdir())
            assert "resolution.json" in names and "README.md" in names
            files = desc.get("files", {}) if isinstance(desc, dict) else {}
            assert all(
                n.endswith((".safetensors", ".json")) or n == "README.md" or n in files
                for n in names
            )
    finally:
        (honest_repo / ".crdt" / "manifest").write_bytes(saved)
        git(honest_repo, "add", ".crdt/manifest")
    after = snapshot(honest_repo)
    assert {k: v for k, v in after.items() if "manifest" not in k} == {
        k: v for k, v in before.items() if "manifest" not in k
    }


RECORD_FIELDS = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["add", "remove", "set"]),
        "clock": st.one_of(st.integers(-2, 2**60), st.floats(allow_nan=False)),
        "key": st.sampled_from(["output", "strategy", "base", "x"]),
        "value": st.one_of(
            st.text(max_size=40),
            st.sampled_from(["merged\n*", ".git/hooks", "a/.GIT/x", "m/../x", "m#x", "[ab]"]),
            st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
        ),
        "replica": st.sampled_from(["f" * 64, "0" * 16, "zz"]),
        "tag": st.sampled_from(["a" * 32, "b" * 32, "c"]),
        "observed": st.lists(st.sampled_from(["a" * 32, "d" * 32]), max_size=2),
        "id": st.sampled_from(["e" * 64, "nope"]),
        "name": st.text(max_size=30),
    }
)


FIELD_NAMES = ["op", "clock", "key", "value", "replica", "tag", "observed", "id", "name"]


@settings(max_examples=200, deadline=None)
@given(raw=RECORD_FIELDS, keep=st.sets(st.sampled_from(FIELD_NAMES)))
def test_hostile_records_are_refused_in_one_line_or_keep_registers_writable(
    raw: dict[str, Any], keep: set[str]
) -> None:
    obj = {k: v for k, v in raw.items() if k in keep | {"op"}}
    try:
        line = canonical_json(obj)
    except ValueError:
        return
    honest = canonical_json(
        {"clock": 1, "key": "output", "op": "set", "replica": "1" * 16, "value": "merged"}
    )
    data = "".join(f"{x}\n" for x in sorted({line, honest}, key=str.encode)).encode()
    try:
        state = Manifest.parse(data)
    except ManifestError as exc:
        assert "\n" not in str(exc)
        return
    # a valid state: every register stays writable, and the write wins
    for key, value in (("output", "mine"), ("strategy", {"name": "linear", "params": {}})):
        after = state.write_register(key, value, "0" * 16)
        assert after.register(key) == value
        assert after.write_register(key, "x" if key == "output" else value, "0" * 16)
    from git_crdt_merge.resolution.resolve import check_output_path

    out = state.output()
    check_output_path(Path("/nonexistent-root"), Path("/nonexistent-root") / out)
    assert "\n" not in out and "*" not in out and ".git" not in out.casefold().split("/")


def test_repair_drop_invalid_sets_inconsistent_records_aside() -> None:
    from git_crdt_merge.replicated.repair import repair_bytes

    good = add_record("a" * 32, "e" * 64, "m").line
    reused = add_record("a" * 32, "f" * 64, "other").line  # the same tag on another record
    orphan = remove_record("b" * 32, ["d" * 32]).line  # observes a tag no add has
    data = "".join(f"{x}\n" for x in sorted([good, reused, orphan], key=str.encode)).encode()
    with pytest.raises(ManifestError, match="--drop-invalid"):
        repair_bytes(data)
    result = repair_bytes(data, drop_invalid=True)
    kept = sorted([good, reused], key=str.encode)[0]  # the first in file order keeps the tag
    assert list(result.manifest.records) == [kept]
    assert sorted(result.invalid) == sorted({good, reused, orphan} - {kept})
    Manifest.parse(result.manifest.serialize())  # a valid state


def test_verify_reports_a_plugin_that_is_not_installed(honest_repo: Path) -> None:
    from git_crdt_merge.query.verify import verify

    repo = Repo.open(honest_repo)
    saved = (honest_repo / ".crdt" / "manifest").read_bytes()
    try:
        set_register(repo, "strategy", {"name": "dam", "params": {"objective": "nope"}})
        problems = [p.message for p in verify(repo, None, resolvable=True).problems]
        assert any("plugin 'nope' not found" in m for m in problems), problems
    finally:
        (honest_repo / ".crdt" / "manifest").write_bytes(saved)
        git(honest_repo, "add", ".crdt/manifest")


def test_a_manifest_over_the_record_limit_is_one_line_error() -> None:
    from git_crdt_merge.replicated.manifest import MAX_RECORDS

    line = add_record("a" * 32, "e" * 64, "m").line
    with pytest.raises(ManifestError, match=f"more than {MAX_RECORDS} records"):
        Manifest.parse((line + "\n").encode() * (MAX_RECORDS + 1))
