"""Contribution identity from content (descriptor format 2): the id does not depend on the
chunk size, chunk size is a repository register, format-1 repositories keep their ids and
bytes, and a weight changes without storing any chunk again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import crdt, descriptor_address, git, new_repo

from git_crdt_merge.replicated.descriptor import content_id
from git_crdt_merge.replicated.manifest import add_record, canonical_json, set_record
from git_crdt_merge.replicated.repo import Repo, new_tag
from git_crdt_merge.replicated.store import ObjectStore, split_chunks

SHAPES = {"layer.0.weight": (64, 32), "layer.0.bias": (32,), "head.weight": (16, 64)}


def model(path: Path, seed: int) -> Path:
    """Random float32 weights (numpy's generator, not torch's)."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    tensors = {
        n: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for n, s in SHAPES.items()
    }
    save_file(tensors, str(path))
    return path


def add(repo: Path, src: Path, *args: str) -> dict[str, Any]:
    out = crdt(repo, "add-contribution", str(src), "--json", "-q", *args).stdout
    return dict(json.loads(out))


def staged_objects(repo: Path) -> set[str]:
    return set(git(repo, "ls-files", "--", ".crdt/objects").stdout.split())


def loose_objects(repo: Path) -> set[str]:
    root = repo / ".git" / "objects"
    return {p.parent.name + p.name for p in root.glob("[0-9a-f][0-9a-f]/*")}


def descriptor(repo: Path, cid: str) -> dict[str, Any]:
    return dict(json.loads(ObjectStore(repo).get(descriptor_address(repo, cid))))


def test_same_tensors_give_the_same_id_whatever_the_chunk_size(tmp_path: Path) -> None:
    src = model(tmp_path / "m.safetensors", 1)
    one = new_repo(tmp_path / "one")
    two = new_repo(tmp_path / "two")
    a = add(one, src, "--chunk-size", "100")
    b = add(two, src)  # the default, 64 MiB: one chunk per tensor
    assert a["id"] == b["id"]
    assert len(descriptor(one, a["id"])["tensors"]["head.weight"]["chunks"]) == 41
    assert len(descriptor(two, b["id"])["tensors"]["head.weight"]["chunks"]) == 1
    assert content_id(descriptor(one, a["id"])) == a["id"]
    # adding it again with a third chunk size stores nothing and keeps one contribution
    before = staged_objects(one)
    again = add(one, src, "--chunk-size", "333", "--name", "other")
    assert again["id"] == a["id"] and again["already_present"]
    assert again["new_objects"] == 0 and again["new_bytes"] == 0
    assert staged_objects(one) == before
    assert [c["id"] for c in json.loads(crdt(one, "list", "--json").stdout)] == [a["id"]]


