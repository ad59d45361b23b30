"""Writing the replicated state: add and remove contributions, set registers.

Every writer takes the repository lock, writes and stages the objects first, and only then
writes the manifest (atomically) and stages it, so a crash never leaves a manifest that
references an object that was not written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .. import faults
from ..errors import (
    CrdtError,
    InputError,
    ManifestError,
    NotFoundError,
    StoreError,
    UsageError,
    did_you_mean,
)
from ..git import commands as gitops
from ..vocabulary import OUTPUT_DTYPE_ALIASES
from . import adapters, checks, descriptor, encoding, extras, formats
from .descriptor import BaseRef, Descriptor, Encoding, TensorEntry
from .manifest import MANIFEST_PATH, Manifest, add_record, check_name, remove_record
from .reader import read_descriptor
from .repo import Repo, new_tag
from .store import DEFAULT_CHUNK_SIZE, ObjectStore, split_chunks

Progress = Callable[[int], None]


@dataclass(frozen=True)
class IngestOptions:
    """How a model is read and stored, never what it is (no option changes its id):
    ``allow_pickle`` (read .bin/.pt/.pth/.ckpt), ``allow_nonfinite`` (accept NaN or Inf),
    ``include_code`` (keep a folder's program files), ``chunk_size`` (instead of the
    repository's ``chunk_size`` register), ``encoding`` (instead of this clone's
    ``crdt.encoding``, default raw)."""

    allow_pickle: bool = False
    allow_nonfinite: bool = False
    include_code: bool = False
    chunk_size: int | None = None
    encoding: str | None = None


@dataclass
class IngestResult:
    id: str
    name: str
    tensors: int
    bytes: int
    new_bytes: int
    new_objects: int
    already_present: bool = False
    skipped: list[str] = field(default_factory=list)  # files of the folder not kept, and why
    code: list[str] = field(default_factory=list)  # program code kept (--include-code)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DescriptorPlan:
    """A model read and hashed, nothing stored yet: its identity (``desc`` without storage
    fields, so ``descriptor.content_id(desc)`` is already its id) and what will be stored."""

    desc: dict[str, Any]
    tensors: list[formats.TensorData]
    extras: dict[str, list[formats.TensorData]]
    files: dict[str, bytes]

    @property
    def id(self) -> str:
        return descriptor.content_id(self.desc)

    def total_bytes(self) -> int:
        return sum(len(t.data) for t in self.tensors)


def content_hash(data: bytes | memoryview) -> str:
    """blake3 of a whole tensor's bytes: the identity of its content, whatever its chunking."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def _identity_entry(t: formats.TensorData) -> dict[str, Any]:
    return {
        "blake3": content_hash(t.data),
        "bytes": len(t.data),
        "dtype": t.dtype,
        "shape": t.shape,
    }


def plan_descriptor(
    source: formats.ModelSource,
    *,
    weight: float | None,
    extra_inputs: Mapping[str, Path] | None = None,
) -> DescriptorPlan:
    """Read ``source`` (and its extra inputs, kind -> safetensors file, checked against the
    model) and compute its format-2 identity: one blake3 pass over every tensor, no writes."""
    all_tensors = list(formats.iter_tensors(source))
    model = {t.name: list(t.shape) for t in all_tensors}
    extra_tables: dict[str, list[formats.TensorData]] = {
        kind: list(extras.load_extra(kind, path, model))
        for kind, path in sorted((extra_inputs or {}).items())
    }
    metadata: dict[str, str] = {}
    if not source.pickled:
        for f in source.files:
            metadata.update(formats.file_metadata(f))
    files = {name: path.read_bytes() for name, path in sorted(source.aux.items())}
    desc: dict[str, Any] = {
        "kind": source.kind,
        "tensors": {t.name: _identity_entry(t) for t in all_tensors},
        "files": {name: blake3.blake3(data).hexdigest() for name, data in files.items()},
        "metadata": metadata,
        # Always written: "no weight" and weight 1.0 are one contribution, not two.
        "weight": float(weight) if weight is not None else descriptor.DEFAULT_WEIGHT,
    }
    if extra_tables:  # absent when there are none
        desc["extras"] = {
            kind: {"tensors": {t.name: _identity_entry(t) for t in items}}
            for kind, items in extra_tables.items()
        }
    return DescriptorPlan(desc, all_tensors, extra_tables, files)


