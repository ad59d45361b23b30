"""Writing the replicated state: add and remove contributions, set registers.

Every writer takes the repository lock, writes and stages the objects first, and only then
writes the manifest (atomically) and stages it, so a crash never leaves a manifest that
references an object that was not written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import FORMAT_VERSION, checks, extras, faults, formats, gitops
from .errors import CrdtError, InputError, ManifestError, NotFoundError
from .manifest import (
    MANIFEST_PATH,
    Manifest,
    add_record,
    canonical_json,
    check_name,
    remove_record,
    set_record,
)
from .repo import Repo, new_tag
from .store import DEFAULT_CHUNK_SIZE, ObjectStore, split_chunks

Progress = Callable[[int], None]


@dataclass
class IngestResult:
    id: str
    name: str
    tensors: int
    bytes: int
    new_bytes: int
    new_objects: int
    already_present: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_descriptor(
    store: ObjectStore,
    source: formats.ModelSource,
    *,
    weight: float | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    extra_inputs: Mapping[str, Path] | None = None,
) -> tuple[bytes, int, int]:
    """Store every tensor and auxiliary file of ``source`` and of its extra inputs (kind ->
    safetensors file, checked against the model first); return (descriptor bytes, total tensor
    bytes, bytes newly written)."""
    tensors: dict[str, Any] = {}
    total = 0
    new = [0]

    def on_chunk(n: int, is_new: bool) -> None:
        if is_new:
            new[0] += n
        if progress is not None:
            progress(n)

    metadata: dict[str, str] = {}
    # All chunks of all tensors go to the store at once, so hashing and writing run in
    # parallel across tensors, not only within one.
    all_tensors = list(formats.iter_tensors(source))
    model = {t.name: list(t.shape) for t in all_tensors}
    extra_tables: dict[str, list[formats.TensorData]] = {
        kind: list(extras.load_extra(kind, path, model))
        for kind, path in sorted((extra_inputs or {}).items())
    }
    spans: list[tuple[int, int]] = []
    chunks: list[memoryview] = []
    for tensor in all_tensors:
        pieces = split_chunks(tensor.data, chunk_size)
        spans.append((len(chunks), len(chunks) + len(pieces)))
        chunks.extend(pieces)
    ids = store.put_chunks(chunks, on_chunk)
    for tensor, (lo, hi) in zip(all_tensors, spans, strict=True):
        tensors[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": tensor.shape,
            "chunks": ids[lo:hi],
            "bytes": len(tensor.data),
        }
        total += len(tensor.data)
    extra_desc: dict[str, Any] = {}
    for kind, items in extra_tables.items():
        split = [split_chunks(t.data, chunk_size) for t in items]
        extra_ids = store.put_chunks([c for part in split for c in part], on_chunk)
        table: dict[str, Any] = {}
        start = 0
        for t, part in zip(items, split, strict=True):
            table[t.name] = {
                "dtype": t.dtype,
                "shape": t.shape,
                "chunks": extra_ids[start : start + len(part)],
                "bytes": len(t.data),
            }
            start += len(part)
        extra_desc[kind] = {"tensors": table}
    if not source.pickled:
        for f in source.files:
            metadata.update(formats.file_metadata(f))
    files = {name: store.put(path.read_bytes()) for name, path in sorted(source.aux.items())}
    desc: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "kind": source.kind,
        "tensors": tensors,
        "files": files,
        "metadata": metadata,
    }
    if weight is not None:
        desc["weight"] = weight
    if extra_desc:  # absent when there are none: older descriptors keep their ids
        desc["extras"] = extra_desc
    return canonical_json(desc).encode(), total, new[0]


def _ingest(
    store: ObjectStore,
    source: formats.ModelSource,
    weight: float | None,
    chunk_size: int,
    on_start: Callable[[int], None] | None,
    progress: Progress | None,
    extra_inputs: Mapping[str, Path] | None = None,
) -> tuple[str, bytes, int, int]:
    """Store a model's objects and its descriptor: (id, descriptor, bytes, new bytes)."""
    if on_start is not None:
        on_start(source.total_bytes())
    desc, total, new_bytes = build_descriptor(
        store,
        source,
        weight=weight,
        chunk_size=chunk_size,
        progress=progress,
        extra_inputs=extra_inputs,
    )
    return store.put(desc), desc, total, new_bytes


