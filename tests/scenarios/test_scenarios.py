"""End-to-end scenarios with real git: clones of one origin, merges in every order.

Each scenario checks the promise of DESIGN.md: clones that hold the same contributions hold the
same manifest bytes and the same Merkle root, whatever the order of merges, rebases and
cherry-picks, and tensor objects never reach the working tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import crdt, descriptor_address, git, make_model, origin_copy

from git_crdt_merge.replicated.manifest import Manifest, join, set_record


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def origin(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of a bare origin holding one commit made by ``git crdt init``."""
    return origin_copy("init", tmp_path, tmp_path_factory)


def clone(origin: Path, dest: Path, *, install: bool = True, auto_resolve: bool = False) -> Path:
    git(dest.parent, "clone", "-q", str(origin), str(dest))
    if install:
        crdt(dest, "install", "-q")
    if not auto_resolve:
        git(dest, "config", "crdt.autoResolve", "false")
    return dest


def model(tmp: Path, seed: int, **kw: object) -> Path:
    return make_model(tmp / "models" / f"m{seed}.safetensors", seed, **kw)  # type: ignore[arg-type]


def add(repo: Path, path: Path, *extra: str, commit: bool = True) -> str:
    out = crdt(repo, "add-contribution", str(path), "--json", *extra).stdout
    cid = json.loads(out)["id"]
    if commit:
        git(repo, "commit", "-q", "-m", f"add {path.stem} {' '.join(extra)}".strip())
    return cid


def manifest(repo: Path) -> bytes:
    return (repo / ".crdt" / "manifest").read_bytes()


def status(repo: Path) -> dict:
    return json.loads(crdt(repo, "status", "--json").stdout)


def visible(repo: Path) -> list[str]:
    """Visible contribution ids of the work-tree manifest (what ``status`` shows)."""
    return [cid for cid, _ in Manifest.parse(manifest(repo)).visible_contributions()]


def peer(repo: Path, other: Path, name: str) -> None:
    git(repo, "remote", "add", name, str(other))