def store_descriptor(
    store: ObjectStore,
    plan: DescriptorPlan,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    encoding_name: str = encoding.RAW,
    base: Descriptor | None = None,
) -> tuple[str, bytes, int]:
    """Store every chunk, auxiliary file and the descriptor of ``plan``; return (descriptor
    address, descriptor bytes, bytes newly written).  Chunks already stored are not written
    again.  ``encoding_name`` (:mod:`.encoding`) says how chunks are encoded; the XOR encodings
    (``xor-planes-zstd``, ``xor-sparse-zstd``) take each tensor against ``base``'s tensor of
    the same name and size, and fall back to ``planes-zstd`` for a tensor without one (and for
    extra inputs)."""
    new = [0]

    def on_written(n: int, is_new: bool) -> None:
        if is_new:
            new[0] += n

    def on_chunk(n: int, is_new: bool) -> None:
        on_written(n, is_new)
        if progress is not None:
            progress(n)

    desc = json.loads(json.dumps(plan.desc))  # a deep copy; storage fields go in below
    desc["format"] = descriptor.FORMAT_V2
    desc["storage"] = {"chunk_size": chunk_size}
    tables = [(desc["tensors"], plan.tensors, encoding_name)]
    extra_encoding = encoding.RAW if encoding_name == encoding.RAW else encoding.PLANES
    tables += [
        (desc["extras"][kind]["tensors"], items, extra_encoding)
        for kind, items in plan.extras.items()
    ]
    # All chunks of all tensors go to the store at once, so hashing and writing run in
    # parallel across tensors, not only within one.
    spans: list[tuple[dict[str, Any], int, int]] = []
    chunks: list[memoryview] = []
    encoded: list[_EncodedTensor] = []
    origins: list[tuple[str, int] | None] = []
    holders: dict[Path, str | None] = {}  # lfs mode: model files already in LFS here
    for table, items, name in tables:
        for t in items:
            if name != encoding.RAW:
                ref = _xor_base(base, t) if name in encoding.XOR_ENCODINGS else None
                encoded.append(_EncodedTensor(table[t.name], t, ref, chunk_size, name))
                continue
            pieces = split_chunks(t.data, chunk_size)
            spans.append((table[t.name], len(chunks), len(chunks) + len(pieces)))
            chunks.extend(pieces)
            if t.file is not None and t.file not in holders:
                holders[t.file] = store.adopt_lfs_file(t.file)
            holder = holders.get(t.file) if t.file is not None else None
            origins += [
                (holder, t.offset + i * chunk_size) if holder else None for i in range(len(pieces))
            ]
    ids = store.put_chunks(chunks, on_chunk, origins)
    for entry, lo, hi in spans:
        entry["chunks"] = ids[lo:hi]
    _store_encoded(store, encoded, on_written, progress)
    for data in plan.files.values():
        store.put(data)
    data = descriptor.encode(desc)
    return store.put(data), data, new[0]


@dataclass
class _EncodedTensor:
    """A tensor to store encoded: its descriptor entry (filled in here), its bytes, the XOR
    base's entry if any, and its pieces."""

    entry: dict[str, Any]
    data: formats.TensorData
    base: TensorEntry | None
    chunk_size: int
    encoding_name: str  # the encoding asked for: an XOR one falls back to planes without a base

    @property
    def itemsize(self) -> int:
        return formats.DTYPE_SIZES[self.data.dtype]

    def pieces(self) -> list[tuple[int, int]]:
        return encoding.pieces(len(self.data.data), self.chunk_size, self.itemsize)