def load_descriptor(store: ObjectStore, contribution_id: str) -> dict[str, Any]:
    size = store.size(contribution_id)
    if size is not None and size > checks.MAX_DESCRIPTOR_BYTES:
        raise ManifestError(f"descriptor {contribution_id[:16]} is larger than the limit")
    data = store.get(contribution_id, max_size=checks.MAX_DESCRIPTOR_BYTES)
    try:
        desc = json.loads(data)
    except ValueError:
        raise ManifestError(f"descriptor {contribution_id[:16]} is not JSON") from None
    if not isinstance(desc, dict) or not isinstance(desc.get("tensors"), dict):
        raise ManifestError(f"descriptor {contribution_id[:16]} has no tensor table")
    return desc


def fetch_set(store: ObjectStore, manifest: Manifest) -> int:
    """In a partial clone, fetch what resolving the visible set reads and this clone lacks:
    the descriptors in one batch, then every object they reference in one batch.  Returns the
    number of objects fetched (0 in a full clone, with no git process started)."""
    if not store.partial:
        return 0
    ids = [cid for cid, _ in manifest.visible_contributions()]
    base = manifest.base()
    if base is not None:
        ids.append(base)
    fetched = store.fetch_absent(ids)
    refs: set[str] = set()
    for cid in ids:
        if store.has(cid):
            refs |= {oid for oid, _ in checks.object_references(load_descriptor(store, cid))}
    return fetched + store.fetch_absent(refs)


def _check_weight(weight: float | None) -> None:
    if weight is not None and not math.isfinite(weight):
        raise InputError(f"--weight must be a finite number, got {weight}")


def default_name(path: Path) -> str:
    name = path.name if path.is_dir() else path.stem
    return name or "model"


def add_contribution(
    repo: Repo,
    path: Path,
    *,
    name: str | None = None,
    weight: float | None = None,
    message: str | None = None,
    allow_pickle: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_start: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    extra_inputs: Mapping[str, Path] | None = None,
    allow_nonfinite: bool = False,
) -> IngestResult:
    """Store the model at ``path`` and record it in the manifest (both staged).

    ``extra_inputs`` maps an extra-input kind (``extras.KINDS``) to a safetensors file stored
    with the model and referenced from its descriptor."""
    repo.require_initialized()
    _check_weight(weight)
    source = formats.discover(path, allow_pickle=allow_pickle)
    name = name if name is not None else default_name(path)
    try:
        check_name(name, "contribution name")
    except ManifestError as exc:
        raise InputError(str(exc)) from None
    if message is not None and len(message) > 4096:
        raise InputError("--message is longer than 4096 characters")
    table = checks.scan_source(source, allow_nonfinite=allow_nonfinite)
    with repo.lock():
        manifest = repo.read_manifest()
        store = ObjectStore(repo.root)
        check_fits(store, manifest, table, source.kind, f"model {name!r}")
        cid, desc, total, new_bytes = _ingest(
            store, source, weight, chunk_size, on_start, progress, extra_inputs
        )
        n_tensors = len(json.loads(desc)["tensors"])
        faults.point("add:objects-written")
        # Objects first, in their own index transaction: a crash after it leaves staged
        # objects that no record names (harmless, a re-run reuses them), never a record
        # without its objects.
        with repo.transaction() as env:
            new_objects = store.flush(env)
        faults.point("add:objects-staged")
        with repo.transaction() as env:
            # the manifest as it is now: a pull or commit may have run during the ingest
            manifest = repo.read_manifest()
            visible = manifest.visible_contributions()
            for other_id, other_name in visible:
                if other_name == name and other_id != cid:
                    raise InputError(
                        f"name {name!r} is already used by contribution {other_id[:12]}; "
                        "remove it first or pass --name"
                    )
            if any(other_id == cid for other_id, _ in visible):
                gitops.stage_file(repo.root, MANIFEST_PATH, env=env)  # completes an earlier add
                return IngestResult(cid, name, n_tensors, total, new_bytes, new_objects, True)
            manifest = manifest.with_records([add_record(new_tag(), cid, name, message)])
            repo.write_manifest(manifest, env)
    return IngestResult(cid, name, n_tensors, total, new_bytes, new_objects)


def parse_extra_inputs(
    *, fisher: Path | None = None, gram: Path | None = None, extra: list[str] | None = None
) -> dict[str, Path]:
    """``--fisher``, ``--gram`` and ``--extra KIND=PATH`` as one kind -> path mapping."""
    found: dict[str, Path] = {}
    pairs = [("fisher", fisher), ("gram", gram)]
    pairs += [extras.parse_extra(text) for text in extra or []]
    for kind, path in pairs:
        if path is None:
            continue
        if kind in found:
            raise InputError(f"extra input {kind!r} is given twice")
        found[kind] = path
    return found