def test_weight_and_metadata_are_part_of_the_identity(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    src = model(tmp_path / "m.safetensors", 2)
    plain = add(repo, src, "--name", "plain")
    one = add(repo, src, "--name", "one", "--weight", "1")  # "no weight" is weight 1.0
    assert one["id"] == plain["id"] and one["already_present"]
    heavy = add(repo, src, "--name", "heavy", "--weight", "2.5")
    assert heavy["id"] != plain["id"]


def test_chunk_size_is_a_register_every_clone_reads(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    shown = json.loads(crdt(repo, "chunk-size", "--json").stdout)
    assert shown == {"chunk_size": 64 * 1024 * 1024, "default": True}
    crdt(repo, "chunk-size", "1000")
    git(repo, "commit", "-q", "-am", "chunk size")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    crdt(clone, "install", "-q")
    assert json.loads(crdt(clone, "chunk-size", "--json").stdout) == {
        "chunk_size": 1000,
        "default": False,
    }
    res = add(clone, model(tmp_path / "m.safetensors", 3))
    desc = descriptor(clone, res["id"])
    assert desc["storage"] == {"chunk_size": 1000}
    sizes = [ObjectStore(clone).size(c) for c in desc["tensors"]["head.weight"]["chunks"]]
    assert sizes == [1000] * 4 + [96]
    # the override still applies, and does not change the id
    other = new_repo(tmp_path / "other")
    assert add(other, tmp_path / "m.safetensors", "--chunk-size", "4096")["id"] == res["id"]
    bad = crdt(repo, "chunk-size", "0", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_set_weight_writes_no_chunk_again(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    res = add(repo, model(tmp_path / "m.safetensors", 4), "--name", "m", "--chunk-size", "500")
    git(repo, "commit", "-q", "-m", "m")
    old_desc = descriptor(repo, res["id"])
    objects, loose = staged_objects(repo), loose_objects(repo)
    out = json.loads(crdt(repo, "set-weight", "m", "0.25", "--json").stdout)
    assert out["old"] == res["id"] and out["new"] != res["id"]
    new_desc = descriptor(repo, out["new"])
    assert new_desc["weight"] == 0.25
    assert new_desc["tensors"] == old_desc["tensors"]  # the same chunks, by id
    # exactly one new object (the descriptor), and no loose object but it and the manifest
    address = descriptor_address(repo, out["new"])
    assert staged_objects(repo) - objects == {f".crdt/objects/{address[:2]}/{address[2:]}"}
    shas = git(repo, "ls-files", "-s", "--", ".crdt/manifest", f".crdt/objects/{address[:2]}")
    wanted = {line.split()[1] for line in shas.stdout.splitlines()}
    assert loose_objects(repo) - loose <= wanted and len(loose_objects(repo) - loose) == 2
    listed = json.loads(crdt(repo, "list", "--json").stdout)
    assert [(c["name"], c["id"], c["weight"]) for c in listed] == [("m", out["new"], 0.25)]
    again = json.loads(crdt(repo, "set-weight", "m", "0.25", "--json").stdout)
    assert again["old"] == again["new"] == out["new"]
    assert crdt(repo, "verify", "--full").returncode == 0


# -- format 1 ----------------------------------------------------------------------------------
# Written by git-crdt before descriptor format 2 (commit ce0acef): three models from
# model(seed) for seeds 11 (the base, default chunk size), 12 ("a", weight 0.7) and 13 ("b"),
# both with --chunk-size 1000, and the sha256 of merged/model.safetensors it resolved to.
V1_BASE = "325c89ea6b12c67e0821ea2b10891a0a77cdba2f4b58a98defd3953934772e13"
V1_IDS = {
    "a": "120ce5c849f73dc6b58510f350678f4fa75521f153424383915e0193cc0f9c66",
    "b": "347af8710c87f378164b2d4c6d6da5ea369ea92b47aad3cc9acfabd6d117c74d",
}
V1_MERGED = {
    "linear": "a85c3a705639daa6114e9047c9274b8e99300e0972252e88bf14a0fb0e2fb10c",
    "dare_ties": "8a1e9d4ecc427b8e16d71237f805e93e1ece9272c0792c6f97eca9594187170f",
}
V1_ROOT_DARE = "8fc630663418174cf3efa1021743eaaa0e7b312b297109f431f5a769bda719ba"


def v1_descriptor(
    store: ObjectStore, src: Path, chunk_size: int, weight: float | None
) -> tuple[str, dict[str, Any]]:
    """Store ``src`` exactly as format 1 did; return (id = blake3 of the bytes, descriptor)."""
    from git_crdt_merge.replicated import formats

    tensors = {}
    for t in formats.iter_tensors(formats.discover(src)):
        chunks = [store.put(c) for c in split_chunks(t.data, chunk_size)]
        tensors[t.name] = {
            "bytes": len(t.data),
            "chunks": chunks,
            "dtype": t.dtype,
            "shape": t.shape,
        }
    desc: dict[str, Any] = {
        "files": {},
        "format": 1,
        "kind": "full",
        "metadata": {},
        "tensors": tensors,
    }
    if weight is not None:
        desc["weight"] = weight
    return store.put(canonical_json(desc).encode()), desc


@pytest.fixture
def v1_repo(tmp_path: Path) -> Path:
    repo = new_repo(tmp_path / "v1")
    git(repo, "config", "crdt.autoResolve", "false")
    r = Repo.open(repo)
    store = ObjectStore(repo)
    base, _ = v1_descriptor(store, model(tmp_path / "m0.safetensors", 11), 64 * 1024**2, None)
    a, _ = v1_descriptor(store, model(tmp_path / "m1.safetensors", 12), 1000, 0.7)
    b, _ = v1_descriptor(store, model(tmp_path / "m2.safetensors", 13), 1000, None)
    store.flush()
    records = [
        set_record("base", base, 1, "0" * 16),
        add_record(new_tag(), a, "a"),
        add_record(new_tag(), b, "b"),
    ]
    r.write_manifest(r.read_manifest().with_records(records))
    git(repo, "commit", "-q", "-m", "a format-1 repository")
    assert base == V1_BASE and {"a": a, "b": b} == V1_IDS
    return repo


def merged_sha(repo: Path) -> str:
    return hashlib.sha256((repo / "merged" / "model.safetensors").read_bytes()).hexdigest()


def test_format_1_repository_keeps_its_ids_and_resolves_to_the_same_bytes(v1_repo: Path) -> None:
    assert crdt(v1_repo, "verify", "--full").returncode == 0
    listed = json.loads(crdt(v1_repo, "list", "--json").stdout)
    assert {c["name"]: c["id"] for c in listed} == V1_IDS
    crdt(v1_repo, "resolve")
    assert merged_sha(v1_repo) == V1_MERGED["linear"]
    crdt(v1_repo, "strategy", "dare_ties", "--param", "density=0.5")
    crdt(v1_repo, "resolve")
    assert merged_sha(v1_repo) == V1_MERGED["dare_ties"]
    status = json.loads(crdt(v1_repo, "status", "--json").stdout)
    assert status["merkle_root"] == V1_ROOT_DARE and status["base"] == V1_BASE


def test_format_1_contribution_gets_a_new_weight_as_format_2_without_new_chunks(
    v1_repo: Path, tmp_path: Path
) -> None:
    objects = staged_objects(v1_repo)
    out = json.loads(crdt(v1_repo, "set-weight", "b", "2", "--json").stdout)
    assert out["old"] == V1_IDS["b"]
    desc = descriptor(v1_repo, out["new"])
    assert desc["format"] == 2 and desc["weight"] == 2.0
    assert len(staged_objects(v1_repo) - objects) == 1
    # the upgraded descriptor names the same content as a fresh format-2 add of that model
    fresh = new_repo(tmp_path / "fresh")
    assert add(fresh, tmp_path / "m2.safetensors", "--weight", "2")["id"] == out["new"]
    assert crdt(v1_repo, "verify", "--full").returncode == 0


def test_a_descriptor_that_does_not_match_its_id_is_refused(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    res = add(repo, model(tmp_path / "m.safetensors", 5), "--name", "m")
    r = Repo.open(repo)
    store = ObjectStore(repo)
    desc = descriptor(repo, res["id"])
    desc["weight"] = 9.0  # a claim the id does not cover
    forged = store.put(canonical_json(desc).encode())
    store.flush()
    crdt(repo, "remove-contribution", "m")
    record = add_record(new_tag(), res["id"], "forged", desc=forged)
    r.write_manifest(r.read_manifest().with_records([record]))
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 5 and f"describes contribution {content_id(desc)[:16]}" in proc.stderr
    assert "Traceback" not in proc.stderr
    rep = crdt(repo, "verify", "--json", check=False)
    assert rep.returncode == 1 and "does not describe this contribution" in rep.stdout


# -- merges --------------------------------------------------------------------------------------
def test_same_model_added_concurrently_with_two_chunk_sizes_is_one_contribution(
    tmp_path: Path,
) -> None:
    origin = new_repo(tmp_path / "origin")
    clones = {}
    for side in ("a", "b"):
        clones[side] = tmp_path / side
        git(tmp_path, "clone", "-q", str(origin), str(clones[side]))
        crdt(clones[side], "install", "-q")
    a, b = clones["a"], clones["b"]
    shared = model(tmp_path / "shared.safetensors", 6)
    add(a, shared, "--name", "shared", "--chunk-size", "700")
    add(a, model(tmp_path / "ma.safetensors", 7), "--name", "ma")
    git(a, "commit", "-q", "-m", "a")
    add(b, shared, "--name", "shared", "--chunk-size", "1500")
    add(b, model(tmp_path / "mb.safetensors", 8), "--name", "mb", "--weight", "0.5")
    git(b, "commit", "-q", "-m", "b")
    git(a, "remote", "add", "b", str(b))
    git(b, "remote", "add", "a", str(a))
    git(a, "fetch", "-q", "b")
    git(b, "fetch", "-q", "a")
    git(a, "merge", "-q", "--no-edit", "b/main")
    git(b, "merge", "-q", "--no-edit", "a/main")
    manifest_a = (a / ".crdt" / "manifest").read_bytes()
    assert manifest_a == (b / ".crdt" / "manifest").read_bytes()
    listed = json.loads(crdt(a, "list", "--json").stdout)
    assert sorted(c["name"] for c in listed) == ["ma", "mb", "shared"]  # counted once
    for repo in (a, b):
        assert crdt(repo, "verify", "--full").returncode == 0
        crdt(repo, "resolve", "-q")
    assert (a / "merged" / "model.safetensors").read_bytes() == (
        b / "merged" / "model.safetensors"
    ).read_bytes()


def test_full_verify_finds_chunks_that_are_not_the_content_the_id_names(tmp_path: Path) -> None:
    """Chunk lists are outside the id, so a forged descriptor could list other bytes under a
    genuine id: ``verify --full`` hashes each tensor's chunks against its content hash."""
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    one = add(repo, model(tmp_path / "one.safetensors", 9), "--name", "one")
    two = add(repo, model(tmp_path / "two.safetensors", 10), "--name", "two")
    forged = descriptor(repo, one["id"])
    other = descriptor(repo, two["id"])
    forged["tensors"]["head.weight"]["chunks"] = other["tensors"]["head.weight"]["chunks"]
    assert content_id(forged) == one["id"]
    r = Repo.open(repo)
    store = ObjectStore(repo)
    address = store.put(canonical_json(forged).encode())
    store.flush()
    crdt(repo, "remove-contribution", "one")
    record = add_record(new_tag(), one["id"], "one", desc=address)
    r.write_manifest(r.read_manifest().with_records([record]))
    assert crdt(repo, "verify").returncode == 0  # sizes and objects all check out
    full = crdt(repo, "verify", "--full", "--json", check=False)
    assert full.returncode == 1
    problems = json.loads(full.stdout)["problems"]
    assert [p["kind"] for p in problems] == ["corrupt-object"]
    assert "'head.weight' does not match the content hash" in problems[0]["message"]


def test_manifest_fields_of_format_2_are_validated() -> None:
    from git_crdt_merge.errors import ManifestError
    from git_crdt_merge.replicated.manifest import Manifest, parse_record

    cid, desc = "1" * 64, "2" * 64
    rec = add_record("a" * 32, cid, "m", desc=desc)
    assert rec.fields["desc"] == desc
    assert "desc" not in add_record("a" * 32, cid, "m", desc=cid).fields  # format 1: id = address
    state = Manifest(
        {r.line: r for r in [rec, set_record("base", {"desc": desc, "id": cid}, 1, "0" * 16)]}
    )
    assert state.base() == cid and state.descriptor_address(cid) == desc
    assert state.chunk_size() is None
    for bad in (
        '{"desc":"xyz","id":"' + cid + '","name":"m","op":"add","tag":"' + "a" * 32 + '"}',
        '{"clock":1,"key":"chunk_size","op":"set","replica":"' + "0" * 16 + '","value":0}',
        '{"clock":1,"key":"chunk_size","op":"set","replica":"' + "0" * 16 + '","value":true}',
        '{"clock":1,"key":"base","op":"set","replica":"'
        + "0" * 16
        + '","value":{"id":"'
        + cid
        + '"}}',
    ):
        with pytest.raises(ManifestError):
            parse_record(bad)
