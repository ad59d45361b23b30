"""Every history operation keeps the set whole and ``merged/`` true (docs/design.md, "History
operations"), in real git: rebase (--onto, -i with drop, reorder and squash), cherry-pick,
``am``, revert, octopus, stash, reset, a driver that is not on PATH, a writer racing a pull.

Each scenario ends with the invariants: verify passes on HEAD and on the work tree, ``git fsck``
passes, no record is without its objects (verify), no record of an ancestor is lost, and clones
that hold the same set hold the same manifest, Merkle root and ``merged/`` bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import BIN, crdt, git, make_model, new_repo

from git_crdt_merge.errors import LockError
from git_crdt_merge.git import commands as gitops
from git_crdt_merge.query.verify import verify
from git_crdt_merge.replicated import contributions, invariants
from git_crdt_merge.replicated.manifest import Manifest
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution import freshness

SHAPES = {"w": (32, 16), "b": (32,)}


def model(tmp: Path, name: str, seed: int) -> Path:
    return make_model(tmp / "models" / f"{name}.safetensors", seed, SHAPES)


def add(repo: Path, tmp: Path, name: str, seed: int, *, commit: bool = True) -> None:
    crdt(repo, "add-contribution", str(model(tmp, name, seed)), "-q")
    if commit:
        git(repo, "commit", "-q", "-m", f"add {name}")


def names(repo: Path, rev: str | None = None) -> list[str]:
    if rev is None:
        m = Repo.open(repo).read_manifest()
    else:
        m = Manifest.parse(git(repo, "show", f"{rev}:.crdt/manifest").stdout.encode())
    return sorted(n for _, n in m.visible_contributions())


def manifest_lines(repo: Path, rev: str) -> set[str]:
    return set(git(repo, "show", f"{rev}:.crdt/manifest").stdout.splitlines())


def assert_sound(repo: Path) -> None:
    """verify (HEAD, work tree), fsck, and no record of any commit lost at HEAD."""
    r = Repo.open(repo)
    for rev in ("HEAD", None):
        report = verify(r, rev)
        assert report.problems == [], (rev, [p.message for p in report.problems])
    fsck = git(repo, "fsck", "--no-progress", "--no-dangling", check=False)
    assert fsck.returncode == 0, fsck.stderr
    head = set(manifest_lines(repo, "HEAD"))
    for c in git(repo, "rev-list", "HEAD").stdout.split():
        shown = git(repo, "show", f"{c}:.crdt/manifest", check=False)
        if shown.returncode == 0:
            assert set(shown.stdout.splitlines()) <= head, f"commit {c[:10]} lost at HEAD"


def merged_bytes(repo: Path) -> dict[str, bytes]:
    out = repo / "merged"
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.exists() else {}


def assert_same_state(*repos: Path) -> None:
    """Same set -> same manifest, root and merged/ bytes (each resolved now)."""
    states = []
    for r in repos:
        crdt(r, "resolve", "-q")
        m = Repo.open(r).read_manifest()
        state = freshness.output_state(Repo.open(r), m)
        assert state.ok, state.message()
        states.append((m.serialize(), m.merkle_root(), merged_bytes(r)))
    assert all(s == states[0] for s in states[1:])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = new_repo(tmp_path / "repo")
    git(r, "config", "crdt.autoResolve", "false")
    return r


def clone(origin: Path, dest: Path) -> Path:
    git(origin.parent, "clone", "-q", str(origin), str(dest))
    crdt(dest, "install", "-q")
    git(dest, "config", "crdt.autoResolve", "false")
    return dest


# -- picks: ours ∪ (theirs ∖ base) -------------------------------------------------------------
def test_rebase_onto_leaves_the_excluded_commits_records_out(repo: Path, tmp_path: Path) -> None:
    git(repo, "switch", "-q", "-c", "topic")
    add(repo, tmp_path, "b", 2)
    add(repo, tmp_path, "c", 3)
    git(repo, "switch", "-q", "main")
    add(repo, tmp_path, "a", 1)
    git(repo, "rebase", "-q", "--onto", "main", "topic~1", "topic")
    assert names(repo, "HEAD") == ["a", "c"]
    assert_sound(repo)
    crdt(repo, "resolve", "-q")  # every record has its objects: resolvable


def test_rebase_interactive_drop_reorder_and_squash(repo: Path, tmp_path: Path) -> None:
    git(repo, "switch", "-q", "-c", "topic")
    for i, n in enumerate(("b", "c", "d"), 2):
        add(repo, tmp_path, n, i)
    git(repo, "switch", "-q", "main")
    add(repo, tmp_path, "a", 1)
    git(repo, "switch", "-q", "topic")
    git(repo, "branch", "-q", "keep")

    editor = tmp_path / "todo.py"
    editor.write_text(
        "import sys\n"
        "mode, path = sys.argv[1], sys.argv[2]\n"
        "picks = [x for x in open(path).read().splitlines() if x.startswith('pick ')]\n"
        "if mode == 'drop':\n"
        "    picks = [x for x in picks if not x.endswith('add c')]\n"
        "elif mode == 'reorder':\n"
        "    picks = picks[1:] + picks[:1]\n"
        "else:\n"
        "    picks = picks[:1] + ['squash ' + x[5:] for x in picks[1:]]\n"
        "open(path, 'w').write('\\n'.join(picks) + '\\n')\n"
    )

    def rebase_i(mode: str) -> None:
        env = {
            **os.environ,
            "GIT_SEQUENCE_EDITOR": f"{sys.executable} {editor} {mode}",
            "GIT_EDITOR": "true",
        }
        proc = subprocess.run(
            ["git", "rebase", "-q", "-i", "main"], cwd=repo, env=env, capture_output=True
        )
        assert proc.returncode == 0, proc.stderr

    rebase_i("drop")
    assert names(repo, "HEAD") == ["a", "b", "d"]
    assert_sound(repo)
    git(repo, "reset", "-q", "--hard", "keep")
    rebase_i("reorder")  # c, d, b
    assert names(repo, "HEAD") == ["a", "b", "c", "d"]
    assert git(repo, "log", "-1", "--format=%s").stdout.strip() == "add b"
    assert_sound(repo)
    git(repo, "reset", "-q", "--hard", "keep")
    rebase_i("squash")
    assert git(repo, "rev-list", "--count", "main..HEAD").stdout.strip() == "1"
    assert names(repo, "HEAD") == ["a", "b", "c", "d"]
    assert_sound(repo)


def test_cherry_pick_applies_only_the_picked_add(repo: Path, tmp_path: Path) -> None:
    git(repo, "switch", "-q", "-c", "topic")
    add(repo, tmp_path, "b", 2)
    add(repo, tmp_path, "c", 3)
    git(repo, "switch", "-q", "main")
    add(repo, tmp_path, "a", 1)
    git(repo, "cherry-pick", "topic")
    assert names(repo, "HEAD") == ["a", "c"]
    assert_sound(repo)
    # a later true merge of the topic is the join
    git(repo, "merge", "-q", "--no-edit", "topic")
    assert names(repo, "HEAD") == ["a", "b", "c"]
    assert_sound(repo)


def test_am_applies_a_patch_three_way_and_resolves(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "crdt.autoResolve", "true")
    git(repo, "switch", "-q", "-c", "topic")
    add(repo, tmp_path, "b", 2)
    patches = tmp_path / "patches"
    git(repo, "format-patch", "-q", "-1", "-o", str(patches))
    git(repo, "switch", "-q", "main")
    add(repo, tmp_path, "a", 1)
    assert git(repo, "config", "am.threeWay").stdout.strip() == "true"  # set by install
    git(repo, "am", "-q", *sorted(str(p) for p in patches.iterdir()))
    assert names(repo, "HEAD") == ["a", "b"]
    assert_sound(repo)
    # post-applypatch resolved the merged model of the new set
    assert freshness.output_state(Repo.open(repo)).state == "current"


# -- revert and deleted lines --------------------------------------------------------------------
def test_revert_after_later_changes_is_an_observed_remove(repo: Path, tmp_path: Path) -> None:
    """The manifest changed since the reverted add: git calls the driver, which turns the
    deleted add into an observed remove (no warning, nothing lost, nothing without objects)."""
    add(repo, tmp_path, "x", 1)
    add(repo, tmp_path, "y", 2)
    proc = git(repo, "revert", "--no-edit", "HEAD~1")
    assert "warning" not in proc.stderr
    assert names(repo, "HEAD") == ["y"]
    assert manifest_lines(repo, "HEAD~1") <= manifest_lines(repo, "HEAD")
    assert_sound(repo)


def test_plain_revert_is_stopped_and_staged_as_an_observed_remove(tmp_path: Path) -> None:
    """Nothing changed the manifest since the reverted add: git takes the parent's blob (the
    driver is not called) and would delete the line.  prepare-commit-msg stops the revert with
    the driver's answer staged (an observed remove, the same derived tag in every clone); the
    named command commits it, and every clone converges."""
    seed = new_repo(tmp_path / "seed")
    git(seed, "config", "crdt.autoResolve", "false")
    add(seed, tmp_path, "x", 1)
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(seed), str(origin))
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    c = clone(origin, tmp_path / "c")
    head = git(a, "rev-parse", "HEAD").stdout.strip()
    proc = git(a, "revert", "--no-edit", "HEAD", check=False)
    assert proc.returncode != 0
    assert "this revert lacks 1 record(s)" in proc.stderr
    assert "an observed remove of 'x'" in proc.stderr
    assert "'git commit --no-edit'" in proc.stderr
    assert git(a, "rev-parse", "HEAD").stdout.strip() == head  # nothing committed yet
    staged = set(git(a, "show", ":.crdt/manifest").stdout.splitlines())
    assert manifest_lines(a, "HEAD") < staged  # every line kept, one remove added
    git(a, "commit", "-q", "--no-edit")
    assert git(a, "log", "-1", "--format=%s").stdout.strip() == 'Revert "add x"'
    assert names(a, "HEAD") == []
    assert_sound(a)
    git(a, "push", "-q", "origin", "main")
    # the same revert in another clone writes the same records
    git(c, "revert", "--no-edit", "HEAD", check=False)
    git(c, "commit", "-q", "--no-edit")
    assert (
        git(c, "show", "HEAD:.crdt/manifest").stdout == git(a, "show", "HEAD:.crdt/manifest").stdout
    )
    # b has x visible and a local change: the join keeps the remove
    add(b, tmp_path, "z", 3)
    git(b, "pull", "-q", "--no-rebase", "--no-edit")
    assert names(b, "HEAD") == ["z"]
    git(b, "push", "-q", "origin", "main")
    git(a, "pull", "-q", "--no-rebase")
    git(c, "pull", "-q", "--no-rebase", "--no-edit")
    for r in (a, b, c):
        assert_sound(r)
    assert_same_state(a, b, c)


def test_a_revert_of_several_commits_stops_and_continues(repo: Path, tmp_path: Path) -> None:
    """A sequencer revert (two commits): the revert of y deletes its line (nothing changed the
    manifest since), so it stops with the remove staged; the named commands commit it and go
    on to the revert of x, which git hands to the driver."""
    add(repo, tmp_path, "x", 1)
    add(repo, tmp_path, "y", 2)
    git(repo, "commit", "-q", "--allow-empty", "-m", "unrelated")
    proc = git(repo, "revert", "--no-edit", "HEAD~1", "HEAD~2", check=False)
    steps = 0
    while proc.returncode != 0:
        assert "'git commit --no-edit && git revert --continue'" in proc.stderr, proc.stderr
        steps += 1
        assert steps == 1
        git(repo, "commit", "-q", "--no-edit")
        proc = git(repo, "-c", "core.editor=true", "revert", "--continue", check=False)
    assert names(repo, "HEAD") == []
    assert_sound(repo)


def test_a_cherry_picked_line_deletion_is_stopped(repo: Path, tmp_path: Path) -> None:
    """A commit that deleted a manifest line by hand (committed with --no-verify), picked onto
    a branch that did not change the manifest since: stopped, the deletion staged as the
    driver's inverse (an observed remove), and ``git cherry-pick --continue`` commits it."""
    add(repo, tmp_path, "x", 1)
    add(repo, tmp_path, "y", 2)
    git(repo, "switch", "-q", "-c", "topic")
    lines = (repo / ".crdt" / "manifest").read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if '"x"' not in ln or '"add"' not in ln]
    assert len(keep) == len(lines) - 1
    (repo / ".crdt" / "manifest").write_text("".join(keep))
    git(repo, "commit", "-q", "-a", "--no-verify", "-m", "delete the x line")
    git(repo, "switch", "-q", "main")
    proc = git(repo, "cherry-pick", "topic", check=False)
    assert proc.returncode != 0 and "'git cherry-pick --continue'" in proc.stderr, proc.stderr
    git(repo, "-c", "core.editor=true", "cherry-pick", "--continue")
    assert names(repo, "HEAD") == ["y"]
    assert_sound(repo)


