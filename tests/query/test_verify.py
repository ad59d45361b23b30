"""``git crdt verify`` and the verifying hooks: every kind of damage is found, named with its fix,
listed in ``--json``, and blocks a commit, merge or push; a sound state passes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import crdt, descriptor_address, git, make_model, new_repo

from git_crdt_merge import errors
from git_crdt_merge.query.verify import verify
from git_crdt_merge.replicated import reader
from git_crdt_merge.replicated.descriptor import content_id
from git_crdt_merge.replicated.manifest import Manifest, add_record, set_record
from git_crdt_merge.replicated.repo import Repo, new_tag
from git_crdt_merge.replicated.store import ObjectStore, object_path


def add(repo: Path, tmp: Path, seed: int, **kw: object) -> str:
    src = make_model(tmp / "models" / f"m{seed}.safetensors", seed, **kw)  # type: ignore[arg-type]
    return str(json.loads(crdt(repo, "add-contribution", str(src), "--json").stdout)["id"])


def report(repo: Path, *args: str) -> tuple[int, dict]:
    """What ``git crdt verify --json ARGS`` reports, computed in-process (the same function;
    the CLI itself is run in the tests that check codes and rendering)."""
    rev: str | None = ":" if "--staged" in args else None
    if "--rev" in args:
        rev = args[args.index("--rev") + 1]
    rep = verify(Repo.open(repo), rev, full="--full" in args, resolvable=True)
    return (1 if rep.problems else 0), json.loads(json.dumps(rep.as_dict()))


def kinds(data: dict) -> list[str]:
    return [p["kind"] for p in data["problems"]]


def chunk_of(repo: Path, cid: str) -> str:
    desc = json.loads(ObjectStore(repo).get(descriptor_address(repo, cid)))
    return str(sorted(desc["tensors"].values(), key=lambda t: t["bytes"])[-1]["chunks"][0])


def replace_object(repo: Path, oid: str, data: bytes) -> None:
    """Point the index entry of ``oid`` at a blob with other bytes (a hostile or broken tree)."""
    sha = (
        subprocess.run(
            ["git", "hash-object", "-w", "--stdin"], cwd=repo, input=data, capture_output=True
        )
        .stdout.decode()
        .strip()
    )
    git(repo, "update-index", "--cacheinfo", f"100644,{sha},{object_path(oid)}")


_TEMPLATE: dict[str, Path] = {}


@pytest.fixture
def two(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A private copy of a repository with two committed contributions (built once)."""
    if "two" not in _TEMPLATE:
        tmp = tmp_path_factory.mktemp("verify-template")
        repo = new_repo(tmp / "repo")
        git(repo, "config", "crdt.autoResolve", "false")
        add(repo, tmp, 1)
        add(repo, tmp, 2)
        git(repo, "commit", "-q", "-m", "two")
        _TEMPLATE["two"] = repo
    repo = Path(shutil.copytree(_TEMPLATE["two"], tmp_path / "repo", symlinks=True))
    git(repo, "update-index", "-q", "--refresh", check=False)
    ids = [cid for cid, _ in Repo.open(repo).read_manifest().visible_contributions()]
    return repo, ids


def test_sound_state_passes_in_every_mode(two: tuple[Path, list[str]]) -> None:
    repo, ids = two
    for args in ([], ["--staged"], ["--rev", "HEAD"], ["--full"], ["--rev", "HEAD", "--full"]):
        code, data = report(repo, *args)
        assert (code, data["ok"], data["problems"]) == (0, True, []), args
        assert data["contributions"] == 2
        assert data["objects"] == 8  # 2 descriptors + 3 tensors each
    assert report(repo, "--full")[1]["bytes_hashed"] > 0
    human = crdt(repo, "verify", "--full")
    assert "ok: work tree, 2 contributions, 8 objects" in human.stderr
    cli = json.loads(crdt(repo, "verify", "--json", "--rev", "HEAD").stdout)
    assert cli["ok"] and cli["state"].startswith("revision ") and cli["objects"] == 8


def test_usage_and_unknown_revision_have_documented_codes(two: tuple[Path, list[str]]) -> None:
    repo, _ = two
    proc = crdt(repo, "verify", "--staged", "--rev", "HEAD", check=False)
    assert proc.returncode == errors.UsageError.exit_code
    proc = crdt(repo, "verify", "--rev", "no-such-branch", check=False)
    assert proc.returncode == errors.NotFoundError.exit_code
    assert proc.stderr.strip().splitlines() == ["git-crdt: error: no commit 'no-such-branch'"]


def test_substituted_object_of_another_size_is_found_fast_and_by_hash(
    two: tuple[Path, list[str]],
) -> None:
    repo, ids = two
    oid = chunk_of(repo, ids[0])
    replace_object(repo, oid, b"not the tensor")
    code, data = report(repo, "--staged")
    assert code == 1 and kinds(data) == ["corrupt-object"]
    assert "truncated or substituted" in data["problems"][0]["message"]
    code, data = report(repo, "--staged", "--full")
    assert "does not match its blake3 name" in json.dumps(data)
    assert data["problems"][0]["fix"].startswith("re-run 'git crdt add-contribution'")


