"""``git crdt verify``: check a state of the replicated set and every object it needs.

A state is the work-tree manifest with the index's objects (the default), the staged state
(``--staged``, what ``pre-commit`` checks) or a revision (``--rev``, what ``pre-push`` checks).

Fast checks (no torch, no tensor bytes read): the manifest parses strictly (every bad line is
listed); every visible contribution's and the base's descriptor is present, within the size
limit and well formed; every object a descriptor references (chunks, files, and anything nested,
such as extra inputs) is staged or committed *and* present in the object database; chunk sizes
add up to each tensor's byte count.  That is the integrity of Layer 1, what the hooks check.

``resolvable=True`` (the CLI's default) also checks that the set can be resolved: contributions
agree with each other and with the base on tensor names, dtypes and shapes, and the strategy
register passes the installed registry (known strategy, valid parameters, input contract,
weights, extra inputs).  The hooks leave that out, like the resolving hooks that only report
such problems: it needs torch, a peer may run a newer version, and the set itself is sound (a
``git crdt remove-contribution`` or ``strategy`` fixes it).  ``full=True`` re-hashes every
object with blake3.

Problems make the state invalid; *notes* name a recoverable state (an interrupted command, a
merge in progress) and its fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from .. import bounded
from ..errors import CrdtError, ManifestError, NotFoundError
from ..git import commands as gitops
from ..replicated import adapters, checks, descriptor, invariants
from ..replicated.descriptor import Descriptor
from ..replicated.encoding import layout_problem, read_tensor_into
from ..replicated.manifest import MANIFEST_PATH, Manifest, parse_record
from ..replicated.repo import Repo
from ..replicated.store import MAX_OBJECT_BYTES, ObjectStore

FIXES = {
    "manifest": "run 'git crdt repair' (it keeps every valid record), or redo the merge after "
    "'git crdt install'",
    "conflict": "run 'git crdt repair' (the union of both sides), then 'git commit'",
    "missing-object": "fetch the commit that has it, re-run 'git crdt add-contribution' with the "
    "same model, or 'git crdt remove-contribution' it",
    "absent": "run 'git crdt verify --fetch' to fetch them in one batch (resolution fetches what "
    "it needs by itself)",
    "corrupt-object": "re-run 'git crdt add-contribution' with the same model (rewrites the "
    "object), or fetch it again from a good clone",
    "descriptor": "'git crdt remove-contribution' it and add the model again",
    "incompatible": "'git crdt remove-contribution' the odd one out; every contribution must "
    "have the base's tensor names, dtypes and shapes",
    "register": "'git crdt strategy NAME --param KEY=VALUE' (see 'git crdt strategies')",
    "lost-record": invariants.LOST_FIX,
    "attributes": "put '.crdt/manifest merge=crdt text eol=lf' back into .gitattributes "
    "('git crdt init' does it) and stage it",
    "output": "run 'git crdt resolve': a modified cache entry is dropped and computed again, "
    "and a modified output folder is published again from the cache",
}


@dataclass
class Problem:
    kind: str
    message: str

    @property
    def fix(self) -> str:
        return FIXES[self.kind]

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message, "fix": self.fix}

    def __str__(self) -> str:
        return self.message


@dataclass
class Report:
    state: str = "work tree"
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    contributions: int = 0
    objects: int = 0
    bytes_hashed: int = 0
    hash_seconds: float = 0.0
    seconds: float = 0.0

    def add(self, kind: str, message: str) -> None:
        self.problems.append(Problem(kind, message))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.problems,
            "state": self.state,
            "problems": [p.as_dict() for p in self.problems],
            "notes": self.notes,
            "contributions": self.contributions,
            "objects": self.objects,
            "bytes_hashed": self.bytes_hashed,
            "hash_seconds": round(self.hash_seconds, 3),
            "seconds": round(self.seconds, 3),
        }


def _parse_leniently(data: bytes, source: str, report: Report) -> Manifest | None:
    """Strict parse; on failure list every bad line and go on with the valid records."""
    try:
        return Manifest.parse(data, source)
    except ManifestError as exc:
        report.add("manifest", str(exc))
    lines = data.decode("utf-8", errors="replace").split("\n")
    valid = []
    for no, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            valid.append(parse_record(line))
        except ManifestError as exc:
            msg = f"{source}:{no}: {exc}"
            if len(report.problems) < 1000 and msg != report.problems[0].message:
                report.add("manifest", msg)
    try:
        return Manifest({}).with_records(valid)
    except ManifestError:
        return None


def _unstaged_note(repo: Repo) -> str | None:
    work = repo.read_manifest_bytes()
    staged, _ = repo.manifest_bytes_at(":")
    if work == staged:
        return None
    if set(staged.splitlines()) <= set(work.splitlines()):
        return (
            "the work-tree manifest has records that are not staged (an interrupted git-crdt "
            "command, or an unstaged edit): 'git add .crdt/manifest', or re-run the command"
        )
    return "the work-tree manifest differs from the staged one: 'git add .crdt/manifest'"


def verify(
    repo: Repo,
    rev: str | None = ":",
    *,
    full: bool = False,
    resolvable: bool = False,
    fetch: bool = False,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    hash_new_against: str | None = None,
) -> Report:
    """Verify the state at ``rev`` (None: work tree manifest + index objects; ":" staged).

    In a partial clone, objects not fetched yet are reported as ``absent``; ``fetch=True``
    first fetches what the visible set needs, in one batch per level.

    ``hash_new_against``: also re-hash (blake3) every object of the state that the tree of
    that revision does not hold with the same git blob, i.e. what the state brings in (the
    hooks that pass content on: ``pre-merge-commit``, ``pre-push``); ``""`` hashes all."""
    t0 = time.perf_counter()
    repo.require_initialized()
    report = Report(state={None: "work tree", ":": "staged"}.get(rev, f"revision {rev}"))
    if rev not in (None, ":"):
        commit = gitops.commit_of(repo.root, rev)
        if commit is None:
            raise NotFoundError(f"no commit {rev!r}")
        rev = commit
    elif gitops.unmerged_paths(repo.root, MANIFEST_PATH):
        report.add("conflict", f"{MANIFEST_PATH} has an unresolved merge conflict")
        return report
    data, source = repo.manifest_bytes_at(rev)
    manifest = _parse_leniently(data, source, report)
    if manifest is None:
        return report
    if rev is None or rev == ":":
        note = _unstaged_note(repo)
        if note:
            report.notes.append(note)
    _check_history(repo, rev, data, report)
    store = ObjectStore(repo.root, rev=None if rev in (None, ":") else rev)
    if fetch:
        from ..replicated.contributions import fetch_set

        try:
            fetch_set(store, manifest)
        except CrdtError as exc:
            report.notes.append(f"could not fetch every absent object: {exc}")
    _check_objects(repo, store, manifest, report, resolvable)
    if hash_new_against is not None and not full:
        t1 = time.perf_counter()
        only = new_objects(repo, store, hash_new_against)
        _rehash(repo, store, report, progress, on_start, only)
        report.hash_seconds = time.perf_counter() - t1
    if full and not any(p.kind == "conflict" for p in report.problems):
        t1 = time.perf_counter()
        bad = _rehash(repo, store, report, progress, on_start)
        _check_content(store, manifest, report, bad)
        if store.rev is None:  # the clone's own results: the cache and the published folders
            from ..resolution import cache

            for msg in cache.verify_outputs(repo):
                report.add("output", msg)
        report.hash_seconds = time.perf_counter() - t1
    report.seconds = time.perf_counter() - t0
    return report


def _check_history(repo: Repo, rev: str | None, data: bytes, report: Report) -> None:
    """The join invariant (no record of a parent or of MERGE_HEAD lost) and the driver
    binding (docs/design.md, "History operations")."""
    if rev is None or rev == ":":
        found = invariants.state_losses(repo, invariants.lines_of(data))
    else:
        found = invariants.commit_losses(repo, rev)
    for msg in invariants.loss_messages(f"the {report.state} manifest", found):
        report.add("lost-record", msg)
    problem = invariants.attribute_problem(repo, rev)
    if problem:
        report.add("attributes", problem)


def _check_objects(
    repo: Repo, store: ObjectStore, manifest: Manifest, report: Report, resolvable: bool
) -> None:
    visible = manifest.visible_contributions()
    report.contributions = len(visible)
    base = manifest.base()
    required = {cid: f"contribution {name!r} ({cid[:12]})" for cid, name in visible}
    if base:
        required[base] = f"base ({base[:12]})"
    # The descriptor each required id is read from; every other descriptor (removed
    # contributions, earlier bases, a second copy of the same content stored with another
    # chunk size) is not needed, but its objects are not strays.
    pairs: list[tuple[str, str, bool]] = []
    for cid in sorted(required):
        found_at = manifest.descriptors_of(cid) or [cid]
        pairs.append((cid, found_at[0], True))
        pairs += [(cid, a, False) for a in found_at[1:]]
    ids = {r.fields["id"] for r in manifest.adds()} | set(_base_ids(manifest))
    for cid in sorted(ids - set(required)):
        pairs += [(cid, a, False) for a in manifest.descriptors_of(cid)]
    known = store.known()
    sizes = _object_sizes(store, known)
    descs: dict[str, Descriptor] = {}
    referenced: set[str] = set()
    for cid, address, must in pairs:
        what = required[cid] if must else f"removed contribution or earlier base {cid[:12]}"
        referenced.add(address)
        sha = known.get(address)
        if sha is None or sizes.get(sha) is None:
            if must:
                _report_missing(report, store, sha, f"{what}: descriptor {address[:16]}")
            continue
        if (sizes[sha] or 0) > checks.MAX_DESCRIPTOR_BYTES:
            report.add("descriptor", f"{what}: descriptor larger than the limit")
            continue
        try:
            data = store.get(address, verify=True)  # small: always checked against its name
        except CrdtError as exc:
            kind = "corrupt-object" if "blake3" in str(exc) else "missing-object"
            if must:
                report.add(kind, f"{what}: {exc}")
            continue
        try:
            desc = bounded.loads_json(data, "descriptor")
        except CrdtError as exc:
            if must:
                report.add("descriptor", f"{what}: {exc}")
            continue
        found = checks.descriptor_problems(desc, what)
        if not found and descriptor.contribution_id(desc, data) != cid:
            found = [f"{what}: descriptor {address[:16]} does not describe this contribution"]
        if must:
            for msg in found:
                report.add("descriptor", msg)
        if found:
            continue
        if must:
            descs[cid] = Descriptor.from_json(desc)
        for oid, path in checks.object_references(desc):
            referenced.add(oid)
            osha = known.get(oid)
            if not must:
                continue
            if osha is None or sizes.get(osha) is None:
                _report_missing(report, store, osha, f"{what}: object {oid[:16]} ({path})")
            elif store.lfs_absent([oid]):
                report.add(
                    "absent",
                    f"{what}: object {oid[:16]} ({path}) is in Git LFS and not fetched yet "
                    "('git crdt verify --fetch' or 'git crdt resolve' fetches it)",
                )
            elif (sizes[osha] or 0) > MAX_OBJECT_BYTES:
                report.add("descriptor", f"{what}: object {oid[:16]} ({path}) is too large")
        if must:
            _check_chunk_sizes(descs[cid], what, known, sizes, report)
    referenced |= store.slice_holders(referenced)  # model files whose slices are chunks
    report.objects = len(referenced & set(known))
    if resolvable:
        compatible = [(cid, required[cid]) for cid, _ in visible if cid in descs]
        _check_compatibility(store, manifest, compatible, base, descs, report)
        _check_registers(manifest, visible, descs, report)
    if store.rev is None:
        stray = sorted(set(known) - referenced)
        if stray:
            report.notes.append(
                f"{len(stray)} staged objects are referenced by no record (left by an "
                "interrupted add-contribution or set-base; harmless: a re-run reuses them)"
            )


def _object_sizes(store: ObjectStore, known: Mapping[str, str]) -> dict[str, int | None]:
    """SHA-1 -> the object's size (a chunk kept in Git LFS: its pointer's size) from the
    object headers, read directly (None: absent, or not a readable blob).  No git process:
    ``cat-file --batch-check`` would fetch the absent objects of a partial clone one at a
    time."""
    sizes: dict[str, int | None] = {}
    for oid, sha in known.items():
        try:
            sizes[sha] = store.size(oid)
        except CrdtError:
            sizes[sha] = None
    return sizes


def _report_missing(report: Report, store: ObjectStore, sha: str | None, what: str) -> None:
    if sha is None:
        report.add("missing-object", f"{what} is not staged or committed")
    elif store.partial and store.db.entry(sha) is None:
        report.add("absent", f"{what} is not fetched yet (partial clone)")
    else:
        report.add("missing-object", f"{what} is not in the object database")


def _base_ids(manifest: Manifest) -> list[str]:
    """Every id the base register was ever set to."""
    out = []
    for r in manifest.records.values():
        if r.op == "set" and r.fields["key"] == "base":
            value = r.fields["value"]
            if isinstance(value, dict):
                out.append(str(value["id"]))
            elif isinstance(value, str):
                out.append(value)
    return out


def _check_chunk_sizes(
    desc: Descriptor,
    what: str,
    known: dict[str, str],
    sizes: dict[str, int | None],
    report: Report,
) -> None:
    def size_of(oid: str) -> int | None:
        return sizes.get(known.get(oid, ""), None)  # None: reported as missing

    for path, entry in desc.entries():
        why = layout_problem(entry.nbytes, entry.chunks, entry.encoding, size_of, "")
        if why is not None:
            report.add(
                "corrupt-object",
                f"{what}: tensor {entry.name!r} ({path}){why} (truncated or substituted object)",
            )


def _check_compatibility(
    store: ObjectStore,
    manifest: Manifest,
    visible: list[tuple[str, str]],
    base: str | None,
    descs: dict[str, Descriptor],
    report: Report,
) -> None:
    """The rule resolve's plan applies (``adapters.set_problems``): full models against the
    base (or each other), LoRA adapters against the base and each other, the adapter output
    only for adapters; so verify passes exactly the sets that resolve."""
    from ..strategies import registry  # imports torch: only the full CLI check comes here

    try:
        base_used = registry.get_strategy(manifest.strategy()["name"]).base != "ignored"
    except CrdtError:
        base_used = True  # the unknown strategy is reported by _check_registers
    base_desc = descs.get(base) if base is not None else None
    if base is not None and base_desc is None:
        return  # a missing or broken base is reported already
    members, problems = adapters.members(store, base_desc, [(w, descs[c]) for c, w in visible])
    problems += adapters.set_problems(
        base_desc,
        members,
        base_used=base_used,
        adapter_output=manifest.adapter_rank() is not None,
    )
    config_from = manifest.config_from()
    if config_from is not None and config_from not in {c for c, _ in visible} | {base}:
        problems.append(
            f"register config_from names {config_from[:12]}, which is not a visible "
            "contribution; set it again with 'git crdt output --config-from NAME'"
        )
    for msg in problems:
        report.add("incompatible", msg)


def _check_registers(
    manifest: Manifest,
    visible: list[tuple[str, str]],
    descs: dict[str, Descriptor],
    report: Report,
) -> None:
    from .. import plugins
    from ..strategies import registry  # imports torch: only the full CLI check comes here

    value = manifest.strategy()
    try:
        strategy = registry.get_strategy(value["name"])
        if not visible:
            return  # an empty set resolves to nothing: no contract to meet yet
        registry.check_contract(strategy, len(visible), manifest.base() is not None)
        params = registry.resolve_params(strategy, value["params"], visible)
        for pname, group in registry.PLUGIN_PARAMS.items():
            plugin = params.get(pname)
            if isinstance(plugin, str) and plugin and not plugins.installed(group, plugin):
                report.add(
                    "register",
                    f"strategy {strategy.name}: plugin {plugin!r} not found in entry point "
                    f"group {group!r}: this clone cannot resolve the set",
                )
        weights = [descs[c].weight for c, _ in visible if c in descs]
        if len(weights) == len(visible):
            registry.check_weights(strategy, weights, visible)
    except CrdtError as exc:
        report.add("register", str(exc))
        return
    for kind in getattr(strategy, "extra_inputs", ()) or ():
        for cid, name in visible:
            if cid not in descs or kind not in descs[cid].extras:
                report.add(
                    "register",
                    f"strategy {strategy.name} needs extra input {kind!r}, which contribution "
                    f"{name!r} ({cid[:12]}) lacks",
                )


def _check_content(store: ObjectStore, manifest: Manifest, report: Report, bad: set[str]) -> None:
    """Each format-2 tensor's chunks, joined, against the content hash its id is made of: two
    descriptors that claim one id must describe the same bytes.  Tensors with a chunk in
    ``bad`` (already reported as not matching its name) are skipped."""
    ids = [cid for cid, _ in manifest.visible_contributions()]
    base = manifest.base()
    ids += [base] if base else []
    for cid in ids:
        try:
            desc = bounded.loads_json(store.get(manifest.descriptor_address(cid)), "descriptor")
        except (CrdtError, ValueError):
            continue  # reported by the fast checks
        if checks.descriptor_problems(desc, "") or desc.get("format") != descriptor.FORMAT_V2:
            continue
        for _, entry in Descriptor.from_json(desc).entries():
            name = entry.name
            if bad.intersection(entry.chunks):
                continue
            if entry.encoding is not None:  # decoded, and checked against its content hash
                if entry.encoding.base is not None and bad.intersection(entry.encoding.base.chunks):
                    continue
                try:
                    read_tensor_into(store, entry, memoryview(bytearray(entry.nbytes)))
                except CrdtError as exc:
                    if "content hash" in str(exc):
                        report.add("corrupt-object", f"contribution {cid[:12]}: {exc}")
                    continue  # otherwise a missing or unreadable chunk, reported already
                continue
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            try:
                for chunk in entry.chunks:
                    hasher.update(store.get(chunk, verify=False))  # checked by _rehash
            except CrdtError:
                continue  # a missing chunk is reported already
            if hasher.hexdigest() != entry.blake3:
                report.add(
                    "corrupt-object",
                    f"contribution {cid[:12]}: tensor {name!r} does not match the content "
                    "hash in its descriptor",
                )


def new_objects(repo: Repo, store: ObjectStore, against: str) -> set[str]:
    """Object ids of ``store``'s state that the tree of ``against`` lacks, or holds as another
    git blob (all of them when ``against`` is "" or not a commit here)."""
    known = store.known()
    if not against:
        return set(known)
    commit = gitops.commit_of(repo.root, against)
    if commit is None:
        return set(known)
    old = ObjectStore(repo.root, rev=commit).known()
    return {oid for oid, sha in known.items() if old.get(oid) != sha}


def _rehash(
    repo: Repo,
    store: ObjectStore,
    report: Report,
    progress: Callable[[int], None] | None,
    on_start: Callable[[int], None] | None,
    only: set[str] | None = None,
) -> set[str]:
    """blake3 of every object (or of those in ``only``) against its name, at disk speed: each
    object is read straight into one reusable buffer and hashed with all cores.  Returns the
    ids found bad."""
    bad: set[str] = set()
    known = store.known()
    if only is not None:
        known = {oid: sha for oid, sha in known.items() if oid in only}
    sizes = _object_sizes(store, known)
    absent = set(store.lfs_absent(known))  # reported as absent by the fast checks
    # a model file kept whole in LFS is checked through its slices (each a chunk)
    absent |= store.slice_holders(known)
    items = sorted(
        (oid, sha) for oid, sha in known.items() if sizes.get(sha) is not None and oid not in absent
    )
    if on_start is not None:
        on_start(sum(sizes[sha] or 0 for _, sha in items))
    buf = bytearray(max((sizes[sha] or 0 for _, sha in items), default=0))
    for oid, sha in items:
        n = sizes[sha] or 0
        view = memoryview(buf)[:n]
        try:
            store.read_chunk_into(oid, view)
        except Exception as exc:  # corrupt zlib stream, truncated file, bad pack entry
            report.add("corrupt-object", f"object {oid[:16]} cannot be read ({exc})")
            bad.add(oid)
            continue
        if blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest() != oid:
            report.add("corrupt-object", f"object {oid[:16]} does not match its blake3 name")
            bad.add(oid)
        report.bytes_hashed += n
        if progress is not None:
            progress(n)
    return bad
