"""Layer 1: a contribution's identity, computed from its content (no torch, no git).

A descriptor (docs/format.md) holds two kinds of fields:

- **identity fields**: what the contribution *is*: kind, weight, metadata, auxiliary files
  (named by the blake3 of their bytes), and for every tensor (main table and extra inputs) its
  dtype, shape, byte count and the blake3 of its whole content;
- **storage fields**: how its bytes happen to be kept: the chunk list of each tensor
  (``chunks``), how those chunks are encoded (``encoding``: absent for raw bytes, else a
  lossless encoding, :mod:`.encoding`), and the top-level ``format`` and ``storage`` objects.

Descriptor format 2 names a contribution by its identity fields only::

    id = blake3(b"git-crdt-merge contribution v2\\n" + canonical_json(identity_view(desc)))

so the same tensors, weight and metadata give the same id whatever the chunk size or encoding.
The descriptor object itself is stored, like any object, under the blake3 of its bytes (its
*address*); the manifest's add record carries both (``id`` and ``desc``).

Format 1 descriptors (written before 2026-12-03) keep their ids: there the id *is* the address,
the blake3 of the descriptor bytes, chunk list included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from .manifest import canonical_json

FORMAT_V1 = 1
FORMAT_V2 = 2
ID_DOMAIN_V2 = b"git-crdt-merge contribution v2\n"
# Fields of a tensor entry that say how its bytes are stored, not what they are.
STORAGE_TENSOR_FIELDS = frozenset({"chunks", "encoding"})
# Top-level fields outside the identity: the layout version and repository storage choices.
STORAGE_TOP_FIELDS = frozenset({"format", "storage"})
TENSOR_ENTRY_FIELDS = frozenset({"bytes", "dtype", "shape"})

# The defaults of the optional fields, spelled here only (docs/format.md).
DEFAULT_KIND = "full"
DEFAULT_WEIGHT = 1.0


def raw_entries(desc: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(tensor name, entry as JSON) of every tensor entry of a validated descriptor's JSON,
    for writers that rebuild it: the main table, then each extra input."""
    yield from desc["tensors"].items()
    for _, node in sorted(desc.get("extras", {}).items()):
        yield from node["tensors"].items()