def _xor_base(base: Descriptor | None, t: formats.TensorData) -> TensorEntry | None:
    """The base tensor to XOR ``t`` against: the base's tensor of the same name, dtype and
    size, stored raw or as byte planes (None: there is none, and ``t`` is stored as planes)."""
    if base is None:
        return None
    other = base.tensors.get(t.name)
    if other is None or other.dtype != t.dtype or other.nbytes != len(t.data):
        return None
    if other.blake3 is None or (other.encoding is not None and other.encoding.base is not None):
        return None  # a format-1 base, or one stored XOR-encoded itself
    return other


def _store_encoded(
    store: ObjectStore,
    tensors: list[_EncodedTensor],
    on_written: Callable[[int, bool], None],
    progress: Progress | None,
) -> None:
    """Encode and store the pieces of ``tensors``, in parallel across pieces (zstd, numpy and
    the hashes release the GIL); fill in each entry's chunks and encoding.  ``on_written``
    gets each stored object's size, ``progress`` the tensor bytes it holds."""
    work = [(t, lo, hi) for t in tensors for lo, hi in t.pieces()]
    bases = encoding.XorBases(store)
    for t, lo, hi in work:
        if t.base is not None:
            bases.expect(t.base.chunks, t.base.encoding, lo, hi)

    def one(item: tuple[_EncodedTensor, int, int]) -> str:
        t, lo, hi = item
        base: dict[str, Any] = {}
        if t.base is not None:
            ref = t.base
            base = bases.piece(ref.chunks, ref.encoding, t.itemsize, lo, hi)
        sparse = t.encoding_name == encoding.SPARSE and t.base is not None
        frame = encoding.encode_piece(t.data.data[lo:hi], t.itemsize, **base, sparse=sparse)
        oid = store.put_chunks([memoryview(frame)], on_written)[0]
        if progress is not None:
            progress(hi - lo)
        return oid

    if len(work) > 1 and store.workers > 1:
        with ThreadPoolExecutor(store.workers) as pool:
            ids = list(pool.map(one, work))
    else:
        ids = [one(item) for item in work]
    pos = 0
    for t in tensors:
        spans = t.pieces()
        chunk_ids = ids[pos : pos + len(spans)]
        pos += len(spans)
        base_ref = None
        if t.base is not None:
            ref = t.base
            base_ref = BaseRef(ref.blake3 or "", ref.chunks, ref.encoding)
        name = encoding.PLANES if base_ref is None else t.encoding_name
        enc = Encoding(name, tuple(hi - lo for lo, hi in spans), base_ref)
        t.entry["chunks"] = chunk_ids
        t.entry["encoding"] = enc.to_json()


def fetch_set(store: ObjectStore, manifest: Manifest) -> int:
    """Fetch what resolving the visible set reads and this clone lacks: in a partial clone the
    descriptors in one batch, then every object they reference in one batch; then the LFS
    objects of the chunks kept in Git LFS, in one ``git lfs fetch``.  Returns the number of
    objects fetched (0, with no git process started, when nothing is absent)."""
    ids = [cid for cid, _ in manifest.visible_contributions()]
    base = manifest.base()
    if base is not None:
        ids.append(base)
    addresses = [manifest.descriptor_address(cid) for cid in ids]
    fetched = store.fetch_absent(addresses)
    refs: set[str] = set()
    for cid in ids:
        if store.has(manifest.descriptor_address(cid)):
            try:
                desc = read_descriptor(store, manifest, cid)
            except CrdtError:
                continue  # reading it again reports it
            refs |= {oid for oid, _ in checks.object_references(desc.raw)}
    fetched += store.fetch_absent(refs)
    # chunks kept in Git LFS: exactly this set's, in one 'git lfs fetch'
    return fetched + store.fetch_lfs(refs)