def test_a_picked_record_without_objects_is_stopped(repo: Path, tmp_path: Path) -> None:
    """A topic commit that records an add but holds none of its objects (made with
    --no-verify): cherry-picking it is stopped before it commits, and so is a rebase pick."""
    add(repo, tmp_path, "a", 1)
    git(repo, "switch", "-q", "-c", "topic")
    add(repo, tmp_path, "b", 2, commit=False)
    git(repo, "reset", "-q", "HEAD", "--", ".crdt/objects")
    git(repo, "add", ".crdt/manifest")
    git(repo, "commit", "-q", "--no-verify", "-m", "b without objects")
    git(repo, "switch", "-q", "-f", "main")
    before = git(repo, "rev-parse", "HEAD").stdout
    proc = git(repo, "cherry-pick", "topic", check=False)
    assert proc.returncode != 0
    assert "prepare-commit-msg blocked" in proc.stderr, proc.stderr
    assert git(repo, "rev-parse", "HEAD").stdout == before
    git(repo, "cherry-pick", "--abort")
    add(repo, tmp_path, "c", 3)
    proc = git(repo, "rebase", "main", "topic", check=False)
    assert proc.returncode != 0 and "'git rebase --continue'" in proc.stderr, proc.stderr
    git(repo, "rebase", "--abort")


