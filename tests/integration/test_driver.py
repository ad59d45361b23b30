"""The merge driver ``git-crdt merge-driver %O %A %B %L %P``, run as git runs it: on files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_crdt_merge.integration import driver
from git_crdt_merge.replicated.manifest import Manifest, add_record, remove_record, set_record

IDS = [blake3.blake3(bytes([i])).hexdigest() for i in range(4)]


def tag(i: int) -> str:
    return f"{i:032x}"


def manifest_bytes(*records: object) -> bytes:
    return Manifest({}).with_records(records).serialize()  # type: ignore[arg-type]


BASE = manifest_bytes(add_record(tag(1), IDS[0], "base-model"))
OURS = manifest_bytes(
    add_record(tag(1), IDS[0], "base-model"),
    add_record(tag(2), IDS[1], "ours"),
    set_record("output", "out-ours", 1, "a" * 16),
)
THEIRS = manifest_bytes(
    add_record(tag(1), IDS[0], "base-model"),
    remove_record(tag(3), [tag(1)]),
    add_record(tag(4), IDS[2], "theirs"),
    set_record("output", "out-theirs", 1, "b" * 16),
)
JOINED = b"".join(
    sorted(set(OURS.splitlines(keepends=True)) | set(THEIRS.splitlines(keepends=True)))
)


def run_driver(
    tmp: Path, ancestor: bytes, ours: bytes, theirs: bytes, path: str = ".crdt/manifest"
) -> tuple[subprocess.CompletedProcess[str], bytes]:
    """Write the three temp files as git does (relative names in the cwd) and run the driver."""
    (tmp / ".merge_file_O").write_bytes(ancestor)
    (tmp / ".merge_file_A").write_bytes(ours)
    (tmp / ".merge_file_B").write_bytes(theirs)
    proc = subprocess.run(
        ["git-crdt", "merge-driver", ".merge_file_O", ".merge_file_A", ".merge_file_B", "7", path],
        cwd=tmp,
        capture_output=True,
        text=True,
    )
    return proc, (tmp / ".merge_file_A").read_bytes()


def test_driver_writes_the_join_to_ours_and_exits_zero(tmp_path: Path) -> None:
    proc, result = run_driver(tmp_path, BASE, OURS, THEIRS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert result == JOINED
    merged = Manifest.parse(result)
    assert [name for _, name in merged.visible_contributions()] == sorted(
        ["ours", "theirs"], key=lambda n: {"ours": IDS[1], "theirs": IDS[2]}[n]
    )
    assert merged.output() == "out-theirs"  # same clock, greater replica id
    # theirs (%B) and the ancestor are left as they were; no temporary file is left behind
    assert (tmp_path / ".merge_file_B").read_bytes() == THEIRS
    assert (tmp_path / ".merge_file_O").read_bytes() == BASE
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".merge_file_A",
        ".merge_file_B",
        ".merge_file_O",
    ]


@pytest.mark.parametrize(
    "ancestor",
    [BASE, b"", b"garbage, not a manifest\n"],
    ids=["base", "empty", "garbage"],
)
def test_driver_gives_the_join_when_the_ancestor_is_in_both_sides(
    tmp_path: Path, ancestor: bytes
) -> None:
    # ours ∪ (theirs ∖ base) == ours ∪ theirs whenever base ∩ theirs ⊆ ours
    proc, result = run_driver(tmp_path, ancestor, OURS, THEIRS)
    assert proc.returncode == 0, proc.stderr
    assert result == JOINED


def test_driver_applies_only_the_picked_change(tmp_path: Path) -> None:
    """A pick (rebase --onto, cherry-pick): %O is the picked commit's parent.  Its records
    (an excluded commit's add) must not come back onto a branch that lacks them."""
    excluded = add_record(tag(5), IDS[3], "excluded")
    picked = add_record(tag(6), IDS[1], "picked")
    onto = manifest_bytes(add_record(tag(1), IDS[0], "base-model"))
    parent = manifest_bytes(add_record(tag(1), IDS[0], "base-model"), excluded)
    commit = manifest_bytes(add_record(tag(1), IDS[0], "base-model"), excluded, picked)
    proc, result = run_driver(tmp_path, parent, onto, commit)
    assert proc.returncode == 0, proc.stderr
    assert result == manifest_bytes(add_record(tag(1), IDS[0], "base-model"), picked)


def test_driver_drops_a_picked_remove_of_an_add_this_side_lacks(tmp_path: Path) -> None:
    gone = add_record(tag(5), IDS[3], "gone")
    parent = manifest_bytes(add_record(tag(1), IDS[0], "base-model"), gone)
    commit = manifest_bytes(
        add_record(tag(1), IDS[0], "base-model"), gone, remove_record(tag(7), [tag(5)])
    )
    ours = manifest_bytes(add_record(tag(1), IDS[0], "base-model"), add_record(tag(2), IDS[1], "x"))
    proc, result = run_driver(tmp_path, parent, ours, commit)
    assert proc.returncode == 0, proc.stderr
    assert result == ours
    # a remove observing one present and one absent tag cannot be applied: a conflict
    both = manifest_bytes(
        add_record(tag(1), IDS[0], "base-model"), gone, remove_record(tag(7), [tag(1), tag(5)])
    )
    proc, result = run_driver(tmp_path, parent, ours, both)
    assert proc.returncode == 1
    assert result.startswith(b"<<<<<<< ours\n")


def test_driver_turns_a_reverted_add_into_an_observed_remove(tmp_path: Path) -> None:
    """git revert of an add commit when the manifest changed since: %O is the reverted commit,
    %B its parent.  The add stays and a remove with a tag derived from it hides it."""
    x = add_record(tag(5), IDS[3], "x")
    parent = manifest_bytes(add_record(tag(1), IDS[0], "base-model"))
    reverted = manifest_bytes(add_record(tag(1), IDS[0], "base-model"), x)
    head = manifest_bytes(
        add_record(tag(1), IDS[0], "base-model"), x, add_record(tag(2), IDS[1], "y")
    )
    proc, result = run_driver(tmp_path, reverted, head, parent)
    assert proc.returncode == 0, proc.stderr
    merged = Manifest.parse(result)
    assert set(head.splitlines()) < set(result.splitlines())  # nothing deleted
    assert [n for _, n in merged.visible_contributions()] == sorted(
        ["base-model", "y"], key=lambda n: {"base-model": IDS[0], "y": IDS[1]}[n]
    )
    _, again = run_driver(tmp_path, reverted, head, parent)
    assert again == result  # the same revert writes the same record everywhere
    # reverting that revert brings x back under a new tag
    proc, back = run_driver(tmp_path, result, result, head)
    assert proc.returncode == 0, proc.stderr
    assert "x" in [n for _, n in Manifest.parse(back).visible_contributions()]


def test_driver_revert_adds_nothing(tmp_path: Path) -> None:
    """git revert: %O is the reverted commit, %B its parent; no line is added or deleted."""
    proc, result = run_driver(tmp_path, THEIRS, OURS, BASE)
    assert proc.returncode == 0, proc.stderr
    assert result == OURS


def test_driver_result_is_independent_of_which_side_is_ours(tmp_path: Path) -> None:
    proc1, ab = run_driver(tmp_path, BASE, OURS, THEIRS)
    proc2, ba = run_driver(tmp_path, BASE, THEIRS, OURS)
    assert proc1.returncode == proc2.returncode == 0
    assert ab == ba == JOINED


def test_driver_accepts_empty_sides_and_paths_with_spaces(tmp_path: Path) -> None:
    proc, result = run_driver(tmp_path, b"", b"", OURS, path="dir with spaces/.crdt/manifest")
    assert proc.returncode == 0, proc.stderr
    assert result == OURS
    proc, result = run_driver(tmp_path, b"", b"", b"")
    assert proc.returncode == 0
    assert result == b""


MALFORMED = [
    ("crlf", OURS.replace(b"\n", b"\r\n")),
    ("unsorted", b"".join(reversed(OURS.splitlines(keepends=True)))),
    ("conflict markers", b"<<<<<<< ours\n" + OURS + b"=======\n" + THEIRS + b">>>>>>> theirs\n"),
    ("no trailing newline", OURS[:-1]),
    ("invalid utf-8", OURS + b"\xff\n"),
    (
        "remove of an unknown tag",
        manifest_bytes(add_record(tag(1), IDS[0], "x"))
        + remove_record(tag(9), [tag(8)]).line.encode()
        + b"\n",
    ),
]


@pytest.mark.parametrize("side", ["ours", "theirs"])
@pytest.mark.parametrize("bad", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_side_is_a_conflict_that_keeps_both_sides_verbatim(
    tmp_path: Path, side: str, bad: bytes
) -> None:
    ours, theirs = (bad, THEIRS) if side == "ours" else (OURS, bad)
    proc, result = run_driver(tmp_path, BASE, ours, theirs)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("git-crdt merge-driver: .crdt/manifest (" + side + ")")
    assert "Traceback" not in proc.stderr

    def block(data: bytes) -> bytes:
        return data if data.endswith(b"\n") else data + b"\n"

    assert result == (
        b"<<<<<<< ours\n" + block(ours) + b"=======\n" + block(theirs) + b">>>>>>> theirs\n"
    )
    assert ours in result and theirs in result


def test_conflict_markers_honour_the_marker_size(tmp_path: Path) -> None:
    (tmp_path / "O").write_bytes(b"")
    (tmp_path / "A").write_bytes(b"bad\n")
    (tmp_path / "B").write_bytes(OURS)
    proc = subprocess.run(
        ["git-crdt", "merge-driver", "O", "A", "B", "9", "m"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (tmp_path / "A").read_bytes() == (
        b"<" * 9 + b" ours\nbad\n" + b"=" * 9 + b"\n" + OURS + b">" * 9 + b" theirs\n"
    )


def test_driver_conflicts_when_the_two_sides_reuse_a_tag(tmp_path: Path) -> None:
    a = manifest_bytes(add_record(tag(1), IDS[0], "a"))
    b = manifest_bytes(add_record(tag(1), IDS[1], "b"))
    proc, result = run_driver(tmp_path, b"", a, b)
    assert proc.returncode == 1
    assert "used by two different records" in proc.stderr
    assert a in result and b in result


def test_driver_with_a_missing_file_exits_with_an_internal_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["git-crdt", "merge-driver", "O", "A", "missing", "7", "m"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode >= 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_driver_keeps_both_sides_when_a_side_holds_a_huge_number(tmp_path: Path) -> None:
    bad = b'{"clock":' + b"1" * 5000 + b',"key":"output","op":"set"}\n'
    proc, result = run_driver(tmp_path, b"", OURS, bad)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert OURS in result and bad in result


def test_driver_module_does_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "O").write_bytes(BASE)
    (tmp_path / "A").write_bytes(OURS)
    (tmp_path / "B").write_bytes(THEIRS)
    code = (
        "import sys; from git_crdt_merge.integration import driver; "
        "rc = driver.main(['O', 'A', 'B', '7', '.crdt/manifest']); "
        "assert rc == 0, rc; "
        "bad = sorted(m for m in ('torch', 'numpy', 'typer', 'rich', 'safetensors') "
        "if m in sys.modules); assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "A").read_bytes() == JOINED


def test_driver_entry_point_does_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "A").write_bytes(OURS)
    (tmp_path / "B").write_bytes(THEIRS)
    code = (
        "import sys; sys.argv = ['git-crdt', 'merge-driver', 'O', 'A', 'B', '7', 'p']\n"
        "from git_crdt_merge import entry\n"
        "try:\n    entry.main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules and 'typer' not in sys.modules"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "A").read_bytes() == JOINED


# -- in-process properties over many generated pairs ---------------------------------------------
@st.composite
def side_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    adds = [
        add_record(tag(i + 1), draw(st.sampled_from(IDS)), f"m{i}")
        for i in range(draw(st.integers(0, 6)))
    ]
    sides = []
    for s in range(2):
        mine = [a for a in adds if draw(st.booleans())]
        if mine and draw(st.booleans()):
            mine.append(remove_record(tag(100 + s), [mine[0].tag]))
        if draw(st.booleans()):
            mine.append(
                set_record(
                    "output",
                    f"o{s}",
                    draw(st.integers(1, 2)),
                    draw(st.sampled_from(["a" * 16, "b" * 16])),
                )
            )
        sides.append(manifest_bytes(*mine))
    return sides[0], sides[1]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(side_pairs())
def test_driver_main_is_the_symmetric_join_over_a_common_ancestor(
    tmp_path: Path, pair: tuple[bytes, bytes]
) -> None:
    a, b = pair
    common = b"".join(sorted(set(a.splitlines(True)) & set(b.splitlines(True))))
    results = []
    for ours, theirs, anc in ((a, b, b""), (b, a, common)):
        (tmp_path / "A").write_bytes(ours)
        (tmp_path / "B").write_bytes(theirs)
        (tmp_path / "O").write_bytes(anc)
        assert (
            driver.main(
                [
                    str(tmp_path / "O"),
                    str(tmp_path / "A"),
                    str(tmp_path / "B"),
                    "7",
                    ".crdt/manifest",
                ]
            )
            == 0
        )
        results.append((tmp_path / "A").read_bytes())
    assert results[0] == results[1]
    expected = b"".join(sorted(set(a.splitlines(keepends=True)) | set(b.splitlines(True))))
    assert results[0] == expected
    Manifest.parse(results[0])
