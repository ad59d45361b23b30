"""Layer 1: lossless encodings of tensor chunks, and reading an entry's bytes back (no torch).

Three encodings (docs/format.md, "Chunk encodings"), chosen at add time and recorded in each
tensor entry, outside the content identity:

- ``raw``: the chunks are the tensor's bytes (the entry has no ``encoding`` field);
- ``planes-zstd``: each chunk of whole elements is split into byte planes (byte ``k`` of every
  element, ``k = 0 .. itemsize-1``, little-endian) and the planes, concatenated, are one zstd
  frame (level 1) with its content size;
- ``xor-planes-zstd``: as ``planes-zstd``, over the tensor's bytes XOR the bytes of a stored
  tensor of the same size (the base's tensor of the same name when it was added), which the
  entry names by content hash, chunks and encoding, so a later change of base never breaks it.

Decoding is exact, and bounded for hostile content: a frame must declare the decoded size the
entry records (checked before zstd allocates), hold no other frame or trailing bytes and use no
dictionary; and the decoded tensor must give the blake3 of its content recorded in the entry.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np
import zstandard

from ..errors import InputError, StoreError
from .descriptor import BaseRef, Encoding, TensorEntry
from .formats import DTYPE_SIZES
from .store import MAX_OBJECT_BYTES, ObjectStore

RAW = "raw"
PLANES = "planes-zstd"
XOR = "xor-planes-zstd"
ENCODINGS = (RAW, PLANES, XOR)
STORED_ENCODINGS = (PLANES, XOR)  # the names a descriptor's ``encoding`` may carry
ZSTD_LEVEL = 1
# An encoded chunk holds whole elements, at most the chunk size and at most PIECE_BYTES of the
# tensor: a tensor's chunks are then encoded and decoded in parallel (one zstd frame decodes
# on one core, ~1 GB/s here), at a cost of under 0.1% in size against 64 MiB frames.
PIECE_BYTES = 8 * 1024 * 1024
MAX_PIECE_BYTES = MAX_OBJECT_BYTES - (MAX_OBJECT_BYTES >> 7)  # room for zstd's growth
WORKERS = min(8, os.cpu_count() or 1)
_PARALLEL_HASH_BYTES = 1 << 20

_local = threading.local()


def check_name(name: str) -> str:
    """``name`` if it is a known encoding, else a one-line usage error."""
    if name not in ENCODINGS:
        raise InputError(f"unknown encoding {name!r} (encodings: {', '.join(ENCODINGS)})")
    return name


def compress_bound(size: int) -> int:
    """The largest zstd frame of ``size`` input bytes (``ZSTD_COMPRESSBOUND``, plus the frame
    header): a stored chunk larger than this for its declared size is refused unread."""
    margin = ((128 * 1024 - size) >> 11) if size < 128 * 1024 else 0
    return size + (size >> 8) + margin + 32


def piece_size(chunk_size: int, itemsize: int) -> int:
    """Decoded bytes per encoded chunk: the chunk size, at most :data:`PIECE_BYTES`, rounded
    down to whole elements (at least one)."""
    size = min(chunk_size, PIECE_BYTES, MAX_PIECE_BYTES)
    return max(itemsize, size - size % itemsize)


def pieces(nbytes: int, chunk_size: int, itemsize: int) -> list[tuple[int, int]]:
    """(start, end) of each encoded chunk of a tensor of ``nbytes`` bytes (one empty piece
    for an empty tensor)."""
    step = piece_size(chunk_size, itemsize)
    if nbytes == 0:
        return [(0, 0)]
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


# -- the codec ---------------------------------------------------------------------------------
def _bytes(data: bytes | bytearray | memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def split_planes(data: bytes | bytearray | memoryview, itemsize: int) -> np.ndarray:
    """The byte planes of little-endian elements, concatenated (plane ``k`` holds byte ``k``
    of every element): contiguous uint8 of the same length.  One strided read per plane
    (measured 3.5 GB/s for 2- and 4-byte elements, against 2.6 for a transposed copy)."""
    arr = _bytes(data)
    if itemsize == 1:
        return arr
    planes = np.empty(len(arr), dtype=np.uint8)
    rows, cols = planes.reshape(itemsize, -1), arr.reshape(-1, itemsize)
    for k in range(itemsize):
        rows[k] = cols[:, k]
    return planes


def merge_planes(planes: bytes | bytearray | memoryview, itemsize: int, out: memoryview) -> None:
    """The inverse of :func:`split_planes`, written into ``out`` (same length).  Two-byte
    elements are assembled with shifts in 16-bit words (5.7 GB/s against 3.6 for strided
    writes); wider ones with one strided write per plane (shifts in wider words are slower)."""
    dest, src = _bytes(out), _bytes(planes)
    if itemsize == 1:
        dest[:] = src
        return
    rows = src.reshape(itemsize, -1)
    if itemsize == 2:
        words = dest.view("<u2")
        words[:] = rows[1]
        words <<= 8
        words |= rows[0]
        return
    cols = dest.reshape(-1, itemsize)
    for k in range(itemsize):
        cols[:, k] = rows[k]


def xor_into(out: memoryview, other: bytes | bytearray | memoryview) -> None:
    """``out ^= other``, bytewise (8 bytes at a time where the length allows)."""
    a, b = _bytes(out), _bytes(other)
    if len(a) % 8 == 0:
        a, b = a.view(np.uint64), b.view(np.uint64)
    np.bitwise_xor(a, b, out=a)


def _compressor() -> zstandard.ZstdCompressor:
    cctx = getattr(_local, "cctx", None)
    if cctx is None:  # one per thread: a context is not thread safe
        cctx = _local.cctx = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_content_size=True, write_checksum=False
        )
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode_piece(
    data: bytes | bytearray | memoryview,
    itemsize: int,
    base: bytes | bytearray | memoryview | None = None,
) -> bytes:
    """One encoded chunk: the byte planes of ``data`` (XOR ``base``, of the same length, when
    given) as one zstd frame that records its content size."""
    if len(data) % itemsize:
        raise ValueError(f"{len(data)} bytes are not whole {itemsize}-byte elements")
    if base is not None:
        if len(base) != len(data):
            raise ValueError("an XOR base must have the length of the data")
        mixed = np.bitwise_xor(_bytes(data), _bytes(base))
        planes = split_planes(memoryview(mixed), itemsize)
    else:
        planes = split_planes(data, itemsize)
    return _compressor().compress(planes.data)


def decode_piece(
    frame: bytes | bytearray | memoryview, itemsize: int, out: memoryview, what: str = "chunk"
) -> None:
    """Decode one encoded chunk into ``out``, whose length is the decoded size the descriptor
    records (the XOR, if any, is undone by the caller).  Refused in one line, before zstd
    allocates anything: a frame that does not declare exactly that size, uses a dictionary,
    or is followed by other bytes."""
    size = len(out)
    if size % itemsize:
        raise StoreError(f"{what}: {size} bytes are not whole {itemsize}-byte elements")
    try:
        params = zstandard.get_frame_parameters(bytes(frame[:18]))
    except zstandard.ZstdError:
        raise StoreError(f"{what} is not a zstd frame") from None
    if params.content_size != size:
        unknown = params.content_size == zstandard.CONTENTSIZE_UNKNOWN
        declared = "no size" if unknown else f"{params.content_size} bytes"
        raise StoreError(f"{what}: the zstd frame declares {declared}, the descriptor {size}")
    if params.dict_id != 0:
        raise StoreError(f"{what}: the zstd frame needs a dictionary")
    if len(frame) > compress_bound(size):
        raise StoreError(f"{what}: {len(frame)} encoded bytes for {size} decoded ones")
    try:
        planes = _decompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise StoreError(f"{what} does not decode: {exc}") from None
    if len(planes) != size:
        raise StoreError(f"{what}: decoded {len(planes)} bytes, expected {size}")
    merge_planes(planes, itemsize, out)


# -- reading an entry's bytes from a store -----------------------------------------------------
def layout_problem(
    nbytes: int,
    chunks: Sequence[str],
    encoding: Encoding | None,
    size_of: Callable[[str], int | None],
    what: str,
) -> str | None:
    """Why the stored chunks cannot be the tensor the entry describes (None: they can), from
    the object headers only: raw chunks must add up to its bytes, an encoded chunk may be no
    larger than zstd's bound for its declared size.  XOR bases are checked the same way.
    Objects that are not here are for the reader to report."""
    sizes = [size_of(c) for c in chunks]
    if encoding is None:
        if None not in sizes and sum(s or 0 for s in sizes) != nbytes:
            return (
                f"{what}: its chunks hold {sum(s or 0 for s in sizes)} bytes, the descriptor "
                f"says {nbytes}"
            )
        return None
    for oid, got, want in zip(chunks, sizes, encoding.sizes, strict=True):
        if got is not None and got > compress_bound(want):
            return f"{what}: chunk {oid[:16]} holds {got} bytes, more than {want} can encode to"
    if encoding.base is not None:
        ref = encoding.base
        return layout_problem(nbytes, ref.chunks, ref.encoding, size_of, f"{what} (XOR base)")
    return None


def _decode_chunks(
    store: ObjectStore,
    chunks: Sequence[str],
    encoding: Encoding,
    itemsize: int,
    dest: memoryview,
    what: str,
    workers: int,
    xor_with: memoryview | None = None,
) -> None:
    """Decode every chunk into its place in ``dest`` (and XOR it with the same bytes of
    ``xor_with``), in parallel across chunks."""
    offsets = [0]
    for s in encoding.sizes:
        offsets.append(offsets[-1] + s)
    if offsets[-1] != len(dest):
        raise StoreError(f"{what}: encoded chunks declare {offsets[-1]} bytes, not {len(dest)}")

    def one(i: int) -> None:
        size = encoding.sizes[i]
        frame = store.get(chunks[i], verify=True, max_size=compress_bound(size))
        lo, hi = offsets[i], offsets[i + 1]
        decode_piece(frame, itemsize, dest[lo:hi], f"{what} chunk {i}")
        if xor_with is not None:
            xor_into(dest[lo:hi], xor_with[lo:hi])

    if len(chunks) > 1 and workers > 1:
        with ThreadPoolExecutor(min(workers, len(chunks))) as pool:
            list(pool.map(one, range(len(chunks))))
    else:
        for i in range(len(chunks)):
            one(i)


def _check_content(data: memoryview, want: str | None, what: str) -> None:
    threads = blake3.blake3.AUTO if len(data) >= _PARALLEL_HASH_BYTES else 1
    if want is None or blake3.blake3(data, max_threads=threads).hexdigest() != want:
        raise StoreError(
            f"{what} does not decode to the content hash in its descriptor (corrupt or "
            "substituted; run 'git crdt verify --full')"
        )


BaseLookup = Callable[[str], "memoryview | None"]


def read_ref_into(
    store: ObjectStore,
    ref: BaseRef,
    itemsize: int,
    dest: memoryview,
    what: str,
    workers: int = WORKERS,
) -> None:
    """The bytes of an XOR base reference, decoded and checked against its content hash."""
    if ref.encoding is None:
        store.read_into(ref.chunks, dest)
    else:
        if ref.encoding.base is not None:
            raise StoreError(f"{what}: an XOR base is itself XOR-encoded")
        _decode_chunks(store, ref.chunks, ref.encoding, itemsize, dest, what, workers)
    _check_content(dest, ref.blake3, what)


def read_tensor_into(
    store: ObjectStore,
    entry: TensorEntry,
    dest: memoryview,
    *,
    known: BaseLookup | None = None,
    scratch: Callable[[], memoryview] | None = None,
    workers: int = WORKERS,
) -> None:
    """Fill ``dest`` (``entry.nbytes`` long) with the tensor's bytes, whatever their encoding.

    Raw chunks are read straight into ``dest``, each checked against its blake3 name.  Encoded
    chunks are checked against their names, decoded (bounded), and the tensor against its
    content hash.  An XOR base is taken from ``known(content hash)`` when the caller already
    holds those bytes (the base's slot in resolution), else decoded into ``scratch()`` (a
    buffer of at least ``entry.nbytes`` bytes; a new one when no ``scratch`` is given)."""
    enc = entry.encoding
    what = f"tensor {entry.name!r}"
    if enc is None:
        store.read_into(entry.chunks, dest)
        return
    itemsize = DTYPE_SIZES[entry.dtype]
    have = None
    if enc.base is not None:
        ref = enc.base
        have = known(ref.blake3) if known is not None else None
        if have is None or len(have) != len(dest):
            have = (scratch() if scratch is not None else memoryview(bytearray(len(dest))))[
                : len(dest)
            ]
            read_ref_into(store, ref, itemsize, have, f"{what} (XOR base)", workers)
    _decode_chunks(store, entry.chunks, enc, itemsize, dest, what, workers, have)
    _check_content(dest, entry.blake3, what)


def read_range(
    store: ObjectStore,
    chunks: Sequence[str],
    encoding: Encoding | None,
    itemsize: int,
    lo: int,
    hi: int,
) -> bytearray:
    """Bytes ``[lo, hi)`` of a stored tensor (raw or ``planes-zstd``; ingest reads its XOR
    base so), decoding only the chunks that overlap them; each chunk is checked against its
    blake3 name."""
    if encoding is not None and encoding.base is not None:
        raise StoreError("an XOR base must not itself be XOR-encoded")
    if encoding is None:
        sizes = [store.size(c) for c in chunks]
        if None in sizes:
            raise StoreError(f"object {chunks[sizes.index(None)][:16]} is missing")
    else:
        sizes = list(encoding.sizes)
    out = bytearray(hi - lo)
    pos = 0
    for i, (oid, size) in enumerate(zip(chunks, sizes, strict=True)):
        size = size or 0
        a, b = max(lo, pos), min(hi, pos + size)
        if a < b:
            if encoding is None:
                data: bytes | bytearray = store.get(oid, verify=True, max_size=size)
            else:
                data = bytearray(size)
                frame = store.get(oid, verify=True, max_size=compress_bound(size))
                decode_piece(frame, itemsize, memoryview(data), f"chunk {i}")
            out[a - lo : b - lo] = memoryview(data)[a - pos : b - pos]
        pos += size
    if pos < hi:
        raise StoreError(f"a stored tensor holds {pos} bytes, {hi} were needed")
    return out
