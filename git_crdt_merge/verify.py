"""Fast verification of a manifest state and the objects it references (no torch).

Checks: the manifest parses strictly; every visible contribution's descriptor, the base's
descriptor, and every chunk and file they reference are present in the same state (index or
revision).  ``full=True`` also re-hashes every object with blake3.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3

from . import gitops
from .errors import CrdtError, ManifestError
from .manifest import MANIFEST_PATH, Manifest
from .repo import Repo
from .store import ObjectStore


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    contributions: int = 0
    objects: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.problems,
            "problems": self.problems,
            "contributions": self.contributions,
            "objects": self.objects,
        }


def load_state(repo: Repo, rev: str | None) -> Manifest:
    """The manifest of a revision, of the index (rev=":"), or of the work tree (rev=None)."""
    if rev is None:
        return repo.read_manifest()
    spec = f":{MANIFEST_PATH}" if rev == ":" else f"{rev}:{MANIFEST_PATH}"
    data = gitops.show_blob(repo.root, spec)
    return Manifest.parse(data or b"", spec)


def verify(
    repo: Repo,
    rev: str | None = ":",
    *,
    full: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Verify the state at ``rev`` (":" = staged, None = work tree manifest + index objects)."""
    report = Report()
    try:
        manifest = load_state(repo, rev)
    except ManifestError as exc:
        report.problems.append(str(exc))
        return report
    store = ObjectStore(repo.root, rev=None if rev in (None, ":") else rev)
    ids = [cid for cid, _ in manifest.visible_contributions()]
    report.contributions = len(ids)
    base = manifest.base()
    needed: dict[str, str] = {}
    for cid in ids + ([base] if base else []):
        what = "base" if cid == base else "contribution"
        try:
            desc = json.loads(store.get(cid))
            tensors = desc["tensors"]
            files = desc.get("files", {})
        except CrdtError as exc:
            report.problems.append(f"{what} {cid[:12]}: {exc}")
            continue
        except (ValueError, KeyError, TypeError):
            report.problems.append(f"{what} {cid[:12]}: descriptor is malformed")
            continue
        needed[cid] = f"descriptor of {what} {cid[:12]}"
        for tname, info in tensors.items():
            for oid in info.get("chunks", []):
                needed.setdefault(oid, f"chunk of tensor {tname!r} in {what} {cid[:12]}")
        for fname, oid in files.items():
            needed.setdefault(oid, f"file {fname} of {what} {cid[:12]}")
        for kind, table in desc.get("extras", {}).items():
            for tname, info in table.get("tensors", {}).items():
                for oid in info.get("chunks", []):
                    needed.setdefault(oid, f"chunk of {kind} {tname!r} in {what} {cid[:12]}")
    for oid, what in sorted(needed.items()):
        if not store.has(oid):
            report.problems.append(f"missing object {oid[:16]} ({what})")
            continue
        report.objects += 1
        if full:
            data = store.get(oid)
            if blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest() != oid:
                report.problems.append(f"object {oid[:16]} does not match its hash ({what})")
            if progress is not None:
                progress(len(data))
    return report