def _check_weight(weight: float | None) -> None:
    if weight is not None and not math.isfinite(weight):
        raise InputError(f"--weight must be a finite number, got {weight}")
    if weight is not None and not checks.MIN_WEIGHT <= weight <= checks.MAX_WEIGHT:
        lo, hi = checks.MIN_WEIGHT, checks.MAX_WEIGHT
        raise InputError(f"--weight must be within [{lo:g}, {hi:g}], got {weight:g}")


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
    options: IngestOptions = IngestOptions(),
    on_start: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    extra_inputs: Mapping[str, Path] | None = None,
) -> IngestResult:
    """Store the model at ``path`` and record it in the manifest (both staged).

    ``extra_inputs`` maps an extra-input kind (``extras.KINDS``) to a safetensors file stored
    with the model and referenced from its descriptor.  ``options`` say how the model is read
    and stored (:class:`IngestOptions`).  A model whose content is already a visible
    contribution is not stored again."""
    repo.require_initialized()
    _check_weight(weight)
    encoding_name = chosen_encoding(repo, options.encoding)
    source = formats.discover(
        path, allow_pickle=options.allow_pickle, include_code=options.include_code
    )
    name = name if name is not None else default_name(path)
    try:
        check_name(name, "contribution name")
    except ManifestError as exc:
        raise InputError(str(exc)) from None
    if message is not None and len(message) > 4096:
        raise InputError("--message is longer than 4096 characters")
    table = checks.scan_source(source, allow_nonfinite=options.allow_nonfinite)
    with repo.lock():
        manifest = repo.read_manifest()
        store = ObjectStore(repo.root)
        check_fits(store, manifest, source, table, f"model {name!r}")
        if on_start is not None:
            on_start(source.total_bytes())
        plan = plan_descriptor(source, weight=weight, extra_inputs=extra_inputs)
        cid, total, n_tensors = plan.id, plan.total_bytes(), len(plan.tensors)
        visible = manifest.visible_contributions()
        if any(other_id == cid for other_id, _ in visible):
            # The same content is already in the set (perhaps stored with another chunk
            # size): nothing to store.  Staging completes an interrupted earlier add, and its
            # objects get skip-worktree back if an interrupted writer left them without it.
            address = manifest.descriptor_address(cid)
            desc = read_descriptor(store, manifest, cid)
            store.touch([address, *(oid for oid, _ in checks.object_references(desc.raw))])
            with repo.transaction() as env:
                store.flush(env)
                gitops.stage_file(repo.root, MANIFEST_PATH, env=env)
            return IngestResult(
                cid, dict(visible)[cid], n_tensors, total, 0, 0, True, source.skipped, source.code
            )
        for other_id, other_name in visible:
            if other_name == name:  # nothing staged yet: refused before any index change
                raise InputError(
                    f"name {name!r} is already used by contribution {other_id[:12]}; remove it "
                    "first or pass --name"
                )
        size = repository_chunk_size(manifest, options.chunk_size)
        address, _, new_bytes = store_descriptor(
            store,
            plan,
            chunk_size=size,
            progress=progress,
            encoding_name=encoding_name,
            base=_xor_reference(store, manifest, encoding_name),
        )
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
                return IngestResult(
                    cid,
                    name,
                    n_tensors,
                    total,
                    new_bytes,
                    new_objects,
                    True,
                    source.skipped,
                    source.code,
                )
            manifest = manifest.with_records(
                [add_record(new_tag(), cid, name, message, desc=address)]
            )
            repo.write_manifest(manifest, env)
    return IngestResult(
        cid, name, n_tensors, total, new_bytes, new_objects, False, source.skipped, source.code
    )


def chosen_encoding(repo: Repo, name: str | None) -> str:
    """The encoding to store with: ``name``, else this clone's ``crdt.encoding``, else raw."""
    if name is None:
        name = gitops.config_get(repo.root, "crdt.encoding") or encoding.RAW
    return encoding.check_name(name)


def _xor_reference(store: ObjectStore, manifest: Manifest, name: str) -> Descriptor | None:
    """The base an XOR encoding is taken against (None: not XOR, or no base is set)."""
    base = manifest.base()
    if name not in encoding.XOR_ENCODINGS or base is None:
        return None
    return read_descriptor(store, manifest, base)