def test_git_crdt_revert_is_an_observed_remove_in_every_clone(tmp_path: Path) -> None:
    seed = new_repo(tmp_path / "seed")
    git(seed, "config", "crdt.autoResolve", "false")
    add(seed, tmp_path, "x", 1)
    add(seed, tmp_path, "y", 2)
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(seed), str(origin))
    a, idle, busy = (clone(origin, tmp_path / n) for n in ("a", "idle", "busy"))
    added_x = git(a, "log", "--format=%H", "--grep", "add x").stdout.split()[0]
    crdt(a, "revert", added_x)
    assert names(a, "HEAD") == ["y"]
    assert manifest_lines(a, "HEAD~1") <= manifest_lines(a, "HEAD")  # nothing deleted
    git(a, "push", "-q", "origin", "main")
    git(idle, "pull", "-q")  # fast-forward
    add(busy, tmp_path, "z", 3)
    git(busy, "pull", "-q", "--no-rebase", "--no-edit")  # a true merge: the driver's join
    assert names(idle, "HEAD") == ["y"]
    assert names(busy, "HEAD") == ["y", "z"]
    git(busy, "push", "-q", "origin", "main")
    git(a, "pull", "-q")
    git(idle, "pull", "-q")
    for r in (a, idle, busy):
        assert_sound(r)
    assert_same_state(a, idle, busy)
    # reverting the revert brings x back under a new tag
    revert_commit = git(a, "log", "-1", "--format=%H", "--grep", "Revert").stdout.strip()
    crdt(a, "revert", revert_commit)
    assert names(a, "HEAD") == ["x", "y", "z"]
    assert_sound(a)


