"""The ``git crdt`` command line: help, JSON on stdout, one-line errors with documented codes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import crdt, git, make_model, new_repo

from git_crdt_merge import errors


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("git-crdt: error: ")
    assert text in lines[0]
    assert proc.stdout == ""


def test_short_help_works_through_git(repo: Path) -> None:
    proc = crdt(repo, "-h")
    for command in (
        "init",
        "install",
        "add-contribution",
        "remove-contribution",
        "status",
        "list",
        "log",
        "doctor",
        "strategy",
    ):
        assert command in proc.stdout
    sub = crdt(repo, "add-contribution", "-h")
    assert "--allow-pickle" in sub.stdout and "--chunk-size" in sub.stdout


def test_version_prints_the_package_version(repo: Path) -> None:
    from git_crdt_merge import __version__

    assert crdt(repo, "version").stdout == f"git-crdt-merge {__version__}\n"


def test_every_data_command_prints_parseable_json(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "crdt.autoResolve", "false")
    src = make_model(tmp_path / "m.safetensors", 1)
    added = json.loads(crdt(repo, "add-contribution", str(src), "--json").stdout)
    assert set(added) >= {"id", "name", "tensors", "bytes", "new_bytes", "already_present"}
    git(repo, "commit", "-q", "-m", "add m")
    listed = json.loads(crdt(repo, "list", "--json").stdout)
    assert listed == [
        {"name": "m", "id": added["id"], "weight": 1.0, "tensors": 3, "bytes": added["bytes"]}
    ]
    st = json.loads(crdt(repo, "status", "--json").stdout)
    assert st["contributions"] == [{"name": "m", "id": added["id"]}]
    assert len(st["merkle_root"]) == 64 and st["records"] == 1
    log = json.loads(crdt(repo, "log", "--json").stdout)
    assert [e["subject"] for e in log] == ["add m"]
    doc = json.loads(crdt(repo, "doctor", "--json").stdout)
    assert doc["problems"] == [] and doc["ok"]
    removed = json.loads(crdt(repo, "remove-contribution", "m", "--json").stdout)
    assert removed == {"removed": added["id"]}
    assert json.loads(crdt(repo, "list", "--json").stdout) == []


def test_json_of_doctor_is_parseable_when_it_reports_problems(tmp_path: Path) -> None:
    plain = new_repo(tmp_path / "plain", init_crdt=False)
    proc = crdt(plain, "doctor", "--json", check=False)
    assert proc.returncode == 1
    assert any("git crdt init" in p for p in json.loads(proc.stdout)["problems"])


def test_log_attributes_records_to_the_commits_that_introduced_them(
    repo: Path, tmp_path: Path
) -> None:
    git(repo, "config", "crdt.autoResolve", "false")

    def head() -> str:
        return git(repo, "rev-parse", "HEAD").stdout.strip()

    crdt(repo, "add-contribution", str(make_model(tmp_path / "x.safetensors", 1)), "-q")
    git(repo, "commit", "-q", "-m", "add x")
    c1 = head()
    git(repo, "switch", "-q", "-c", "side")
    crdt(repo, "add-contribution", str(make_model(tmp_path / "y.safetensors", 2)), "-q")
    git(repo, "commit", "-q", "-m", "add y")
    c2 = head()
    git(repo, "switch", "-q", "main")
    crdt(repo, "output", "out")
    git(repo, "commit", "-q", "-m", "set output")
    c3 = head()
    git(repo, "merge", "-q", "--no-edit", "side")
    merge = head()
    crdt(repo, "remove-contribution", "x")  # staged, not committed
    entries = json.loads(crdt(repo, "log", "--json").stdout)
    by_kind = {
        (e["record"]["op"], e["record"].get("name")): (
            e["commit"],
            e["subject"],
        )
        for e in entries
    }
    assert by_kind == {
        ("add", "x"): (c1, "add x"),
        ("add", "y"): (c2, "add y"),
        ("set", None): (c3, "set output"),
        ("remove", None): (None, "(not committed)"),
    }
    assert merge not in {e["commit"] for e in entries}
    # every record of the manifest is listed exactly once
    lines = (repo / ".crdt" / "manifest").read_text().splitlines()
    assert sorted(e["line"] for e in entries) == sorted(lines)
    assert all(e["record"] == json.loads(e["line"]) for e in entries)
    # the table form works too, and a revision limits the history
    assert crdt(repo, "log").returncode == 0
    old = json.loads(crdt(repo, "log", c1, "--json").stdout)
    assert [e["commit"] for e in old if e["commit"]] == [c1]


# -- bad input: one line, documented exit code, manifest unchanged -------------------------------
def truncated(tmp: Path) -> Path:
    src = make_model(tmp / "full.safetensors", 3)
    bad = tmp / "truncated.safetensors"
    bad.write_bytes(src.read_bytes()[:-10])
    return bad


def header_only(tmp: Path) -> Path:
    bad = tmp / "garbage.safetensors"
    bad.write_bytes(b"\xff" * 64)
    return bad


def text_file(tmp: Path) -> Path:
    bad = tmp / "notes.txt"
    bad.write_text("hello")
    return bad


def empty_file(tmp: Path) -> Path:
    bad = tmp / "empty.safetensors"
    bad.write_bytes(b"")
    return bad


def empty_dir(tmp: Path) -> Path:
    d = tmp / "nothing-here"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def index_missing_shard(tmp: Path) -> Path:
    d = tmp / "broken-shards"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    return d


def bad_json_header(tmp: Path) -> Path:
    bad = tmp / "badheader.safetensors"
    bad.write_bytes((5).to_bytes(8, "little") + b"{nope")
    return bad


BAD_INPUTS = [
    ("missing file", lambda t: t / "does-not-exist.safetensors", "no such file or directory"),
    ("not safetensors", text_file, "not a .safetensors file"),
    ("garbage safetensors", header_only, "not a safetensors file"),
    ("header not JSON", bad_json_header, "header is not JSON"),
    ("truncated safetensors", truncated, "truncated"),
    ("empty file", empty_file, "empty file"),
    ("directory without weights", empty_dir, "no model.safetensors"),
    ("index naming a missing shard", index_missing_shard, "is missing"),
]


def test_bad_input_is_a_one_line_error_and_leaves_the_manifest_unchanged(
    repo: Path, tmp_path: Path
) -> None:
    crdt(repo, "add-contribution", str(make_model(tmp_path / "ok.safetensors", 9)), "-q")
    before = (repo / ".crdt" / "manifest").read_bytes()
    staged = git(repo, "ls-files", "-s").stdout
    for what, make, text in BAD_INPUTS:
        path = make(tmp_path)  # type: ignore[no-untyped-call]
        proc = crdt(repo, "add-contribution", str(path), check=False)
        try:
            assert_one_line_error(proc, errors.InputError.exit_code, text)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
        assert (repo / ".crdt" / "manifest").read_bytes() == before, what
        assert git(repo, "ls-files", "-s").stdout == staged, what


def test_json_mode_errors_keep_stdout_empty(repo: Path, tmp_path: Path) -> None:
    proc = crdt(repo, "add-contribution", str(tmp_path / "nope.safetensors"), "--json", check=False)
    assert_one_line_error(proc, 4, "no such file")


def test_name_taken_by_another_contribution_is_refused(repo: Path, tmp_path: Path) -> None:
    crdt(repo, "add-contribution", str(make_model(tmp_path / "a.safetensors", 1)), "-n", "m")
    before = (repo / ".crdt" / "manifest").read_bytes()
    staged = git(repo, "ls-files", "-s").stdout
    proc = crdt(
        repo,
        "add-contribution",
        str(make_model(tmp_path / "b.safetensors", 2)),
        "-n",
        "m",
        check=False,
    )
    assert_one_line_error(proc, 4, "'m' is already used")
    assert (repo / ".crdt" / "manifest").read_bytes() == before
    assert git(repo, "ls-files", "-s").stdout == staged  # nothing staged (docs/errors.md)


INVALID_ARGS = [
    (["remove-contribution", "nobody"], errors.NotFoundError.exit_code, "no visible contribution"),
    (["add-contribution", "MODEL", "--name", "../escape"], 4, "path separator"),
    (["add-contribution", "MODEL", "--weight", "nan"], 4, "finite"),
    (["strategy", "linear", "-p", "novalue"], errors.InputError.exit_code, "KEY=VALUE"),
    (["output", "../outside"], errors.ManifestError.exit_code, "plain relative path"),
]


def test_invalid_arguments_are_one_line_errors(repo: Path, tmp_path: Path) -> None:
    src = str(make_model(tmp_path / "m.safetensors", 1))
    before = (repo / ".crdt" / "manifest").read_bytes()
    for args, code, text in INVALID_ARGS:
        proc = crdt(repo, *[src if a == "MODEL" else a for a in args], check=False)
        try:
            assert_one_line_error(proc, code, text)
        except AssertionError as exc:
            raise AssertionError(f"{args}: {exc}") from None
        assert (repo / ".crdt" / "manifest").read_bytes() == before, args


def test_commands_outside_an_initialised_repository_exit_3(tmp_path: Path) -> None:
    plain = new_repo(tmp_path / "plain", init_crdt=False)
    for args in (["list"], ["status", "--json"], ["log"]):
        assert_one_line_error(crdt(plain, *args, check=False), 3, "git crdt init")
    outside = tmp_path / "outside"
    outside.mkdir()
    assert_one_line_error(crdt(outside, "status", check=False), 3, "not inside a git work tree")


def test_a_broken_manifest_is_reported_with_its_line(repo: Path) -> None:
    (repo / ".crdt" / "manifest").write_bytes(b'{"op":"add"}\n')
    proc = crdt(repo, "status", check=False)
    assert_one_line_error(proc, errors.ManifestError.exit_code, ".crdt/manifest:1:")


def test_chunk_size_zero_is_a_usage_error(repo: Path, tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.safetensors", 1)
    proc = crdt(repo, "add-contribution", str(src), "--chunk-size", "0", check=False)
    assert proc.returncode in (2, 4)
    assert "Traceback" not in proc.stderr


def test_negative_chunk_size_never_stores_a_contribution_without_its_bytes(
    repo: Path, tmp_path: Path
) -> None:
    src = make_model(tmp_path / "m.safetensors", 1)
    before = (repo / ".crdt" / "manifest").read_bytes()
    proc = crdt(repo, "add-contribution", str(src), "--chunk-size", "-4", check=False)
    assert proc.returncode != 0
    assert (repo / ".crdt" / "manifest").read_bytes() == before


def test_name_that_is_not_utf8_is_a_one_line_error(repo: Path, tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.safetensors", 1)
    proc = subprocess.run(
        [b"git", b"crdt", b"add-contribution", str(src).encode(), b"--name", b"bad\xff"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert_one_line_error(proc, 4, "name")


def test_log_keeps_records_whose_name_holds_a_unicode_line_separator(
    repo: Path, tmp_path: Path
) -> None:
    git(repo, "config", "crdt.autoResolve", "false")
    src = make_model(tmp_path / "m.safetensors", 1)
    crdt(repo, "add-contribution", str(src), "--name", "a\u2028b", "-q")
    git(repo, "commit", "-q", "-m", "add")
    entries = json.loads(crdt(repo, "log", "--json").stdout)
    assert [e["line"] for e in entries] == (repo / ".crdt" / "manifest").read_text().split("\n")[
        :-1
    ]
    assert entries[0]["record"]["name"] == "a\u2028b"
    assert crdt(repo, "log", check=False).returncode == 0


def test_strategies_table_says_which_strategies_take_weights(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="300")
    proc = subprocess.run(
        ["git", "crdt", "strategies"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): line for line in proc.stderr.splitlines() if "│" in line}
    assert "no (ignored)" in rows["slerp"] and "no (refused)" in rows["karcher"]
    assert "│ yes" in rows["linear (weight_average)"] and "│ yes" in rows["ties"]
