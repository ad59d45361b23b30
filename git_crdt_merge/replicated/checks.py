"""Validation shared by ingest and ``verify`` (no torch): descriptors, tensor tables, finiteness.

Layer 1 only: a descriptor is checked as data (fields, dtypes, shapes, byte counts, object ids),
and two tensor tables are compared by name, dtype and shape.  Object references are found by
walking the whole descriptor (except ``metadata``, which holds free-form strings), so extra
inputs added by later format additions (nested tensor tables, object ids) are checked too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import InputError
from . import alignment
from .descriptor import DEFAULT_KIND, DEFAULT_WEIGHT
from .extras import KINDS as EXTRA_KINDS
from .formats import DTYPE_SIZES, ModelSource, check_tensor_name, iter_tensors
from .manifest import ID_RE
from .store import MAX_OBJECT_BYTES

# A descriptor is read into memory whole: a sane limit (objects in general: store.py).
MAX_DESCRIPTOR_BYTES = 64 * 1024**2
DESCRIPTOR_KINDS = ("full", "lora")
TENSOR_KEYS = {"bytes", "chunks", "dtype", "shape"}  # format 1
TENSOR_KEYS_V2 = TENSOR_KEYS | {"blake3"}  # plus the blake3 of the tensor's whole content
OPTIONAL_TENSOR_KEYS_V2 = {"encoding"}  # absent: raw chunks
# The stored encodings (replicated/encoding.py, which imports zstandard: spelled here too so
# that validation stays light; tests/replicated/test_encoding.py checks they agree).
STORED_ENCODINGS = ("planes-zstd", "xor-planes-zstd", "xor-sparse-zstd")
ENCODING_KEYS = {
    "planes-zstd": {"name", "sizes"},
    "xor-planes-zstd": {"base", "name", "sizes"},
    "xor-sparse-zstd": {"base", "name", "sizes"},
}
BASE_REF_KEYS = {"blake3", "chunks"}  # plus an optional non-XOR "encoding"
DESCRIPTOR_FORMATS = (1, 2)
MAX_FILE_NAME_BYTES = 255
# The declared range of a contribution's weight: wide enough for any real use, small enough
# that weight x value stays finite in float32 for weights of real models (|value| < 1e30);
# resolution also refuses any non-finite result (engine.py).
MIN_WEIGHT, MAX_WEIGHT = -1e6, 1e6

# Non-finite test on the bit pattern: (bits & mask) == mask means exponent all ones
# (NaN or Inf); F8_E4M3 (the "fn" variant) has no Inf and NaN is S.1111.111.
_NONFINITE_MASKS: dict[str, tuple[Any, int, int]] = {
    "F64": (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000, 0x7F800000),
    "F16": (np.uint16, 0x7C00, 0x7C00),
    "BF16": (np.uint16, 0x7F80, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7C, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F, 0x7F),
}
_BLOCK = 1 << 22  # elements per pass: bounded temporaries, cache friendly
_SCAN_WORKERS = min(8, os.cpu_count() or 1)


def count_nonfinite(dtype: str, data: memoryview) -> int:
    """The number of NaN or infinite elements in raw little-endian tensor bytes (blocks of a
    large tensor counted in parallel: numpy releases the GIL).

    A block is first tested with two maxima, which write nothing: the exponent field comes
    right after the sign, so a non-finite element is a signed integer at least ``want`` (sign
    clear) or an unsigned one at least ``sign | want`` (sign set).  Only a block that holds one
    is counted element by element."""
    if dtype not in _NONFINITE_MASKS or len(data) == 0:
        return 0
    utype, mask, want = _NONFINITE_MASKS[dtype]
    udt = np.dtype(utype).newbyteorder("<")
    sdt = np.dtype(udt.str.replace("u", "i"))
    arr = np.frombuffer(data, dtype=udt)
    sign = 1 << (8 * udt.itemsize - 1)
    pos_min, neg_min = int(want), int(sign | want)

    def count(block: np.ndarray) -> int:
        if int(block.view(sdt).max()) < pos_min and int(block.max()) < neg_min:
            return 0
        return int(np.count_nonzero((block & utype(mask)) == utype(want)))

    blocks = [arr[i : i + _BLOCK] for i in range(0, arr.size, _BLOCK)]
    workers = min(_SCAN_WORKERS, len(blocks))
    if workers <= 1:
        return sum(map(count, blocks))
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(count, blocks))


TensorTable = Mapping[str, tuple[str, tuple[int, ...]]]


def tensor_table(desc: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a (validated) descriptor."""
    return {n: (t["dtype"], tuple(t["shape"])) for n, t in desc["tensors"].items()}