def repository_chunk_size(manifest: Manifest, override: int | None = None) -> int:
    """The chunk size to store with: ``override``, else the ``chunk_size`` register, else
    the default (64 MiB)."""
    if override is not None:
        split_chunks(memoryview(b""), override)  # the same bounds check as splitting
        return override
    return manifest.chunk_size() or DEFAULT_CHUNK_SIZE


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
    source: formats.ModelSource,
    table: checks.TensorTable,
    what: str,
    *,
    as_base: bool = False,
) -> None:
    """Refuse a model that cannot join the set: the rule of ``adapters.set_problems`` (which
    resolve and verify apply) for the set with this model in it.  Full models match the base's
    tensor table (or a visible full model's); a LoRA adapter reads its ``adapter_config.json``
    (DoRA: a magnitude vector per module; unmergeable forms refused), fits the base's
    tensors and targets the same modules as the visible adapters.  One reference of each kind
    is enough: the rest of the set was checked the same way when it was added."""
    kind = source.kind
    if kind == adapters.KIND_LORA and as_base:
        raise InputError(f"{what} is a LoRA adapter: a base must be full weights")
    new = Descriptor.from_json(
        {
            "format": descriptor.FORMAT_V2,
            "kind": kind,
            "tensors": {
                n: {"bytes": 0, "chunks": [], "dtype": d, "shape": list(sh)}
                for n, (d, sh) in table.items()
            },
        }
    )
    base_id = manifest.base()
    base = None if as_base else _read_or_none(store, manifest, base_id)
    if as_base:
        base = new
    names = None if base is None else set(base.tensors)
    labelled: list[tuple[str, Descriptor]] = []
    seen: set[str] = set()
    for cid, name in manifest.visible_contributions():
        desc = _read_or_none(store, manifest, cid)
        if desc is None or desc.kind in seen:
            continue  # a missing descriptor is verify's to report
        seen.add(desc.kind)
        labelled.append((f"contribution {name!r} ({cid[:12]})", desc))
    members, problems = adapters.members(store, base, labelled)
    if not as_base:
        adapter = None
        if kind == adapters.KIND_LORA:
            data = source.aux[adapters.ADAPTER_CONFIG].read_bytes()
            config = adapters.parse_config(data, what)
            adapter = (config, adapters.modules(config, table, what, names))
        members.append(adapters.Member(what, new, adapter))  # compared with the set
    # No base yet: adapters are checked against it when it is set (and resolve needs one).
    problems += adapters.set_problems(base, members, base_used=base is not None, require_base=False)
    if problems:
        raise InputError(problems[0])


def _read_or_none(store: ObjectStore, manifest: Manifest, cid: str | None) -> Descriptor | None:
    if cid is None:
        return None
    try:
        return read_descriptor(store, manifest, cid)
    except CrdtError:
        return None


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
    close = did_you_mean(name_or_id, [name for _, name in visible])
    raise NotFoundError(
        f"no visible contribution named {name_or_id!r}{close} (see 'git crdt list')"
    )


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
        manifest = manifest.write_register(key, value, replica)
        repo.write_manifest(manifest, env)


def set_config_from(repo: Repo, name_or_id: str) -> str | None:
    """Point the ``config_from`` register at a visible contribution ('' clears it); returns
    its id."""
    cid = None
    if name_or_id:
        cid = find_contribution(repo.read_manifest(), name_or_id)
    set_register(repo, "config_from", cid)
    return cid