def test_tampered_object_of_the_same_size_is_found_by_full(two: tuple[Path, list[str]]) -> None:
    repo, ids = two
    oid = chunk_of(repo, ids[1])
    size = ObjectStore(repo).size(oid)
    assert size
    replace_object(repo, oid, b"\x00" * size)
    assert report(repo, "--staged")[0] == 0  # sizes agree: only the hash can tell
    code, data = report(repo, "--staged", "--full")
    assert code == 1
    assert [p["message"] for p in data["problems"]] == [
        f"object {oid[:16]} does not match its blake3 name"
    ]


def test_truncated_loose_object_is_reported_not_raised(two: tuple[Path, list[str]]) -> None:
    repo, ids = two
    sha = ObjectStore(repo).sha_of(chunk_of(repo, ids[0]))
    assert sha
    path = repo / ".git" / "objects" / sha[:2] / sha[2:]
    raw = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(raw[: len(raw) // 2])
    code, data = report(repo, "--rev", "HEAD", "--full")
    assert code == 1 and kinds(data) == ["corrupt-object"]
    assert "cannot be read" in data["problems"][0]["message"]


def test_missing_descriptor_and_missing_chunk_are_listed_with_their_fix(
    two: tuple[Path, list[str]],
) -> None:
    repo, ids = two
    git(repo, "update-index", "--force-remove", object_path(chunk_of(repo, ids[0])))
    ghost = "ab" * 32
    path = repo / ".crdt" / "manifest"
    m = Manifest.parse(path.read_bytes())
    path.write_bytes(m.with_records([add_record(new_tag(), ghost, "ghost")]).serialize())
    code, data = report(repo)
    assert code == 1
    assert kinds(data) == ["missing-object", "missing-object"]
    text = json.dumps(data["problems"])
    assert f"descriptor {ghost[:16]} is not staged or committed" in text
    assert "/tensors/" in text and "fetch the commit that has it" in text
    assert any("not staged" in n for n in data["notes"])  # the work tree is ahead of the index
    resolve = crdt(repo, "resolve", check=False)  # resolution refuses, in one line
    assert resolve.returncode == errors.StoreError.exit_code, resolve.stderr
    assert len(resolve.stderr.strip().splitlines()) == 1 and "Traceback" not in resolve.stderr


def test_every_malformed_manifest_line_is_listed(two: tuple[Path, list[str]]) -> None:
    repo, _ = two
    path = repo / ".crdt" / "manifest"
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([b'{"op":"add"}', *lines, b"not json", b"\xff"]) + b"\n")
    code, data = report(repo)
    assert code == 1
    messages = [p["message"] for p in data["problems"]]
    assert messages[0] == ".crdt/manifest:5: not valid UTF-8"  # the strict parser's verdict
    assert ".crdt/manifest:1: missing field 'id'" in messages  # then every bad line
    assert any(m.startswith(".crdt/manifest:4: not JSON") for m in messages)
    assert set(kinds(data)) == {"manifest"}
    assert data["contributions"] == 2  # the valid records were still checked


def test_incompatible_contributions_merged_from_two_branches_are_reported(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    add(repo, tmp_path, 1)
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "switch", "-q", "-c", "other", "HEAD~1")
    add(repo, tmp_path, 2, shapes={"layer.0.weight": (8, 8), "extra": (2,)})
    git(repo, "commit", "-q", "-m", "other shapes")
    git(repo, "switch", "-q", "main")
    # the set is sound (Layer 1): the merge goes in; resolving it is what cannot work
    merge = git(repo, "merge", "--no-edit", "other")
    assert "pre-merge-commit" not in merge.stderr
    code, data = report(repo, "--staged")
    assert code == 1 and set(kinds(data)) == {"incompatible"}
    text = json.dumps(data)
    assert "[8, 8] in contribution" in text and "'extra'" in text


def test_unknown_strategy_and_parameter_are_register_problems(two: tuple[Path, list[str]]) -> None:
    repo, _ = two
    r = Repo.open(repo)
    for value, text in (
        ({"name": "no_such", "params": {}}, "unknown strategy 'no_such'"),
        ({"name": "linear", "params": {"bogus": 1}}, "unknown parameter 'bogus'"),
    ):
        m = r.read_manifest()
        rec = set_record("strategy", value, m.max_clock() + 1, "c" * 16)
        r.write_manifest(m.with_records([rec]))
        code, data = report(repo)
        assert code == 1 and kinds(data) == ["register"], data
        assert text in data["problems"][0]["message"]
    # the hooks leave the registry out (a peer may run a newer version): the commit goes in
    assert git(repo, "commit", "-q", "-m", "bogus parameter").returncode == 0


def test_nested_references_and_required_extra_inputs_are_checked(
    two: tuple[Path, list[str]],
) -> None:
    """A descriptor with an extra input (as strategies that use Fisher diagonals will have):
    every object id inside it is checked, and a strategy that declares the input needs it."""
    from git_crdt_merge.strategies import registry

    repo, ids = two
    r = Repo.open(repo)
    store = ObjectStore(repo)
    desc = json.loads(store.get(descriptor_address(repo, ids[0])))
    lost = "cd" * 32
    entry = {**desc["tensors"]["head.weight"], "chunks": [lost]}
    desc["extras"] = {"fisher": {"tensors": {"head.weight": entry}}}
    from git_crdt_merge.replicated.manifest import canonical_json

    new_desc = store.put(canonical_json(desc).encode())
    new_id = content_id(desc)
    store.flush()
    m = r.read_manifest()
    r.write_manifest(m.with_records([add_record(new_tag(), new_id, "with-fisher", desc=new_desc)]))
    needs = dataclasses.replace(registry.get_strategy("linear"), name="needs_fisher", aliases=())
    object.__setattr__(needs, "extra_inputs", ("fisher",))
    registry.register(needs)
    try:
        m = r.read_manifest()
        rec = set_record("strategy", {"name": "needs_fisher", "params": {}}, 9, "d" * 16)
        r.write_manifest(m.with_records([rec]))
        rep = verify(r, None, resolvable=True)
    finally:
        del registry._REGISTRY["needs_fisher"]
    messages = [p.message for p in rep.problems]
    assert any(
        f"object {lost[:16]} (/extras/fisher/tensors/head.weight/chunks/0)" in m for m in messages
    )
    lacking = [m for m in messages if "needs extra input 'fisher'" in m]
    assert len(lacking) == 2  # the two contributions without it, not the one that has it


def test_pre_push_blocks_a_commit_made_with_no_verify(tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    git(repo, "remote", "add", "origin", str(origin))
    cid = add(repo, tmp_path, 1)
    git(repo, "update-index", "--force-remove", object_path(chunk_of(repo, cid)))
    git(repo, "commit", "-q", "--no-verify", "-m", "broken")
    push = git(repo, "push", "-q", "origin", "main", check=False)
    assert push.returncode != 0
    assert "pre-push: commit" in push.stderr and "pre-push blocked" in push.stderr
    assert git(origin, "rev-parse", "--verify", "-q", "main", check=False).returncode != 0


def test_verify_of_a_conflicted_merge_names_repair(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    git(repo, "config", "--remove-section", "merge.crdt")  # a clone without the driver
    add(repo, tmp_path, 1)
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "switch", "-q", "-c", "other", "HEAD~1")
    add(repo, tmp_path, 2)
    git(repo, "commit", "-q", "-m", "two")
    git(repo, "switch", "-q", "main")
    assert git(repo, "merge", "--no-edit", "other", check=False).returncode != 0
    for args in ([], ["--staged"]):
        code, data = report(repo, *args)
        assert code == 1 and kinds(data) in (["conflict"], ["manifest"]), data
        assert "git crdt repair" in data["problems"][0]["fix"]
    crdt(repo, "repair")
    code, data = report(repo, "--staged")
    assert (code, data["contributions"]) == (0, 2)


def test_verify_never_imports_code_named_by_the_repository(
    two: tuple[Path, list[str]], tmp_path: Path
) -> None:
    repo, _ = two
    marker = tmp_path / "imported"
    for name in ("evil_strategy", "os.system"):
        (repo / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    r = Repo.open(repo)
    m = r.read_manifest()
    recs = [set_record("strategy", {"name": "evil_strategy", "params": {}}, 50, "e" * 16)]
    r.write_manifest(m.with_records(recs))
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run(
        ["git", "crdt", "verify", "--json"], cwd=repo, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1 and "unknown strategy 'evil_strategy'" in proc.stdout
    crdt(repo, "resolve", check=False)
    git(repo, "commit", "-q", "-am", "evil", check=False)
    assert not marker.exists()


def test_objects_and_descriptors_over_the_size_limits_are_reported(
    two: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limits are 1 GiB per object and 64 MiB per descriptor; lowered here to test them."""
    from git_crdt_merge.errors import ManifestError
    from git_crdt_merge.query import verify as verify_module
    from git_crdt_merge.replicated import checks

    repo, ids = two
    monkeypatch.setattr(verify_module, "MAX_OBJECT_BYTES", 256)
    code, data = report(repo, "--rev", "HEAD")
    assert code == 1 and set(kinds(data)) == {"descriptor"}
    assert "is too large" in data["problems"][0]["message"]
    monkeypatch.setattr(checks, "MAX_DESCRIPTOR_BYTES", 16)
    code, data = report(repo, "--rev", "HEAD")
    messages = [p["message"] for p in data["problems"]]
    assert len(messages) == 2 and all("descriptor larger than the limit" in m for m in messages)
    with pytest.raises(ManifestError, match="larger than the limit"):
        reader.load_descriptor(
            ObjectStore(repo), descriptor_address(repo, ids[0])
        )  # what resolve reads