def table_differences(a: TensorTable, b: TensorTable, what_a: str, what_b: str) -> list[str]:
    """Every way tables ``a`` and ``b`` disagree (names, dtypes, shapes) that a merge does not
    absorb, one line each.  Absorbed (:mod:`.alignment`): float dtypes, resized vocabularies
    and a tied head."""
    out = []
    for name in [n for n in sorted(set(a) - set(b)) if not alignment.missing_is_allowed(n)][:5]:
        out.append(f"{what_a} has tensor {name!r} that {what_b} lacks")
    for name in [n for n in sorted(set(b) - set(a)) if not alignment.missing_is_allowed(n)][:5]:
        out.append(f"{what_a} lacks tensor {name!r} that {what_b} has")
    for name in sorted(set(a) & set(b)):
        why = alignment.difference(name, a[name], b[name], what_a, what_b)
        if why is not None:
            out.append(why)
        if len(out) >= 10:
            break
    return out


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file of the merged model (None: it can).

    The output folder has a fixed namespace: the model's safetensors files and index,
    ``resolution.json`` and a strategy's side file are ours, so a contribution's files (config,
    tokenizer) can never replace them; and a name must be a plain file name a file system
    accepts (no separator, NUL or control character, at most 255 bytes, not hidden)."""
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES:
        return f"must be 1 to {MAX_FILE_NAME_BYTES} bytes"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        return "is not a plain file name"
    low = name.casefold()
    if low.endswith((".safetensors", ".safetensors.index.json")) or low == "resolution.json":
        return "is reserved for the merged model's own files"
    return None


def _is_size(v: Any, limit: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit


def _encoding_problem(
    enc: Any, chunks: list[Any], nbytes: int, itemsize: int, nested: bool
) -> str | None:
    """Why ``enc`` is not a valid encoding of ``chunks`` holding ``nbytes`` bytes (None: it
    is): a known name, exactly its keys, one decoded size per chunk, each whole elements and
    at most the object limit, adding up to the tensor; an XOR base reference names a content
    hash and chunks, with a non-XOR encoding of its own."""
    if not isinstance(enc, dict) or enc.get("name") not in STORED_ENCODINGS:
        return f"unknown encoding (encodings: {', '.join(STORED_ENCODINGS)}; raw has none)"
    name = enc["name"]
    if set(enc) != ENCODING_KEYS[name]:
        return f"encoding {name} must have exactly {sorted(ENCODING_KEYS[name])}"
    if nested and name != "planes-zstd":
        return "an XOR base must not itself be XOR-encoded"
    sizes = enc["sizes"]
    if not isinstance(sizes, list) or len(sizes) != len(chunks):
        return f"encoding {name} must list one decoded size per chunk"
    if not all(_is_size(v, MAX_OBJECT_BYTES) and v % itemsize == 0 for v in sizes):
        return f"encoding {name} has a decoded size that is not whole elements up to the limit"
    if sum(sizes) != nbytes:
        return f"encoding {name} decodes to {sum(sizes)} bytes, the tensor has {nbytes}"
    if "base" in ENCODING_KEYS[name]:
        ref = enc["base"]
        if not isinstance(ref, dict) or not BASE_REF_KEYS <= set(ref) <= BASE_REF_KEYS | {
            "encoding"
        }:
            keys = sorted(BASE_REF_KEYS)
            return f"encoding {name}: 'base' must have {keys} and an optional encoding"
        if not (isinstance(ref["blake3"], str) and ID_RE.match(ref["blake3"])):
            return f"encoding {name}: 'base' has a malformed content hash"
        ref_chunks = ref["chunks"]
        if not isinstance(ref_chunks, list) or not ref_chunks:
            return f"encoding {name}: 'base' has no chunk list"
        if not all(isinstance(c, str) and ID_RE.match(c) for c in ref_chunks):
            return f"encoding {name}: 'base' has a malformed chunk id"
        if "encoding" in ref:
            return _encoding_problem(ref["encoding"], ref_chunks, nbytes, itemsize, True)
    return None


def _tensor_entry_problems(name: str, info: Any, where: str, keys: set[str]) -> list[str]:
    try:
        check_tensor_name(name)
    except InputError as exc:
        return [f"{where}: {exc}"]
    optional = OPTIONAL_TENSOR_KEYS_V2 if "blake3" in keys else set()
    if not isinstance(info, dict) or not keys <= set(info) <= keys | optional:
        extra = f" (optional: {sorted(optional)})" if optional else ""
        return [f"{where}: tensor {name!r} must have exactly {sorted(keys)}{extra}"]
    if "blake3" in keys and not (isinstance(info["blake3"], str) and ID_RE.match(info["blake3"])):
        return [f"{where}: tensor {name!r} has a malformed content hash"]
    dtype, shape, chunks, nbytes = info["dtype"], info["shape"], info["chunks"], info["bytes"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        return [f"{where}: tensor {name!r} has unknown dtype {dtype!r}"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**53 for d in shape
    ):
        return [f"{where}: tensor {name!r} has an invalid shape {shape!r}"]
    if not isinstance(chunks, list) or not chunks:
        return [f"{where}: tensor {name!r} has no chunk list"]
    if not all(isinstance(c, str) and ID_RE.match(c) for c in chunks):
        return [f"{where}: tensor {name!r} has a malformed chunk id"]
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes != expected:
        return [f"{where}: tensor {name!r} says {nbytes!r} bytes, dtype and shape give {expected}"]
    if "encoding" in info:
        why = _encoding_problem(info["encoding"], chunks, nbytes, DTYPE_SIZES[dtype], False)
        if why:
            return [f"{where}: tensor {name!r}: {why}"]
    return []


def _extras_problems(extras: Any, tensors: dict[str, Any], where: str, keys: set[str]) -> list[str]:
    """The extra inputs: ``{kind: {"tensors": {name: entry}}}`` with known kinds, entries as
    strict as the main table's, and every name one of the model's tensors."""
    if not isinstance(extras, dict):
        return [f"{where}: 'extras' must map extra-input kinds to tensor tables"]
    for kind, node in extras.items():
        if kind not in EXTRA_KINDS:
            return [f"{where}: unknown extra-input kind {kind!r} (kinds: {', '.join(EXTRA_KINDS)})"]
        if (
            not isinstance(node, dict)
            or set(node) != {"tensors"}
            or not isinstance(node["tensors"], dict)
        ):
            return [f"{where}: extra input {kind!r} must be {{'tensors': {{name: entry}}}}"]
        for name, info in node["tensors"].items():
            if name not in tensors:
                return [f"{where}: extra input {kind!r} names tensor {name!r}, not in the model"]
            found = _tensor_entry_problems(name, info, f"{where} ({kind})", keys)
            if found:
                return found
    return []


def descriptor_problems(desc: Any, where: str) -> list[str]:
    """Everything structurally wrong with a decoded descriptor (empty list: valid)."""
    if not isinstance(desc, dict):
        return [f"{where}: descriptor is not a JSON object"]
    out = []
    fmt = desc.get("format")
    if fmt not in DESCRIPTOR_FORMATS or isinstance(fmt, bool):
        out.append(f"{where}: descriptor format {fmt!r} is not 1 or 2 (a newer git-crdt?)")
        return out
    keys = TENSOR_KEYS if fmt == 1 else TENSOR_KEYS_V2
    if desc.get("kind", DEFAULT_KIND) not in DESCRIPTOR_KINDS:
        out.append(f"{where}: unknown descriptor kind {desc.get('kind')!r}")
    tensors = desc.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        return out + [f"{where}: descriptor has no tensor table (an empty model?)"]
    for name, info in tensors.items():
        out += _tensor_entry_problems(name, info, where, keys)
    out += _extras_problems(desc.get("extras", {}), tensors, where, keys)
    storage = desc.get("storage", {})
    if fmt == 1 and "storage" in desc:
        out.append(f"{where}: a format-1 descriptor has no 'storage'")
    elif not isinstance(storage, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in storage.values()
    ):
        out.append(f"{where}: 'storage' must map names to positive integers")
    files = desc.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and ID_RE.match(v) for k, v in files.items()
    ):
        out.append(f"{where}: 'files' must map plain file names to object ids")
    else:
        for fname in sorted(files):
            why = file_name_problem(fname)
            if why:
                out.append(f"{where}: file name {fname!r} {why}")
                break
    weight = desc.get("weight", DEFAULT_WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        out.append(f"{where}: weight {weight!r} is not a finite number")
    elif not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        out.append(f"{where}: weight {weight!r} is outside [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]")
    meta = desc.get("metadata", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        out.append(f"{where}: 'metadata' must map strings to strings")
    return out


def object_references(desc: Any) -> Iterator[tuple[str, str]]:
    """(object id, JSON path) of every object the descriptor references, nested ones included.

    Every string that is a 64-hex blake3 id is a reference, wherever it sits, except under
    ``metadata`` (free-form strings copied from the source files) and a tensor entry's or an
    XOR base reference's ``blake3`` (the hash of a whole content, not stored as one object).
    So the chunks of an XOR base are references of every contribution encoded against it."""

    def walk(node: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, str):
            if ID_RE.match(node):
                yield node, path
        elif isinstance(node, dict):
            for key in sorted(node):
                if path == "" and key == "metadata":
                    continue
                if key == "blake3" and (TENSOR_KEYS <= set(node) or path.endswith("/base")):
                    continue  # a content hash (of a tensor, or of an XOR base), not an object
                yield from walk(node[key], f"{path}/{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{path}/{i}")

    yield from walk(desc, "")


def scan_source(
    source: ModelSource, *, allow_nonfinite: bool
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensor table of a model to ingest; refuses NaN or Inf unless ``allow_nonfinite``.

    Runs before anything is written, so a refused model leaves no trace in the store."""
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for t in iter_tensors(source):
        if not allow_nonfinite:
            bad = count_nonfinite(t.dtype, t.data)
            if bad:
                raise InputError(
                    f"{source.path}: tensor {t.name!r} holds {bad} NaN or infinite values; "
                    "fix the model or pass --allow-nonfinite"
                )
        table[t.name] = (t.dtype, tuple(t.shape))
    return table