def peers(origin: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two installed clones, ``a`` and ``b``, each a remote of the other."""
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    peer(a, b, "b")
    peer(b, a, "a")
    return a, b


def merge_from(repo: Path, remote: str, branch: str = "main") -> None:
    """Merge what was last fetched from ``remote`` (a true merge, never a fast-forward)."""
    git(repo, "merge", "-q", "--no-edit", "--no-ff", f"{remote}/{branch}")


def object_blobs(repo: Path, rev: str = "HEAD") -> list[str]:
    out = git(repo, "ls-tree", "-r", "--name-only", rev, "--", ".crdt/objects").stdout
    return out.split()


def assert_clean(repo: Path) -> None:
    assert git(repo, "status", "--porcelain").stdout == ""
    assert not (repo / ".crdt" / "objects").exists()
    committed = git(repo, "show", "HEAD:.crdt/manifest").stdout.encode()
    assert committed == manifest(repo)
    Manifest.parse(manifest(repo))


def joined(*states: bytes) -> bytes:
    out = Manifest({})
    for s in states:
        out = join(out, Manifest.parse(s))
    return out.serialize()


# -- merges in every order ----------------------------------------------------------------------
def test_merging_in_both_directions_gives_identical_manifest_and_root(
    tmp_path: Path, origin: Path
) -> None:
    a, b = peers(origin, tmp_path)
    ida = add(a, model(tmp_path, 1))
    idb = add(b, model(tmp_path, 2))
    before_a, before_b = manifest(a), manifest(b)
    git(a, "fetch", "-q", "b")
    git(b, "fetch", "-q", "a")  # b sees a's state before a merges
    git(a, "merge", "-q", "--no-edit", "b/main")
    git(b, "merge", "-q", "--no-edit", "a/main")
    # two different merge commits, one state
    assert git(a, "rev-parse", "HEAD").stdout != git(b, "rev-parse", "HEAD").stdout
    assert manifest(a) == manifest(b) == joined(before_a, before_b)
    sa, sb = status(a), status(b)
    assert sa["merkle_root"] == sb["merkle_root"]
    assert sorted(visible(a)) == sorted([ida, idb])
    assert sorted(object_blobs(a)) == sorted(object_blobs(b))
    for r in (a, b):
        assert_clean(r)


def test_criss_cross_merge_with_two_merge_bases_gives_the_same_manifest(
    tmp_path: Path, origin: Path
) -> None:
    a, b = peers(origin, tmp_path)
    add(a, model(tmp_path, 1))
    add(b, model(tmp_path, 2))
    git(a, "fetch", "-q", "b")
    git(b, "fetch", "-q", "a")
    git(a, "merge", "-q", "--no-edit", "b/main")
    git(b, "merge", "-q", "--no-edit", "a/main")
    # each side moves on, so the next merge has the two earlier heads as merge bases
    add(a, model(tmp_path, 3))
    crdt(b, "output", "out-b")
    git(b, "commit", "-q", "-m", "output")
    add(b, model(tmp_path, 4))
    git(a, "fetch", "-q", "b")
    git(b, "fetch", "-q", "a")
    bases = git(a, "merge-base", "--all", "HEAD", "b/main").stdout.split()
    assert len(bases) == 2
    before_a, before_b = manifest(a), manifest(b)
    git(a, "merge", "-q", "--no-edit", "b/main")
    git(b, "merge", "-q", "--no-edit", "a/main")
    assert manifest(a) == manifest(b) == joined(before_a, before_b)
    assert len(status(a)["contributions"]) == 4
    assert status(a)["output"] == "out-b"
    assert status(a)["merkle_root"] == status(b)["merkle_root"]
    for r in (a, b):
        assert_clean(r)


def test_rebase_with_swapped_sides_joins_both_states(tmp_path: Path, origin: Path) -> None:
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    add(b, model(tmp_path, 2))
    git(b, "push", "-q", "origin", "main")
    ida1 = add(a, model(tmp_path, 1))
    ida3 = add(a, model(tmp_path, 3))
    git(a, "branch", "pre-rebase")
    before_a, before_b = manifest(a), manifest(b)
    git(a, "pull", "-q", "--rebase")
    # linear history: b's commit, then a's two commits replayed on top
    assert git(a, "rev-list", "--count", "--merges", "HEAD").stdout.strip() == "0"
    assert git(a, "rev-parse", "HEAD~2").stdout == git(b, "rev-parse", "HEAD").stdout
    assert manifest(a) == joined(before_a, before_b)
    # the replayed intermediate commit holds its own record on top of b's state
    mid = git(a, "show", "HEAD~1:.crdt/manifest").stdout.encode()
    assert [cid for cid, _ in Manifest.parse(mid).visible_contributions()] == sorted(
        [ida1, visible(b)[0]]
    )
    assert ida3 in visible(a)
    assert_clean(a)
    # merging instead of rebasing gives the same bytes
    rebased = manifest(a)
    git(a, "switch", "-q", "-c", "via-merge", "pre-rebase")
    git(a, "merge", "-q", "--no-edit", "origin/main")
    assert manifest(a) == rebased
    assert_clean(a)


def test_cherry_pick_with_swapped_sides_joins_both_states(tmp_path: Path, origin: Path) -> None:
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    ida = add(a, model(tmp_path, 1))
    git(b, "switch", "-q", "-c", "topic")
    idb = add(b, model(tmp_path, 2))
    git(b, "push", "-q", "origin", "topic")
    git(a, "fetch", "-q", "origin")
    before_a = manifest(a)
    git(a, "cherry-pick", "origin/topic")
    theirs = git(a, "show", "origin/topic:.crdt/manifest").stdout.encode()
    assert manifest(a) == joined(before_a, theirs)
    assert sorted(visible(a)) == sorted([ida, idb])
    assert set(object_blobs(b, "HEAD")) <= set(object_blobs(a))
    assert_clean(a)


# -- observed-remove semantics across clones ----------------------------------------------------
def test_concurrent_add_survives_a_concurrent_remove_of_the_same_contribution(
    tmp_path: Path, origin: Path
) -> None:
    a, b = peers(origin, tmp_path)
    m = model(tmp_path, 1)
    cid = add(a, m)
    crdt(a, "remove-contribution", "m1")
    git(a, "commit", "-q", "-m", "remove m1")
    assert visible(a) == []
    assert add(b, m) == cid  # b adds the same model concurrently, under its own tag
    git(a, "fetch", "-q", "b")
    git(b, "fetch", "-q", "a")
    merge_from(a, "b")
    merge_from(b, "a")
    assert visible(a) == visible(b) == [cid]
    assert manifest(a) == manifest(b)
    # the surviving tag is b's, which a's remove never observed
    survivor = Manifest.parse(manifest(a)).visible_adds()
    assert len(survivor) == 1
    assert survivor[0].line.encode() in git(b, "show", "HEAD~1:.crdt/manifest").stdout.encode()


def test_remove_that_travels_to_a_clone_and_back_never_resurrects(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    cid = add(a, model(tmp_path, 1))
    git(a, "push", "-q", "origin", "main")
    b = clone(origin, tmp_path / "b")
    assert visible(b) == [cid]
    crdt(b, "remove-contribution", cid[:12])
    git(b, "commit", "-q", "-m", "remove")
    git(b, "push", "-q", "origin", "main")
    # a still has the add and does unrelated work, then merges the remove in
    idz = add(a, model(tmp_path, 2))
    git(a, "pull", "-q", "--no-rebase")
    assert visible(a) == [idz]
    git(a, "push", "-q", "origin", "main")
    # the remove comes back to b through a's merge, and an old branch still holding the add
    # is merged again: the contribution stays removed everywhere
    git(b, "switch", "-q", "-c", "stale", "HEAD~1")
    add(b, model(tmp_path, 3))
    git(b, "switch", "-q", "main")
    git(b, "pull", "-q", "--no-rebase")
    git(b, "merge", "-q", "--no-edit", "stale")
    assert cid not in visible(b)
    git(a, "fetch", "-q", str(b), "main:from-b")
    git(a, "merge", "-q", "--no-edit", "from-b")
    assert cid not in visible(a)
    assert manifest(a) == manifest(b)
    for r in (a, b):
        assert_clean(r)


def test_same_model_added_in_two_clones_is_visible_once(tmp_path: Path, origin: Path) -> None:
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    m = model(tmp_path, 7)
    ida = add(a, m)
    idb = add(b, m, "--name", "other-name")
    assert ida == idb
    assert object_blobs(a) == object_blobs(b)
    git(a, "push", "-q", "origin", "main")
    git(b, "pull", "-q", "--no-rebase")
    rows = json.loads(crdt(b, "list", "--json").stdout)
    assert [r["id"] for r in rows] == [ida]
    assert len(Manifest.parse(manifest(b)).visible_adds()) == 2
    git(b, "push", "-q", "origin", "main")
    git(a, "pull", "-q")
    assert json.loads(crdt(a, "list", "--json").stdout) == rows
    assert_clean(a)
    assert_clean(b)


def test_concurrent_strategy_writes_resolve_to_the_same_winner_everywhere(
    tmp_path: Path, origin: Path
) -> None:
    a, b = peers(origin, tmp_path)
    crdt(a, "strategy", "linear", "-p", "normalize=false")
    git(a, "commit", "-q", "-m", "strategy a")
    crdt(b, "strategy", "linear", "-p", "normalize=true")
    git(b, "commit", "-q", "-m", "strategy b")
    rep_a = git(a, "config", "crdt.replica").stdout.strip()
    rep_b = git(b, "config", "crdt.replica").stdout.strip()
    assert rep_a != rep_b
    git(a, "fetch", "-q", "b")
    git(b, "fetch", "-q", "a")
    merge_from(a, "b")
    merge_from(b, "a")
    sa, sb = status(a), status(b)
    assert sa["strategy"] == sb["strategy"]
    # same Lamport clock on both sides: the greater replica id wins
    want = {"name": "linear", "params": {"normalize": rep_a < rep_b}}
    assert sa["strategy"] == want
    assert sa["merkle_root"] == sb["merkle_root"]
    assert manifest(a) == manifest(b)
    # a later write from either clone outranks both (Lamport clock 2)
    crdt(a, "output", "later")
    later = Manifest.parse(manifest(a))
    assert later.max_clock() == 2
    assert later.output() == "later"


# -- storage -------------------------------------------------------------------------------------
def test_tensor_shared_by_two_contributions_is_stored_once(tmp_path: Path, origin: Path) -> None:
    import numpy as np
    import torch

    frozen = torch.from_numpy(np.arange(64, dtype=np.float32).reshape(8, 8))
    m1 = model(tmp_path, 1, shapes={"a": (4, 4), "b": (3,)}, shared={"frozen": frozen})
    m2 = model(tmp_path, 2, shapes={"c": (5, 2), "d": (6,)}, shared={"frozen": frozen})
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    add(a, m1)
    add(b, m2)
    git(a, "push", "-q", "origin", "main")
    git(b, "pull", "-q", "--no-rebase")
    # 5 distinct tensors (one chunk each) + 2 descriptors
    blobs = object_blobs(b)
    assert len(blobs) == len(set(blobs)) == 7
    from git_crdt_merge.replicated.store import ObjectStore

    store = ObjectStore(b, rev="HEAD")
    descs = [json.loads(store.get(descriptor_address(b, cid))) for cid in visible(b)]
    frozen_chunks = {tuple(d["tensors"]["frozen"]["chunks"]) for d in descs}
    assert len(frozen_chunks) == 1
    assert b"".join(store.get(c) for c in frozen_chunks.pop()) == frozen.numpy().tobytes()
    assert_clean(b)


def test_switching_branches_never_writes_objects_into_the_work_tree(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    git(a, "switch", "-q", "-c", "feature")
    add(a, model(tmp_path, 1))
    git(a, "switch", "-q", "-c", "other", "main")
    add(a, model(tmp_path, 2))
    for branch in ("feature", "main", "other", "feature", "other"):
        git(a, "switch", "-q", branch)
        assert not (a / ".crdt" / "objects").exists()
        assert git(a, "status", "--porcelain").stdout == ""
        assert len(object_blobs(a)) == (0 if branch == "main" else 4)
    git(a, "checkout", "-q", "feature")
    git(a, "checkout", "-q", "HEAD", "--", ".")
    git(a, "merge", "-q", "--no-edit", "other")
    assert not (a / ".crdt" / "objects").exists()
    assert len(visible(a)) == 2
    assert_clean(a)
    ls = git(a, "ls-files", "-t", "--", ".crdt/objects").stdout.splitlines()
    assert len(ls) == 8 and all(line.startswith("S ") for line in ls)


def test_clone_then_install_then_pull_keeps_objects_out_of_the_work_tree(
    tmp_path: Path, origin: Path
) -> None:
    a = clone(origin, tmp_path / "a")
    ida = add(a, model(tmp_path, 1))
    git(a, "push", "-q", "origin", "main")
    # a plain clone materialises the objects before any of our hooks exists ...
    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(origin), str(b))
    assert (b / ".crdt" / "objects").is_dir()
    assert crdt(b, "doctor", check=False).returncode == 1
    # ... and install takes them out again (hooks stay on: they must never fail git)
    crdt(b, "install", "-q")
    assert not (b / ".crdt" / "objects").exists()
    assert git(b, "status", "--porcelain").stdout == ""
    doc = crdt(b, "doctor", "--json")
    assert json.loads(doc.stdout)["problems"] == []
    idc = add(a, model(tmp_path, 2))
    git(a, "push", "-q", "origin", "main")
    git(b, "pull", "-q")
    assert sorted(visible(b)) == sorted([ida, idc])
    assert not (b / ".crdt" / "objects").exists()
    assert git(b, "status", "--porcelain").stdout == ""
    assert manifest(a) == manifest(b)
    assert git(b, "fsck", "--strict", "--no-progress").returncode == 0


def test_doctor_reports_a_clone_without_install(tmp_path: Path, origin: Path) -> None:
    b = clone(origin, tmp_path / "b", install=False, auto_resolve=True)
    proc = crdt(b, "doctor", check=False)
    assert proc.returncode == 1
    assert "merge driver 'crdt' is not configured" in proc.stderr
    data = json.loads(crdt(b, "doctor", "--json", check=False).stdout)
    assert any("driver" in p for p in data["problems"])
    assert any("hooks missing" in p for p in data["problems"])
    crdt(b, "install", "-q")
    assert crdt(b, "doctor", check=False).returncode == 0


def test_hooks_never_fail_a_git_command_even_when_resolution_fails(
    tmp_path: Path, origin: Path
) -> None:
    """autoResolve stays on; the strategy names nothing the registry knows."""
    a = clone(origin, tmp_path / "a", auto_resolve=True)
    b = clone(origin, tmp_path / "b", auto_resolve=True)
    add(b, model(tmp_path, 2))
    git(b, "push", "-q", "origin", "main")
    m = Manifest.parse(manifest(a))
    bogus = set_record("strategy", {"name": "no_such_strategy", "params": {}}, 1, "e" * 16)
    (a / ".crdt" / "manifest").write_bytes(m.with_records([bogus]).serialize())
    git(a, "add", ".crdt/manifest")
    git(a, "commit", "-q", "-m", "bogus strategy")
    pull = git(a, "pull", "--no-rebase", "--no-edit")  # post-merge tries to resolve, fails
    assert "git-crdt" in pull.stderr
    git(a, "commit", "-q", "--amend", "--no-edit")  # post-commit and post-rewrite
    git(a, "switch", "-q", "--detach", "HEAD~1")  # post-checkout
    git(a, "switch", "-q", "main")
    assert len(status(a)["contributions"]) == 1
    assert status(a)["strategy"]["name"] == "no_such_strategy"
    assert not (a / "merged").exists() or not any((a / "merged").iterdir())
    assert_clean(a)
