"""``git crdt log``: every record with the commit that introduced it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..bounded import loads_json
from ..errors import CrdtError
from ..git import commands as gitops
from ..replicated.manifest import MANIFEST_PATH
from ..replicated.repo import Repo


@dataclass
class LogEntry:
    commit: str | None  # None: staged or in the work tree, not committed yet
    subject: str
    line: str

    def as_dict(self) -> dict[str, object]:
        """``record`` is the record as a JSON object (None for a line of a commit that is not
        one: history is shown as it is); ``line`` is its canonical text, as the manifest has
        it (what a record's identity is)."""
        return {
            "commit": self.commit,
            "subject": self.subject,
            "record": self.record(),
            "line": self.line,
        }

    def record(self) -> dict[str, Any] | None:
        try:
            value = loads_json(self.line, "record")
        except CrdtError:
            return None
        return value if isinstance(value, dict) else None


def _lines(data: bytes | None) -> set[str]:
    if not data:
        return set()
    # split on "\n" only: names may hold other Unicode line separators (U+2028, U+0085)
    return set(data.decode("utf-8", errors="replace").split("\n")) - {""}


def record_log(repo: Repo, rev: str = "HEAD") -> list[LogEntry]:
    """Records in the order their introducing commits were made (parents first)."""
    history = gitops.manifest_history(repo.root, MANIFEST_PATH, rev)
    by_commit: dict[str, set[str]] = {}
    entries: list[LogEntry] = []
    for commit, subject, parents, data in history:
        lines = _lines(data)
        by_commit[commit] = lines
        inherited: set[str] = set()
        for p in parents:
            inherited |= by_commit.get(p, set())
        for line in sorted(lines - inherited):
            entries.append(LogEntry(commit, subject, line))
    committed = set().union(*by_commit.values()) if by_commit else set()
    try:
        current = set(repo.read_manifest().records)
    except Exception:
        current = set()
    for line in sorted(current - committed):
        entries.append(LogEntry(None, "(not committed)", line))
    # Keep only records still present: the manifest is grow-only, so a line disappears only
    # when a branch is rewritten; the first commit that has it is the one shown.
    seen: set[str] = set()
    unique = []
    for e in entries:
        if e.line not in seen:
            seen.add(e.line)
            unique.append(e)
    return unique