def test_a_deleted_manifest_line_cannot_be_committed(repo: Path, tmp_path: Path) -> None:
    add(repo, tmp_path, "x", 1)
    add(repo, tmp_path, "y", 2)
    path = repo / ".crdt" / "manifest"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if '"name":"x"' not in line))
    git(repo, "add", ".crdt/manifest")
    proc = git(repo, "commit", "-q", "-m", "drop x", check=False)
    assert proc.returncode != 0
    assert "lacks 1 record(s) of HEAD" in proc.stderr and "restore-records" in proc.stderr
    assert crdt(repo, "verify", "--staged", check=False).returncode == 1
    crdt(repo, "restore-records")  # an accident: it comes back visible
    assert names(repo) == ["x", "y"]
    git(repo, "commit", "-q", "--allow-empty", "-m", "nothing lost")
    assert_sound(repo)


def test_dropping_merge_crdt_from_gitattributes_is_blocked(repo: Path) -> None:
    attrs = repo / ".gitattributes"
    attrs.write_text(attrs.read_text().replace(" merge=crdt", ""))
    git(repo, "add", ".gitattributes")
    proc = git(repo, "commit", "-q", "-m", "oops", check=False)
    assert proc.returncode != 0 and "merge=crdt" in proc.stderr
    assert any("merge=crdt" in p for p in _doctor_problems(repo))


