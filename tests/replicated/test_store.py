"""Ingest and the object store: tensors go in as git blobs and come back byte for byte."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch
from helpers import crdt, descriptor_address, git, make_model
from safetensors.torch import save_file

from git_crdt_merge.replicated.descriptor import content_id
from git_crdt_merge.replicated.store import ObjectStore, object_path


def file_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """The tensors of a safetensors file, read with nothing but the format spec."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    header.pop("__metadata__", None)
    data = raw[8 + hlen :]
    return {
        name: (
            info["dtype"],
            info["shape"],
            data[info["data_offsets"][0] : info["data_offsets"][1]],
        )
        for name, info in header.items()
    }


def stored_tensors(
    repo: Path, cid: str, rev: str | None = None
) -> dict[str, tuple[str, list[int], bytes]]:
    store = ObjectStore(repo, rev=rev)
    desc = json.loads(store.get(descriptor_address(repo, cid), verify=True))
    out = {}
    for name, info in desc["tensors"].items():
        chunks = [store.get(oid, verify=True) for oid in info["chunks"]]
        assert info["bytes"] == sum(len(c) for c in chunks)
        out[name] = (info["dtype"], info["shape"], b"".join(chunks))
    return out


def add_json(repo: Path, path: Path, *args: str) -> dict:
    return json.loads(crdt(repo, "add-contribution", str(path), "--json", *args).stdout)


def varied_model(path: Path) -> Path:
    """Several dtypes, a scalar and an empty tensor."""
    tensors = {
        "w.f32": torch.from_numpy(np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8)),
        "w.bf16": torch.linspace(-3, 3, 20).to(torch.bfloat16).reshape(4, 5),
        "w.f16": torch.linspace(0, 1, 7).to(torch.float16),
        "steps": torch.tensor([1, -2, 3], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"source": "test"})
    return path


def test_single_file_tensors_round_trip_byte_exactly(repo: Path, tmp_path: Path) -> None:
    src = varied_model(tmp_path / "varied.safetensors")
    res = add_json(repo, src)
    assert res["name"] == "varied" and res["tensors"] == 7 and not res["already_present"]
    expected = file_tensors(src)
    assert stored_tensors(repo, res["id"]) == expected
    assert res["bytes"] == sum(len(b) for _, _, b in expected.values())
    address = descriptor_address(repo, res["id"])
    desc = json.loads(ObjectStore(repo).get(address))
    assert desc["kind"] == "full" and desc["metadata"] == {"source": "test"}
    # the id comes from the content; the descriptor is stored under the blake3 of its bytes,
    # and it is committed like every object
    assert content_id(desc) == res["id"]
    assert blake3.blake3(ObjectStore(repo).get(address)).hexdigest() == address
    git(repo, "commit", "-q", "-m", "add")
    assert stored_tensors(repo, res["id"], rev="HEAD") == expected


def test_hf_directory_with_model_safetensors_round_trips(repo: Path, tmp_path: Path) -> None:
    d = tmp_path / "hf-model"
    src = make_model(d / "model.safetensors", 3)
    config = b'{"architectures": ["Tiny"], "hidden_size": 16}\n'
    (d / "config.json").write_bytes(config)
    (d / "tokenizer.json").write_bytes(b'{"version": "1.0"}')
    (d / "README.md").write_text("kept: the folder's non-weight files travel with it")
    (d / "modeling_tiny.py").write_text("raise SystemExit  # code: kept only with --include-code")
    res = add_json(repo, d)
    assert res["name"] == "hf-model"
    assert stored_tensors(repo, res["id"]) == file_tensors(src)
    store = ObjectStore(repo)
    files = json.loads(store.get(descriptor_address(repo, res["id"])))["files"]
    assert sorted(files) == ["README.md", "config.json", "tokenizer.json"]
    assert store.get(files["config.json"], verify=True) == config