def set_base(
    repo: Repo,
    path: Path,
    *,
    options: IngestOptions = IngestOptions(),
    on_start: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> IngestResult:
    """Store the base model and point the ``base`` register at its id and descriptor.  An
    XOR encoding stores the base as byte planes (a base has no base)."""
    repo.require_initialized()
    encoding_name = chosen_encoding(repo, options.encoding)
    if encoding_name in encoding.XOR_ENCODINGS:
        encoding_name = encoding.PLANES
    source = formats.discover(
        path, allow_pickle=options.allow_pickle, include_code=options.include_code
    )
    table = checks.scan_source(source, allow_nonfinite=options.allow_nonfinite)
    with repo.lock():
        store = ObjectStore(repo.root)
        manifest = repo.read_manifest()
        check_fits(store, manifest, source, table, "the base", as_base=True)
        if on_start is not None:
            on_start(source.total_bytes())
        plan = plan_descriptor(source, weight=None)
        cid, total, n_tensors = plan.id, plan.total_bytes(), len(plan.tensors)
        if manifest.base() == cid:
            return IngestResult(
                cid, default_name(path), n_tensors, total, 0, 0, True, source.skipped, source.code
            )
        size = repository_chunk_size(manifest, options.chunk_size)
        address, _, new_bytes = store_descriptor(
            store, plan, chunk_size=size, progress=progress, encoding_name=encoding_name
        )
        with repo.transaction() as env:
            new_objects = store.flush(env)
    set_register(repo, "base", {"desc": address, "id": cid})
    return IngestResult(
        cid,
        default_name(path),
        n_tensors,
        total,
        new_bytes,
        new_objects,
        False,
        source.skipped,
        source.code,
    )


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


def upgrade_v1(store: ObjectStore, desc: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 descriptor as format 2: the same chunks, plus each tensor's whole-content
    blake3 (read back from the store, nothing written).  Its id changes to the content id."""
    new = json.loads(json.dumps(dict(desc)))
    new["format"] = descriptor.FORMAT_V2
    new.setdefault("weight", descriptor.DEFAULT_WEIGHT)
    for name, entry in descriptor.raw_entries(new):
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        size = 0
        for chunk in entry["chunks"]:
            data = store.get(chunk, verify=True)
            hasher.update(data)
            size += len(data)
        if size != entry["bytes"]:
            raise StoreError(f"tensor {name!r}: chunks hold {size} bytes, not {entry['bytes']}")
        entry["blake3"] = hasher.hexdigest()
    return new


def set_weight(repo: Repo, name_or_id: str, weight: float) -> tuple[str, str]:
    """Give a visible contribution a new weight without storing its tensors again.

    The weight is part of a contribution's content, so this records an observed remove of
    the old contribution and an add of a new descriptor that reuses every chunk (a format-1
    contribution becomes format 2).  Returns (old id, new id)."""
    repo.require_initialized()
    _check_weight(weight)
    with repo.lock():
        manifest = repo.read_manifest()
        cid = find_contribution(manifest, name_or_id)
        visible = manifest.visible_contributions()
        name = dict(visible)[cid]
        store = ObjectStore(repo.root)
        desc = read_descriptor(store, manifest, cid)
        raw = desc.raw
        if desc.format == descriptor.FORMAT_V1:
            raw = upgrade_v1(store, raw)
        new = dict(raw, weight=float(weight))
        new_id = descriptor.content_id(new)
        if new_id == cid:
            return cid, cid
        for other_id, other_name in visible:
            if other_id == new_id:
                raise InputError(
                    f"contribution {other_name!r} ({other_id[:12]}) already has these tensors "
                    f"and weight {weight:g}; remove {name!r} instead"
                )
        address = store.put(descriptor.encode(new))
        store.flush()
        adds = [r for r in manifest.visible_adds() if r.fields["id"] == cid]
        message = adds[0].fields.get("message")
        records = [
            remove_record(new_tag(), [r.tag for r in adds]),
            add_record(new_tag(), new_id, name, message, desc=address),
        ]
        repo.write_manifest(manifest.with_records(records))
    return cid, new_id


def set_chunk_size(repo: Repo, size: int) -> None:
    """Set the repository's chunk size (a replicated register every clone agrees on)."""
    repository_chunk_size(Manifest(), size)
    set_register(repo, "chunk_size", size)


def set_output_dtype(repo: Repo, name: str) -> str | None:
    """Declare the merged model's float dtype (``bf16``, ``fp16``, ``fp32``, ``fp64``, their
    torch names, or ``keep``: each tensor keeps its source's dtype), a replicated register in
    the Merkle root.  Returns the register value written (None for keep)."""
    key = name.strip().lower()
    if key not in OUTPUT_DTYPE_ALIASES:
        raise UsageError(
            f"unknown output dtype {name!r}{did_you_mean(key, OUTPUT_DTYPE_ALIASES)}; "
            "choose one of bf16, fp16, fp32, fp64, keep"
        )
    value = OUTPUT_DTYPE_ALIASES[key]
    set_register(repo, "output_dtype", value)
    return value