def _doctor_problems(repo: Path) -> list[str]:
    from git_crdt_merge.integration.install import doctor

    return doctor(repo).problems


# -- the driver and PATH -------------------------------------------------------------------------
def _diverge(repo: Path, tmp: Path) -> None:
    git(repo, "switch", "-q", "-c", "topic")
    add(repo, tmp, "b", 2)
    git(repo, "switch", "-q", "main")
    add(repo, tmp, "a", 1)


def _without_venv() -> dict[str, str]:
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not Path(p, "git-crdt").exists()]
    return {**os.environ, "PATH": os.pathsep.join(path)}


def test_merge_joins_with_the_venv_not_on_path(repo: Path, tmp_path: Path) -> None:
    _diverge(repo, tmp_path)
    proc = subprocess.run(
        ["git", "merge", "-q", "--no-edit", "topic"],
        cwd=repo,
        env=_without_venv(),
        text=True,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert names(repo, "HEAD") == ["a", "b"]
    assert_sound(repo)


def test_the_driver_command_survives_spaces_in_its_path(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from git_crdt_merge.integration import install

    spaced = tmp_path / "a venv" / "bin"
    spaced.mkdir(parents=True)
    (spaced / "git-crdt").symlink_to(Path(BIN) / "git-crdt")
    monkeypatch.setattr(install, "program", lambda: [str(spaced / "git-crdt")])
    command = install.driver_command()
    assert command.startswith("'") and install.driver_program_problem(command) is None
    git(repo, "config", "merge.crdt.driver", command)
    _diverge(repo, tmp_path)
    proc = subprocess.run(
        ["git", "merge", "-q", "--no-edit", "topic"],
        cwd=repo,
        env=_without_venv(),
        text=True,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert names(repo, "HEAD") == ["a", "b"]
    assert_sound(repo)


def test_a_driver_that_was_not_found_cannot_lose_the_other_side(repo: Path, tmp_path: Path) -> None:
    """An older install wrote a bare 'git-crdt': git says "not found" and CONFLICT but leaves
    our side.  'git add' + 'git commit' must then be blocked (the hooks run by absolute path)."""
    git(repo, "config", "merge.crdt.driver", "git-crdt merge-driver %O %A %B %L %P")
    _diverge(repo, tmp_path)
    env = _without_venv()
    proc = subprocess.run(["git", "merge", "--no-edit", "topic"], cwd=repo, env=env)
    assert proc.returncode != 0
    assert any(
        "merge driver runs 'git-crdt' from PATH" in p for p in _doctor_problems_env(repo, env)
    )
    git(repo, "add", ".crdt/manifest")
    commit = subprocess.run(
        ["git", "commit", "-q", "--no-edit"], cwd=repo, env=env, text=True, capture_output=True
    )
    assert commit.returncode != 0
    assert "record(s) of MERGE_HEAD" in commit.stderr
    crdt(repo, "restore-records")
    git(repo, "commit", "-q", "--no-edit")
    assert names(repo, "HEAD") == ["a", "b"]
    assert_sound(repo)


def _doctor_problems_env(repo: Path, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(
        [str(Path(BIN) / "git-crdt"), "doctor"], cwd=repo, env=env, text=True, capture_output=True
    )
    return proc.stderr.splitlines()


def _octopus_branches(repo: Path, tmp: Path) -> None:
    for n, seed in (("x", 2), ("y", 3), ("z", 4)):
        git(repo, "switch", "-q", "-c", n, "main")
        add(repo, tmp, n, seed)
    git(repo, "switch", "-q", "main")
    add(repo, tmp, "a", 1)


def test_octopus_merge_joins_like_sequential_merges(repo: Path, tmp_path: Path) -> None:
    """``git merge x y z`` (every head changed the manifest) runs the crdt strategy that
    install names in pull.octopus: one commit with four parents whose manifest, root and
    merged bytes are those of three sequential merges; no chunk file reaches the work tree."""
    _octopus_branches(repo, tmp_path)
    seq = tmp_path / "seq"
    git(tmp_path, "clone", "-q", str(repo), str(seq))
    crdt(seq, "install", "-q")
    git(seq, "config", "crdt.autoResolve", "false")
    for n in ("x", "y", "z"):
        git(seq, "merge", "-q", "--no-edit", f"origin/{n}")
    proc = git(repo, "merge", "--no-edit", "x", "y", "z")
    assert "Merge made by the 'crdt' strategy" in proc.stdout
    parents = git(repo, "log", "-1", "--format=%P").stdout.split()
    assert len(parents) == 4
    assert names(repo, "HEAD") == ["a", "x", "y", "z"]
    assert not (repo / ".crdt" / "objects").exists()
    assert git(repo, "status", "--porcelain").stdout == ""
    assert (
        git(repo, "show", "HEAD:.crdt/manifest").stdout
        == git(seq, "show", "HEAD:.crdt/manifest").stdout
    )
    assert_sound(repo)
    assert_same_state(repo, seq)


def test_octopus_with_a_conflict_stops_before_it_starts(repo: Path, tmp_path: Path) -> None:
    """A conflict in another file: the strategy gives up with the sequential alternative and
    git leaves HEAD, index and work tree as they were."""
    _octopus_branches(repo, tmp_path)
    for n in ("y", "z"):
        git(repo, "switch", "-q", n)
        (repo / "notes.txt").write_text(f"{n}\n")
        git(repo, "add", "notes.txt")
        git(repo, "commit", "-q", "-m", f"notes {n}")
    git(repo, "switch", "-q", "main")
    before = git(repo, "rev-parse", "HEAD").stdout
    proc = git(repo, "merge", "--no-edit", "x", "y", "z", check=False)
    assert proc.returncode != 0
    assert "merging z conflicts in notes.txt" in proc.stderr, proc.stderr
    assert "git merge x && git merge y && git merge z" in proc.stderr
    assert git(repo, "rev-parse", "HEAD").stdout == before
    assert git(repo, "status", "--porcelain").stdout == ""


def test_octopus_without_the_strategy_on_path_is_refused(repo: Path, tmp_path: Path) -> None:
    """The venv not activated: git cannot find git-merge-crdt and refuses before it starts;
    doctor names the missing program."""
    _octopus_branches(repo, tmp_path)
    before = git(repo, "rev-parse", "HEAD").stdout
    proc = subprocess.run(
        ["git", "merge", "--no-edit", "x", "y"],
        cwd=repo,
        env=_without_venv(),
        text=True,
        capture_output=True,
    )
    assert proc.returncode != 0 and "Could not find merge strategy 'crdt'" in proc.stderr
    assert git(repo, "rev-parse", "HEAD").stdout == before
    assert git(repo, "status", "--porcelain").stdout == ""
    assert any(
        "'git-merge-crdt' is not on PATH" in p for p in _doctor_problems_env(repo, _without_venv())
    )


# -- writers racing git ---------------------------------------------------------------------------
def test_add_contribution_during_a_pull_keeps_the_pulled_record(tmp_path: Path) -> None:
    seed = new_repo(tmp_path / "seed")
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(seed), str(origin))
    a = clone(origin, tmp_path / "a")
    b = clone(origin, tmp_path / "b")
    add(b, tmp_path, "pulled", 1)
    git(b, "push", "-q", "origin", "main")
    pulled: list[int] = []
    once = threading.Lock()

    def pull_once(n: int) -> None:  # runs during the ingest, before the manifest is written
        with once:  # progress comes from the ingest's worker threads
            if not pulled:
                pulled.append(git(a, "pull", "-q", "--no-rebase").returncode)

    contributions.add_contribution(
        Repo.open(a),
        model(tmp_path, "local", 2),
        progress=pull_once,
        options=contributions.IngestOptions(chunk_size=512),
    )
    assert pulled == [0]
    assert names(a) == ["local", "pulled"]
    staged = Manifest.parse(git(a, "show", ":.crdt/manifest").stdout.encode())
    assert sorted(n for _, n in staged.visible_contributions()) == ["local", "pulled"]
    git(a, "commit", "-q", "-m", "local")
    assert_sound(a)


def test_a_rerun_restores_skip_worktree_on_staged_objects(repo: Path, tmp_path: Path) -> None:
    add(repo, tmp_path, "x", 1, commit=False)
    paths = git(repo, "ls-files", "--", ".crdt/objects").stdout.split()
    git(repo, "update-index", "--no-skip-worktree", *paths)
    crdt(repo, "add-contribution", str(model(tmp_path, "x", 1)), "-q")
    flags = {
        line[0] for line in git(repo, "ls-files", "-t", "--", ".crdt/objects").stdout.splitlines()
    }
    assert flags == {"S"}


def test_a_git_crdt_killed_holding_the_index_lock_does_not_block_the_next(
    repo: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        ["git-crdt", "add-contribution", str(model(tmp_path, "x", 1)), "-q"],
        cwd=repo,
        env={**os.environ, "GIT_CRDT_KILL_AT": "index:staged"},
    )
    assert proc.returncode == -9
    assert (repo / ".git" / "index.lock").exists()
    crdt(repo, "add-contribution", str(model(tmp_path, "x", 1)), "-q")
    assert not (repo / ".git" / "index.lock").exists()
    git(repo, "commit", "-q", "-m", "x")
    assert names(repo, "HEAD") == ["x"]
    assert_sound(repo)


def test_a_running_gits_index_lock_is_waited_for_then_a_lock_error(repo: Path) -> None:
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # git's own lock (not named by a git-crdt): never removed
    start = time.monotonic()
    with pytest.raises(LockError) as caught:
        with gitops.index_transaction(repo, timeout=0.2):
            pass
    assert time.monotonic() - start >= 0.2
    assert str(caught.value) == (
        f"{lock} exists: another git process is running (if none is, remove it)"
    )
    assert caught.value.exit_code == 7 and lock.read_text() == ""


def test_a_held_repository_lock_is_waited_for_then_a_lock_error(repo: Path) -> None:
    r = Repo.open(repo)
    with r.lock():
        start = time.monotonic()
        with pytest.raises(LockError) as caught:
            with r.lock(timeout=0.2):
                pass
        assert time.monotonic() - start >= 0.2
    assert str(caught.value) == f"another git-crdt process holds {r.state_dir / 'lock'}"
    with r.lock(timeout=0.0):  # released: taken at the first try
        pass


# -- merged/ is never silently stale ---------------------------------------------------------------
def test_reset_and_stash_leave_merged_marked_stale(repo: Path, tmp_path: Path) -> None:
    add(repo, tmp_path, "x", 1)
    add(repo, tmp_path, "y", 2)
    crdt(repo, "resolve", "-q")
    git(repo, "reset", "-q", "--hard", "HEAD~1")  # runs no hook
    switch = git(repo, "switch", "-q", "-c", "elsewhere")  # autoResolve is off here
    assert "merged/ is stale" in switch.stderr
    for args in (("status",), ("list",), ("doctor",)):
        out = crdt(repo, *args, check=False).stderr
        assert "merged/ is stale" in out, (args, out)
    crdt(repo, "resolve", "-q")
    assert "merged/ holds the model of the current set" in crdt(repo, "status").stderr
    add(repo, tmp_path, "z", 3, commit=False)
    crdt(repo, "resolve", "-q")
    git(repo, "stash", "-q")
    assert freshness.output_state(Repo.open(repo)).state == "stale"
    git(repo, "stash", "pop", "-q")
    assert freshness.output_state(Repo.open(repo)).state == "current"


def test_an_empty_set_removes_the_old_model(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "crdt.autoResolve", "true")
    add(repo, tmp_path, "x", 1)
    assert (repo / "merged" / "resolution.json").exists()
    crdt(repo, "remove-contribution", "x")
    git(repo, "commit", "-q", "-m", "remove x")  # post-commit resolves the empty set
    assert not (repo / "merged").exists()
    assert freshness.output_state(Repo.open(repo)).state == "empty"


def test_a_failed_resolution_is_reported_with_its_reason(repo: Path, tmp_path: Path) -> None:
    for n, s in (("x", 1), ("y", 2), ("z", 3)):
        add(repo, tmp_path, n, s)
    proc = crdt(repo, "strategy", "slerp", "-p", "t=0.5")
    assert "warning: strategy slerp" in proc.stderr and "cannot be resolved" in proc.stderr
    git(repo, "config", "crdt.autoResolve", "true")
    proc = git(repo, "commit", "-q", "--allow-empty", "-m", "slerp")
    assert "could not resolve" in proc.stderr
    status = crdt(repo, "status").stderr
    assert "merged/ is missing" in status and "slerp" in status
    assert any("slerp" in p for p in _doctor_problems(repo))


def test_restore_records_finds_nothing_in_a_sound_clone(repo: Path, tmp_path: Path) -> None:
    add(repo, tmp_path, "x", 1)
    result = invariants.restore_records(Repo.open(repo))
    assert result.records == 0
    assert git(repo, "status", "--porcelain").stdout == ""