def test_sharded_directory_with_an_index_round_trips(repo: Path, tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    s1 = make_model(
        d / "model-00001-of-00002.safetensors",
        4,
        shapes={"embed.weight": (10, 8), "layer.0.weight": (8, 8)},
    )
    s2 = make_model(
        d / "model-00002-of-00002.safetensors",
        5,
        shapes={"layer.1.weight": (8, 8), "head.weight": (3, 8)},
    )
    weight_map = {name: s.name for s in (s1, s2) for name in file_tensors(s)}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    res = add_json(repo, d)
    assert res["tensors"] == 4
    assert stored_tensors(repo, res["id"]) == file_tensors(s1) | file_tensors(s2)


def test_small_chunk_size_splits_and_reassembles_exactly(repo: Path, tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.safetensors", 6, shapes={"big": (8, 16), "small": (3,)})
    res = add_json(repo, src, "--chunk-size", "100")
    store = ObjectStore(repo)
    desc = json.loads(store.get(descriptor_address(repo, res["id"])))
    big = desc["tensors"]["big"]["chunks"]
    assert len(big) == 6  # 512 bytes in chunks of at most 100
    chunks = [store.get(oid) for oid in big]
    assert [len(c) for c in chunks] == [100] * 5 + [12]
    assert all(blake3.blake3(c).hexdigest() == oid for c, oid in zip(chunks, big, strict=True))
    assert len(desc["tensors"]["small"]["chunks"]) == 1
    assert stored_tensors(repo, res["id"]) == file_tensors(src)


def test_objects_are_git_blobs_staged_outside_the_work_tree(repo: Path, tmp_path: Path) -> None:
    res = add_json(repo, make_model(tmp_path / "m.safetensors", 7))
    assert not (repo / ".crdt" / "objects").exists()
    staged = git(repo, "status", "--porcelain").stdout.splitlines()
    assert sorted(staged) == sorted(
        ["M  .crdt/manifest"]
        + [f"A  {p}" for p in git(repo, "ls-files", "--", ".crdt/objects").stdout.split()]
    )
    git(repo, "commit", "-q", "-m", "add")
    assert git(repo, "status", "--porcelain").stdout == ""
    assert not (repo / ".crdt" / "objects").exists()
    tree = git(repo, "ls-tree", "-r", "--name-only", "HEAD", "--", ".crdt/objects").stdout.split()
    address = descriptor_address(repo, res["id"])
    assert object_path(address) in tree
    assert len(tree) == 4  # three tensors and the descriptor
    # git itself reads our directly written loose objects, and fsck accepts them
    blob = git(repo, "cat-file", "blob", f"HEAD:{object_path(address)}").stdout.encode()
    assert blake3.blake3(blob).hexdigest() == address
    assert git(repo, "fsck", "--strict", "--no-progress").returncode == 0
    assert all(
        line.startswith("S ")
        for line in git(repo, "ls-files", "-t", "--", ".crdt/objects").stdout.splitlines()
    )


def test_adding_the_same_model_twice_writes_nothing_new(repo: Path, tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.safetensors", 8)
    first = add_json(repo, src)
    manifest = (repo / ".crdt" / "manifest").read_bytes()
    again = add_json(repo, src)
    assert again["id"] == first["id"]
    assert again["already_present"] is True
    assert again["new_objects"] == 0 and again["new_bytes"] == 0
    assert (repo / ".crdt" / "manifest").read_bytes() == manifest


def test_weight_changes_the_contribution_id_but_not_the_tensor_objects(
    repo: Path, tmp_path: Path
) -> None:
    src = make_model(tmp_path / "m.safetensors", 9)
    a = add_json(repo, src, "--name", "a")
    b = add_json(repo, src, "--name", "b", "--weight", "2")
    assert a["id"] != b["id"]
    assert b["new_objects"] == 1  # only the descriptor
    assert json.loads(ObjectStore(repo).get(descriptor_address(repo, b["id"])))["weight"] == 2.0


# -- pickled checkpoints -------------------------------------------------------------------------
def state_dict() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "fc.bias": torch.tensor([0.5, -0.5, 1.5], dtype=torch.float16),
    }


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickled_checkpoint_is_refused_without_allow_pickle(
    repo: Path, tmp_path: Path, suffix: str
) -> None:
    src = tmp_path / f"ckpt{suffix}"
    torch.save(state_dict(), src)
    before = (repo / ".crdt" / "manifest").read_bytes()
    proc = crdt(repo, "add-contribution", str(src), check=False)
    assert proc.returncode == 4
    assert "pickled checkpoints can run code" in proc.stderr
    assert "--allow-pickle" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (repo / ".crdt" / "manifest").read_bytes() == before


def test_pickled_checkpoint_is_stored_with_allow_pickle(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    sd = state_dict()
    torch.save(sd, src)
    res = add_json(repo, src, "--allow-pickle")
    assert res["tensors"] == 2
    got = stored_tensors(repo, res["id"])
    assert got == {
        "fc.weight": ("F32", [3, 4], sd["fc.weight"].numpy().tobytes()),
        "fc.bias": ("F16", [3], sd["fc.bias"].numpy().tobytes()),
    }


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def test_allow_pickle_still_refuses_code_in_the_pickle(repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    src.write_bytes(pickle.dumps({"w": _Exploit(marker)}))
    before = (repo / ".crdt" / "manifest").read_bytes()
    proc = crdt(repo, "add-contribution", str(src), "--allow-pickle", check=False)
    assert proc.returncode == 4
    assert "weights_only=True" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert (repo / ".crdt" / "manifest").read_bytes() == before
