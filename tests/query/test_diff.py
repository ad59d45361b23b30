"""``git crdt diff`` and ``git crdt show`` on real repositories."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import crdt, git, make_model, new_repo
from safetensors.numpy import save_file

SHAPES = {"layer.weight": (6, 5), "layer.bias": (6,)}


_TEMPLATE: dict[str, Path] = {}


def _build(tmp: Path) -> Path:
    r = new_repo(tmp / "repo")
    git(r, "config", "crdt.autoResolve", "false")  # hooks stay cheap: no torch import
    for i in range(3):
        make_model(tmp / f"m{i}.safetensors", i, SHAPES)
    crdt(r, "set-base", str(tmp / "m0.safetensors"), "-q")
    crdt(r, "add-contribution", str(tmp / "m1.safetensors"), "-n", "one", "-q")
    git(r, "commit", "-q", "-m", "add one")
    crdt(r, "add-contribution", str(tmp / "m2.safetensors"), "-n", "two", "-q", "-m", "hi")
    crdt(r, "strategy", "task_arithmetic", "--param", "lambda=0.5")
    return r


@pytest.fixture
def two(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo with base + 'one' committed, and 'two' plus a strategy change in the work tree
    (built once, copied for each test)."""
    if "two" not in _TEMPLATE:
        _TEMPLATE["two"] = _build(tmp_path_factory.mktemp("diff-template"))
    return Path(shutil.copytree(_TEMPLATE["two"], tmp_path / "repo", symlinks=True))