def check_fits(
    store: ObjectStore,
    manifest: Manifest,
    table: checks.TensorTable,
    kind: str,
    what: str,
    *,
    as_base: bool = False,
) -> None:
    """Refuse a model whose tensor names, dtypes or shapes differ from the base's (for a full
    model) or the visible contributions', or whose kind differs from theirs.  One reference
    is enough: the rest of the set was checked the same way when it was added."""
    base = manifest.base()
    refs = [(base, "the base")] if base and kind == "full" and not as_base else []
    refs += [(c, f"contribution {n!r} ({c[:12]})") for c, n in manifest.visible_contributions()]
    for ref, label in refs:
        try:
            desc = load_descriptor(store, ref)
        except CrdtError:
            continue  # a missing descriptor is verify's to report
        other_kind = desc.get("kind", "full")
        if ref != base and other_kind != kind:
            if as_base:
                continue
            raise InputError(
                f"{what} is a {kind} model but {label} is {other_kind}: merge like with like"
            )
        diffs = checks.table_differences(table, checks.tensor_table(desc), what, label)
        if diffs:
            raise InputError(f"{diffs[0]}: all contributions must match the base and each other")
        return


def find_contribution(manifest: Manifest, name_or_id: str) -> str:
    """The visible contribution named ``name_or_id``, or whose id starts with it (>= 8 hex)."""
    visible = manifest.visible_contributions()
    by_name = [cid for cid, name in visible if name == name_or_id]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        ids = ", ".join(c[:12] for c in by_name)
        raise InputError(f"{name_or_id!r} names several contributions ({ids}); pass an id")
    if len(name_or_id) >= 8:
        by_id = [cid for cid, _ in visible if cid.startswith(name_or_id)]
        if len(by_id) == 1:
            return by_id[0]
        if len(by_id) > 1:
            raise InputError(f"id prefix {name_or_id!r} is ambiguous")
    raise NotFoundError(f"no visible contribution named {name_or_id!r} (see 'git crdt list')")


def remove_contribution(repo: Repo, name_or_id: str) -> str:
    """Record a remove that observes every live add tag of the contribution."""
    repo.require_initialized()
    with repo.lock(), repo.transaction() as env:
        manifest = repo.read_manifest()
        try:
            cid = find_contribution(manifest, name_or_id)
        except NotFoundError:
            # An earlier remove may have been killed after writing the manifest and before
            # staging it: then the staged state still shows the contribution.  Complete it.
            staged = gitops.show_blob(repo.root, f":{MANIFEST_PATH}") or b""
            cid = find_contribution(Manifest.parse(staged, "staged manifest"), name_or_id)
            gitops.stage_file(repo.root, MANIFEST_PATH, env=env)
            return cid
        tags = [r.tag for r in manifest.visible_adds() if r.fields["id"] == cid]
        manifest = manifest.with_records([remove_record(new_tag(), tags)])
        repo.write_manifest(manifest, env)
    return cid


def set_register(repo: Repo, key: str, value: Any) -> None:
    """A last-writer-wins write: clock = 1 + the greatest clock this replica has seen."""
    repo.require_initialized()
    replica = repo.replica_id()
    with repo.lock(), repo.transaction() as env:
        manifest = repo.read_manifest()
        rec = set_record(key, value, manifest.max_clock() + 1, replica)
        repo.write_manifest(manifest.with_records([rec]), env)


def set_base(
    repo: Repo,
    path: Path,
    *,
    allow_pickle: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_start: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
) -> IngestResult:
    """Store the base model and point the ``base`` register at its descriptor."""
    repo.require_initialized()
    source = formats.discover(path, allow_pickle=allow_pickle)
    table = checks.scan_source(source, allow_nonfinite=allow_nonfinite)
    with repo.lock():
        store = ObjectStore(repo.root)
        check_fits(store, repo.read_manifest(), table, source.kind, "the base", as_base=True)
        cid, desc, total, new_bytes = _ingest(store, source, None, chunk_size, on_start, progress)
        with repo.transaction() as env:
            new_objects = store.flush(env)
    set_register(repo, "base", cid)
    n_tensors = len(json.loads(desc)["tensors"])
    return IngestResult(cid, default_name(path), n_tensors, total, new_bytes, new_objects)


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is read as JSON when it parses (numbers, booleans, lists, objects),
    else kept as a string."""
    if "=" not in text:
        raise InputError(f"--param {text!r} must be KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError(f"--param {text!r} has an empty key")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"--param {key} must be finite")
    return key, value
