"""Content from an untrusted pull cannot make the hooks destroy or write outside the work
tree: the ``output`` register and symbolic links committed by anyone are checked before
anything is written (what is and is not protected: docs/security.md)."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import crdt, descriptor_address, git, make_model, new_repo

from git_crdt_merge.replicated.contributions import remove_contribution, set_register
from git_crdt_merge.replicated.descriptor import content_id
from git_crdt_merge.replicated.repo import Repo


def test_output_register_pointing_at_a_user_folder_never_replaces_it(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    (repo / "docs").mkdir()
    (repo / "docs" / "notes.md").write_text("mine\n")
    git(repo, "add", "docs")
    crdt(repo, "add-contribution", str(make_model(tmp_path / "m.safetensors", 1)), "-q")
    set_register(Repo.open(repo), "output", "docs")  # as a hostile peer's manifest would
    commit = git(repo, "commit", "-q", "-m", "output into docs")  # post-commit resolves: exit 0
    assert "refusing to replace it" in commit.stderr
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9 and "is not a merged model written by git-crdt" in proc.stderr
    assert (repo / "docs" / "notes.md").read_text() == "mine\n"
    assert sorted(p.name for p in (repo / "docs").iterdir()) == ["notes.md"]


def test_committed_symlink_on_the_output_path_is_never_followed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, repo / "out")
    git(repo, "add", "out")
    crdt(repo, "add-contribution", str(make_model(tmp_path / "m.safetensors", 1)), "-q")
    set_register(Repo.open(repo), "output", "out/model")
    git(repo, "commit", "-q", "-m", "output through a symlink")
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9
    assert "goes through the symbolic link out" in proc.stderr
    assert list(victim.iterdir()) == []


def test_descriptor_claiming_a_huge_tensor_is_a_one_line_error_not_an_allocation(
    tmp_path: Path,
) -> None:
    import json

    from git_crdt_merge.replicated.manifest import add_record, canonical_json
    from git_crdt_merge.replicated.repo import new_tag
    from git_crdt_merge.replicated.store import ObjectStore

    repo = new_repo(tmp_path / "repo")
    git(repo, "config", "crdt.autoResolve", "false")
    crdt(repo, "add-contribution", str(make_model(tmp_path / "m.safetensors", 1)), "-q")
    r = Repo.open(repo)
    store = ObjectStore(repo)
    cid = r.read_manifest().visible_contributions()[0][0]
    desc = json.loads(store.get(descriptor_address(repo, cid)))
    for info in desc["tensors"].values():  # same chunks, claimed 2**40 elements each
        info["shape"], info["bytes"] = [2**40], 2**42
    hostile = store.put(canonical_json(desc).encode())
    store.flush()
    r.write_manifest(
        r.read_manifest().with_records(
            [add_record(new_tag(), content_id(desc), "huge", desc=hostile)]
        )
    )
    remove_contribution(r, "m")  # the hostile one alone: nothing else to disagree with
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "the descriptor says 4398046511104" in proc.stderr and "Traceback" not in proc.stderr