def test_state_diff_lists_added_removed_and_register_changes(two: Path) -> None:
    ids = {c["name"]: c["id"] for c in json.loads(crdt(two, "list", "--json").stdout)}
    data = json.loads(crdt(two, "diff", "--json").stdout)  # HEAD -> work tree
    assert (data["a"], data["b"]) == ("HEAD", "work tree")
    assert data["added"] == [{"id": ids["two"], "name": "two"}]
    assert data["removed"] == []
    assert data["registers"] == [
        {
            "key": "strategy",
            "a": {"name": "linear", "params": {}},
            "b": {"name": "task_arithmetic", "params": {"lambda": 0.5}},
        }
    ]
    status = json.loads(crdt(two, "status", "--json").stdout)
    assert data["merkle_root_b"] == status["merkle_root"]
    assert data["merkle_root_a"] != data["merkle_root_b"]

    git(two, "commit", "-q", "-m", "add two")
    crdt(two, "remove-contribution", "one")
    git(two, "commit", "-q", "-m", "remove one")
    back = json.loads(crdt(two, "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert back["removed"] == [{"id": ids["one"], "name": "one"}]
    assert back["added"] == [] and back["registers"] == []
    first = json.loads(crdt(two, "diff", "HEAD~3", "HEAD~2", "--json").stdout)
    assert first["added"] == [{"id": ids["one"], "name": "one"}]
    assert [r["key"] for r in first["registers"]] == ["base"]

    human = crdt(two, "diff", "HEAD~2", "HEAD").stderr
    assert f"- {ids['one'][:12]}  one" in human
    assert f"+ {ids['two'][:12]}  two" in human
    assert "strategy:" in human
    assert "no difference" in crdt(two, "diff", "HEAD", "HEAD").stderr


def test_diff_before_the_first_commit_compares_with_the_empty_set(tmp_path: Path) -> None:
    r = new_repo(tmp_path / "fresh", init_crdt=False)
    crdt(r, "init", "-q")
    make_model(tmp_path / "m.safetensors", 1, SHAPES)
    crdt(r, "add-contribution", str(tmp_path / "m.safetensors"), "-n", "m", "-q")
    data = json.loads(crdt(r, "diff", "--json").stdout)
    assert [c["name"] for c in data["added"]] == ["m"] and data["removed"] == []


def test_diff_unknown_revision_is_not_found(two: Path) -> None:
    proc = crdt(two, "diff", "no-such-rev", check=False)
    assert proc.returncode == 8
    assert proc.stderr.startswith("git-crdt: error: unknown revision 'no-such-rev'")
    assert len(proc.stderr.splitlines()) == 1


def _reference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return {
        "l2": math.sqrt(math.fsum((a64 - b64) ** 2)),
        "cosine": math.fsum(a64 * b64) / math.sqrt(math.fsum(a64 * a64) * math.fsum(b64 * b64)),
        "max_abs": float(np.abs(a64 - b64).max()),
        "changed": float(np.mean(a != b)),
    }


def test_tensor_diff_between_files_matches_a_float64_reference(tmp_path: Path) -> None:
    r = new_repo(tmp_path / "repo")
    rng = np.random.default_rng(7)
    a = {"w": rng.standard_normal((64, 33)).astype(np.float32), "k": np.arange(5, dtype=np.int64)}
    b = {"w": a["w"].copy(), "k": a["k"].copy(), "only_b": np.ones(3, np.float32)}
    b["w"][::3] += rng.standard_normal((22, 33)).astype(np.float32)
    b["k"][1] = 9
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    data = json.loads(
        crdt(
            r,
            "diff",
            "--tensors",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            "--json",
        ).stdout
    )
    rows = {row["name"]: row for row in data["tensors"]}
    assert list(rows) == ["k", "only_b", "w"]
    assert rows["only_b"]["status"] == "only in b"
    for name in ("w", "k"):
        ref = _reference(a[name], b[name])
        for key, value in ref.items():
            assert rows[name][key] == pytest.approx(value, rel=1e-12, abs=1e-15), (name, key)
    assert rows["w"]["changed"] == pytest.approx(22 / 64)
    assert rows["k"]["changed_elements"] == 1
    total = data["total"]
    assert total["elements"] == 64 * 33 + 5
    assert total["tensors_differing"] == 3
    assert total["l2"] == pytest.approx(math.hypot(rows["w"]["l2"], rows["k"]["l2"]))


def test_tensor_diff_of_identical_models_is_zero_and_cosine_one(two: Path) -> None:
    git(two, "commit", "-q", "-m", "two")
    crdt(two, "strategy", "linear")
    crdt(two, "remove-contribution", "two")
    git(two, "commit", "-q", "-m", "linear of one")
    # the merged model of HEAD (linear average of 'one' alone) is 'one' itself
    data = json.loads(crdt(two, "diff", "--tensors", "one", "HEAD", "--json").stdout)
    assert data["total"]["l2"] == 0.0 and data["total"]["tensors_differing"] == 0
    for row in data["tensors"]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-15)
        assert row["max_abs"] == 0.0 and row["changed"] == 0.0


def test_tensor_diff_between_revisions_resolves_each_state(two: Path) -> None:
    git(two, "commit", "-q", "-m", "two, task arithmetic")
    data = json.loads(crdt(two, "diff", "--tensors", "HEAD~1", "HEAD", "--json").stdout)
    assert data["a"] == "merged model of HEAD~1" and data["b"] == "merged model of HEAD"
    assert {row["name"] for row in data["tensors"]} == set(SHAPES)
    assert all(row["status"] == "compared" and row["l2"] > 0 for row in data["tensors"])
    # HEAD's merged model is the one 'resolve' publishes in merged/: distance 0
    crdt(two, "resolve", "-q")
    same = json.loads(crdt(two, "diff", "--tensors", "HEAD", "merged", "--json").stdout)
    assert same["total"]["l2"] == 0.0
    table = crdt(two, "diff", "--tensors", "one", "base").stderr
    assert "L2 distance" in table and "layer.weight" in table and "cosine" in table


def test_tensor_diff_of_an_unknown_name_is_not_found(two: Path) -> None:
    proc = crdt(two, "diff", "--tensors", "nobody", "one", check=False)
    assert proc.returncode == 8
    assert "is not a contribution, a file or folder, or a revision" in proc.stderr


def test_show_gives_descriptor_tensors_and_the_commit_that_added_it(two: Path) -> None:
    data = json.loads(crdt(two, "show", "one", "--json").stdout)
    assert data["role"] == "contribution" and data["name"] == "one"
    assert data["kind"] == "full" and data["weight"] == 1.0
    assert [t["name"] for t in data["tensors"]] == ["layer.bias", "layer.weight"]
    assert data["tensors"][1] == {
        "name": "layer.weight",
        "dtype": "F32",
        "shape": [6, 5],
        "bytes": 120,
        "chunks": 1,
        "encoding": "raw",
    }
    assert data["total_bytes"] == 144 and data["parameters"] == 36
    (added,) = data["added_by"]
    assert added["commit"] == git(two, "rev-parse", "HEAD").stdout.strip()
    assert added["subject"] == "add one"
    assert added["author"] == "Test User <test@example.com>"
    by_id = json.loads(crdt(two, "show", data["id"][:10], "--json").stdout)
    assert by_id == data

    pending = json.loads(crdt(two, "show", "two", "--json").stdout)
    assert pending["added_by"][0]["commit"] is None
    assert pending["added_by"][0]["message"] == "hi"
    base = json.loads(crdt(two, "show", "base", "--json").stdout)
    assert base["role"] == "base" and base["added_by"] == []

    human = crdt(two, "show", "one").stderr
    assert "contribution one" in human and data["id"] in human
    assert "layer.weight" in human and "6x5" in human and "'add one'" in human


def test_show_unknown_name_is_not_found(two: Path) -> None:
    proc = crdt(two, "show", "nobody", check=False)
    assert proc.returncode == 8
    assert "no visible contribution named 'nobody'" in proc.stderr