def _strip(node: Any) -> Any:
    """``node`` with the storage fields of every tensor entry in it removed."""
    if isinstance(node, dict):
        if TENSOR_ENTRY_FIELDS <= node.keys():
            return {k: v for k, v in node.items() if k not in STORAGE_TENSOR_FIELDS}
        return {k: _strip(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def identity_view(desc: Mapping[str, Any]) -> dict[str, Any]:
    """The descriptor without its storage fields: what the id of a format-2 descriptor hashes.

    A tensor entry is any object with ``bytes``, ``dtype`` and ``shape`` outside ``metadata``
    (the main table and extra inputs alike)."""
    view = {k: _strip(v) for k, v in desc.items() if k not in STORAGE_TOP_FIELDS}
    if "metadata" in desc:
        view["metadata"] = desc["metadata"]  # free-form strings, kept verbatim
    return view


def content_id(desc: Mapping[str, Any]) -> str:
    """The format-2 contribution id of a (validated) descriptor."""
    data = ID_DOMAIN_V2 + canonical_json(identity_view(desc)).encode()
    return blake3.blake3(data).hexdigest()


def address(data: bytes) -> str:
    """Where descriptor bytes are stored: the blake3 of the bytes, like every object."""
    return blake3.blake3(data).hexdigest()


def contribution_id(desc: Mapping[str, Any], data: bytes) -> str:
    """The id of the descriptor ``desc`` parsed from ``data``: its address for format 1, its
    content id for format 2."""
    if desc.get("format") == FORMAT_V1:
        return address(data)
    return content_id(desc)


def encode(desc: Mapping[str, Any]) -> bytes:
    """The one serialisation of a descriptor (canonical JSON, UTF-8)."""
    return canonical_json(dict(desc)).encode()


@dataclass(frozen=True)
class BaseRef:
    """The bytes an XOR encoding is taken against: a stored tensor (the base's, when the
    contribution was added) named by the blake3 of its content, with its own chunks and their
    encoding (None: raw; never XOR itself).  Its byte count is the entry's."""

    blake3: str
    chunks: tuple[str, ...]
    encoding: Encoding | None = None

    @classmethod
    def from_json(cls, node: Mapping[str, Any]) -> BaseRef:
        enc = node.get("encoding")
        return cls(
            node["blake3"], tuple(node["chunks"]), None if enc is None else Encoding.from_json(enc)
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"blake3": self.blake3, "chunks": list(self.chunks)}
        if self.encoding is not None:
            out["encoding"] = self.encoding.to_json()
        return out


@dataclass(frozen=True)
class Encoding:
    """A tensor entry's storage encoding (docs/format.md): ``name``, the decoded byte count of
    each chunk (``sizes``, one per chunk) and, for XOR, the bytes it is taken against."""

    name: str
    sizes: tuple[int, ...]
    base: BaseRef | None = None

    @classmethod
    def from_json(cls, node: Mapping[str, Any]) -> Encoding:
        base = node.get("base")
        return cls(
            node["name"],
            tuple(int(s) for s in node["sizes"]),
            None if base is None else BaseRef.from_json(base),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sizes": list(self.sizes)}
        if self.base is not None:
            out["base"] = self.base.to_json()
        return out


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a descriptor (main table or extra input): what it is and where its bytes
    are.  ``encoding`` is the entry's storage encoding as recorded (None: raw)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[str, ...]
    blake3: str | None = None
    encoding: Encoding | None = None

    @classmethod
    def from_json(cls, name: str, entry: Mapping[str, Any]) -> TensorEntry:
        return cls(
            name,
            entry["dtype"],
            tuple(int(d) for d in entry["shape"]),
            int(entry["bytes"]),
            tuple(entry["chunks"]),
            entry.get("blake3"),
            None if entry.get("encoding") is None else Encoding.from_json(entry["encoding"]),
        )


def _table(node: Mapping[str, Any]) -> dict[str, TensorEntry]:
    return {name: TensorEntry.from_json(name, e) for name, e in node.items()}


@dataclass(frozen=True)
class Descriptor:
    """A validated descriptor, typed: every optional field resolved to its default here.

    Build it with :meth:`from_json` from a descriptor that ``checks.descriptor_problems``
    accepted (``replicated.repo`` reads them so); ``raw`` keeps the JSON object itself for what
    hashes or re-writes it."""

    raw: Mapping[str, Any] = field(repr=False)
    format: int
    kind: str
    weight: float
    tensors: dict[str, TensorEntry]
    extras: dict[str, dict[str, TensorEntry]]
    files: dict[str, str]
    metadata: dict[str, str]
    chunk_size: int | None

    @classmethod
    def from_json(cls, desc: Mapping[str, Any]) -> Descriptor:
        extras = desc.get("extras", {})
        return cls(
            desc,
            int(desc["format"]),
            desc.get("kind", DEFAULT_KIND),
            float(desc.get("weight", DEFAULT_WEIGHT)),
            _table(desc["tensors"]),
            {kind: _table(e.get("tensors", {})) for kind, e in extras.items()},
            dict(desc.get("files", {})),
            dict(desc.get("metadata", {})),
            desc.get("storage", {}).get("chunk_size"),
        )

    def extra(self, kind: str, name: str) -> TensorEntry | None:
        """The extra input ``kind`` of tensor ``name`` (None: this contribution has none)."""
        return self.extras.get(kind, {}).get(name)

    def entries(self) -> Iterator[tuple[str, TensorEntry]]:
        """(JSON path, entry) of every tensor entry: the main table, then each extra input."""
        for name, entry in self.tensors.items():
            yield f"/tensors/{name}", entry
        for kind, table in sorted(self.extras.items()):
            for name, entry in table.items():
                yield f"/extras/{kind}/tensors/{name}", entry

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
