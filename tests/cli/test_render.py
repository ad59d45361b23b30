"""How results look: tables and step progress, rendered into a recording console."""

from __future__ import annotations

import json

from rich.console import Console

from git_crdt_merge.cli.render import demo_tables, log_table, step_progress

ID_A, ID_B = "a" * 64, "b" * 64
TAG_A, TAG_B = "1" * 32, "2" * 32


def _text(*renderables: object) -> str:
    console = Console(record=True, width=200, color_system=None)
    for r in renderables:
        console.print(r)
    return console.export_text()


def _entry(commit: str | None, subject: str, record: dict[str, object]) -> dict[str, object]:
    line = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return {"commit": commit, "subject": subject, "record": record, "line": line}


def test_log_table_summarises_each_kind_of_record() -> None:
    entries = [
        _entry(
            "c" * 40,
            "base",
            {"op": "set", "key": "base", "value": ID_B, "clock": 1, "replica": "f" * 16},
        ),
        _entry(
            "d" * 40,
            "math",
            {"op": "add", "id": ID_A, "name": "math", "tag": TAG_A, "message": "first try"},
        ),
        _entry(None, "(not committed)", {"op": "remove", "observed": [TAG_A], "tag": TAG_B}),
    ]
    text = _text(log_table(entries))
    assert "cccccccccc" in text and "dddddddddd" in text
    assert f'base = "{ID_B[:12]}"  (clock 1)' in text
    assert ID_B not in text  # ids are shortened
    assert f"math {ID_A[:12]} (first try)" in text
    rows = [ln for ln in text.splitlines() if "remove" in ln]
    assert (
        len(rows) == 1 and f"math {ID_A[:12]}" in rows[0] and rows[0].lstrip("│ ").startswith("-")
    )


def test_step_progress_prints_numbered_lines_when_not_a_terminal() -> None:
    console = Console(record=True, width=100, force_terminal=False)
    with step_progress(console, 3, True) as step:
        step("one")
        step("two")
    assert console.export_text().splitlines() == ["[1/3] one", "[2/3] two"]
    quiet = Console(record=True, width=100, force_terminal=False)
    with step_progress(quiet, 3, False) as step:
        step("one")
    assert quiet.export_text() == ""


def test_demo_tables_show_roots_hashes_and_accuracy() -> None:
    report = {
        "clones": ["alice", "bob"],
        "merge_order": {"alice": "push", "bob": "merge"},
        "roots": {"ties": {"alice": "r" * 64, "bob": "r" * 64}},
        "files": {"ties": {w: {"model.safetensors": "h" * 64} for w in ("alice", "bob")}},
        "accuracy": [
            {"model": "base", "kind": "base", "0-3": 0.5, "all": 0.25},
            {"model": "ties", "kind": "merged", "0-3": 0.875, "all": 0.9},
        ],
    }
    text = _text(*demo_tables(report))
    assert text.count("r" * 10) == 2 and text.count("h" * 10) == 2
    assert "87.5%" in text and "90.0%" in text and "25.0%" in text
