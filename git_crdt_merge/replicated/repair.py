"""``git crdt repair``: rebuild a valid manifest from a damaged one.

The usual damage is a text merge by a clone without the driver: conflict markers around the
two sides' lines.  Because the manifest is a grow-only set, the union of every record line in
the file (ours, theirs, and a diff3 base section) is exactly the join the driver would have
made.  Lines that do not parse are reported, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ManifestError
from .manifest import Manifest, Record, canonical_json, parse_record
from .repo import Repo, atomic_write

MARKERS = ("<<<<<<<", "|||||||", "=======", ">>>>>>>")


def _canonical(line: str) -> str:
    """Re-serialise a line that is JSON but not canonical (e.g. reformatted by an editor)."""
    try:
        return canonical_json(json.loads(line))
    except ValueError:
        return line


@dataclass
class RepairResult:
    manifest: Manifest
    records: int
    markers: int
    invalid: list[str] = field(default_factory=list)


def repair_bytes(data: bytes, *, drop_invalid: bool = False) -> RepairResult:
    """The union of every valid record line in ``data``.

    Invalid lines raise ManifestError naming them, unless ``drop_invalid`` (then they are
    returned in ``invalid`` so the caller can save them).
    """
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    records: dict[str, Record] = {}
    markers = 0
    invalid: list[str] = []
    for no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if line.startswith(MARKERS):
            markers += 1
            continue
        try:
            rec = parse_record(_canonical(line))
        except ManifestError as exc:
            if not drop_invalid:
                msg = f"line {no}: {exc} (pass --drop-invalid to set it aside)"
                raise ManifestError(msg) from None
            invalid.append(line)
            continue
        records[rec.line] = rec
    if drop_invalid:
        for line in _inconsistent(records):
            invalid.append(records.pop(line).line)
    state = Manifest(records)
    try:
        state._check_consistency("repaired manifest")
    except ManifestError as exc:
        raise ManifestError(f"{exc} (pass --drop-invalid to set it aside)") from None
    return RepairResult(state, len(records), markers, invalid)


def _inconsistent(records: dict[str, Record]) -> list[str]:
    """Lines that keep the records from being one state, each valid on its own: a record
    that reuses a tag (the first in file order keeps it) and a remove that observes a tag no
    add has (it cannot have observed it)."""
    ordered = sorted(records.values(), key=lambda r: r.line.encode())
    seen: set[str] = set()
    drop = []
    for rec in ordered:
        if rec.op == "set":
            continue
        if rec.tag in seen:
            drop.append(rec.line)
        else:
            seen.add(rec.tag)
    dropped = set(drop)
    adds = {r.tag for r in ordered if r.op == "add" and r.line not in dropped}
    for rec in ordered:
        if rec.op == "remove" and rec.line not in dropped:
            if any(t not in adds for t in rec.fields["observed"]):
                drop.append(rec.line)
    return drop


def damaged_bytes(repo: Repo) -> bytes:
    """The work-tree manifest, plus both sides of a conflicted merge (index stages 2 and 3)."""
    data = repo.read_manifest_bytes()
    for stage in (2, 3):
        side, _ = repo.manifest_bytes_at(f":{stage}")
        if side:
            data += b"\n" + side
    return data


def repair_manifest(
    repo: Repo, *, drop_invalid: bool = False, dry_run: bool = False
) -> tuple[RepairResult, Path | None]:
    """Rebuild the manifest from :func:`damaged_bytes` and stage it (under the lock and git's
    index lock, read again there: the state the commit will see).  Lines set aside with
    ``drop_invalid`` are appended to ``.git/crdt/repair-invalid-lines.txt``, whose path is
    returned (None when nothing was set aside or ``dry_run`` wrote nothing)."""
    repo.require_initialized()
    result = repair_bytes(damaged_bytes(repo), drop_invalid=drop_invalid)
    saved = None
    if not dry_run:
        with repo.lock(), repo.transaction() as env:
            result = repair_bytes(damaged_bytes(repo), drop_invalid=drop_invalid)
            if result.invalid:
                saved = repo.state_dir / "repair-invalid-lines.txt"
                old = saved.read_bytes() if saved.exists() else b""
                lines = "".join(f"{x}\n" for x in result.invalid)
                atomic_write(saved, old + lines.encode())
            repo.write_manifest(result.manifest, env)
    return result, saved
