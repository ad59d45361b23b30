"""Layer 1: lossless encodings of tensor chunks, and reading an entry's bytes back (no torch).

Four encodings (docs/format.md, "Chunk encodings"), chosen at add time and recorded in each
tensor entry, outside the content identity:

- ``raw``: the chunks are the tensor's bytes (the entry has no ``encoding`` field);
- ``planes-zstd``: each chunk of whole elements is split into byte planes (byte ``k`` of every
  element, ``k = 0 .. itemsize-1``, little-endian) and the planes, concatenated, are one zstd
  frame with its content size (any zstd parameters decode: the writer's are :data:`ZSTD_PARAMS`);
- ``xor-planes-zstd``: as ``planes-zstd``, over the tensor's bytes XOR the bytes of a stored
  tensor of the same size (the base's tensor of the same name when it was added), which the
  entry names by content hash, chunks and encoding, so a later change of base never breaks it;
- ``xor-sparse-zstd``: against the same kind of base, only the elements that differ from it:
  one bit per element (set where the element differs, least significant bit first), then the
  byte planes of the differing elements' XOR, as one zstd frame.  A fine-tune leaves most bf16
  words of its base unchanged; zstd then compresses only the changed ones, not runs of zeros.
  On scripts/bench_ingest.py's fine-tune (a third of the words changed) encoding is about 1.5x
  faster than ``xor-planes-zstd`` and frames 14% smaller; where most words change, the mask
  costs up to 1/16 of the raw size for 2-byte elements.

Decoding is exact, and bounded for hostile content: a frame must declare the decoded size the
entry records (checked before zstd allocates), hold no other frame or trailing bytes and use no
dictionary; and the decoded tensor must give the blake3 of its content recorded in the entry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3
import numpy as np
import zstandard

from ..errors import InputError, StoreError
from .descriptor import BaseRef, Encoding, TensorEntry
from .formats import DTYPE_SIZES
from .store import MAX_OBJECT_BYTES, WORKERS, ObjectStore

RAW = "raw"
PLANES = "planes-zstd"
XOR = "xor-planes-zstd"
SPARSE = "xor-sparse-zstd"
ENCODINGS = (RAW, PLANES, XOR, SPARSE)
STORED_ENCODINGS = (PLANES, XOR, SPARSE)  # the names a descriptor's ``encoding`` may carry
XOR_ENCODINGS = (XOR, SPARSE)  # taken against a base
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# zstd's "fast" strategy with a small window, the smallest hash table (64 entries) and matches
# of 7 bytes or more: byte planes are mostly literals (the low plane of bf16 words is near
# random; the low plane of an XOR against the base is two thirds zeros among small values),
# and a short match costs more than the Huffman code of its literals, so the fewer matches the
# match finder tries, the faster and smaller.  Measured on a bf16 fine-tune's planes
# (scripts/bench_ingest.py): against level 1, encoding about 1.5x faster on XOR planes and
# frames 8% smaller (0.169 against 0.183 of raw); against hash_log 10, 1.85x faster on plain
# planes (0.670 of raw against 0.673) and decoding 1.2-2.2x faster.  The window (128 KiB)
# bounds the decoder's memory too.  The parameters are not part of the format: frames are
# named by their blake3, and any frame that decodes to the tensor's content is valid.
ZSTD_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
    write_content_size=True,
    write_checksum=False,
)
# An encoded chunk holds whole elements, at most the chunk size and at most PIECE_BYTES of the
# tensor: a tensor's chunks are then encoded and decoded in parallel (one zstd frame decodes
# on one core, ~1 GB/s here), at a cost of under 0.1% in size against 64 MiB frames.
PIECE_BYTES = 8 * 1024 * 1024
MAX_PIECE_BYTES = MAX_OBJECT_BYTES - (MAX_OBJECT_BYTES >> 7)  # room for zstd's growth
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


def content_bound(name: str, size: int) -> int:
    """The most bytes a frame of encoding ``name`` may declare for ``size`` decoded bytes:
    ``size``, or for ``xor-sparse-zstd`` its change mask (one bit per element, at most one per
    byte) on top."""
    return size + (size + 7) // 8 if name == SPARSE else size


def frame_bound(name: str, size: int) -> int:
    """The largest stored chunk of encoding ``name`` for ``size`` decoded bytes."""
    return compress_bound(content_bound(name, size))


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
def _bytes(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def _scratch(slot: str, size: int) -> np.ndarray:
    """A uint8 buffer of ``size`` bytes owned by this thread and reused call after call (fresh
    8 MiB buffers cost their page faults every time); ``slot`` names one of several."""
    buffers: dict[str, np.ndarray] | None = getattr(_local, "scratch", None)
    if buffers is None:
        buffers = _local.scratch = {}
    buf = buffers.get(slot)
    if buf is None or len(buf) < size:
        buf = buffers[slot] = np.empty(max(size, PIECE_BYTES), dtype=np.uint8)
    return buf[:size]


def split_planes(
    data: bytes | bytearray | memoryview, itemsize: int, out: np.ndarray | None = None
) -> np.ndarray:
    """The byte planes of little-endian elements, concatenated (plane ``k`` holds byte ``k``
    of every element): contiguous uint8 of the same length, written into ``out`` when given.
    Wider elements take one strided read per plane (measured 3.5 GB/s for 4-byte elements,
    against 2.6 for a transposed copy)."""
    arr = _bytes(data)
    if itemsize == 1:
        if out is None:
            return arr
        out[:] = arr
        return out
    planes = np.empty(len(arr), dtype=np.uint8) if out is None else out
    rows, cols = planes.reshape(itemsize, -1), arr.reshape(-1, itemsize)
    if itemsize == 2:
        # 16-bit words cast to bytes keep their low byte: two contiguous casts and a shift
        # (5-9 GB/s here, against 3.5 for strided reads)
        words = arr.view("<u2")
        np.copyto(rows[0], words, casting="unsafe")
        np.copyto(rows[1], words >> 8, casting="unsafe")
        return planes
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


def xor_into(
    out: memoryview | np.ndarray, other: bytes | bytearray | memoryview | np.ndarray
) -> None:
    """``out ^= other``, bytewise (8 bytes at a time where the length allows)."""
    a, b = _bytes(out), _bytes(other)
    if len(a) % 8 == 0:
        a, b = a.view(np.uint64), b.view(np.uint64)
    np.bitwise_xor(a, b, out=a)


def _compressor() -> zstandard.ZstdCompressor:
    cctx = getattr(_local, "cctx", None)
    if cctx is None:  # one per thread: a context is not thread safe
        cctx = _local.cctx = zstandard.ZstdCompressor(compression_params=ZSTD_PARAMS)
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
    *,
    base_planes: bytes | bytearray | memoryview | np.ndarray | None = None,
    sparse: bool = False,
) -> bytes:
    """One encoded chunk: the byte planes of ``data`` XOR ``base`` (the base's bytes) or XOR
    ``base_planes`` (the base's byte planes, as :func:`decode_planes` gives them: the same
    result, since planes are a permutation of the bytes), when given, as one zstd frame that
    records its content size; with ``sparse`` (``xor-sparse-zstd``, a base is then required),
    only the elements that differ from the base.  The work happens in this thread's reused
    buffers."""
    if len(data) % itemsize:
        raise ValueError(f"{len(data)} bytes are not whole {itemsize}-byte elements")
    other = base if base is not None else base_planes
    if other is not None and len(other) != len(data):
        raise ValueError("an XOR base must have the length of the data")
    if sparse and other is None:
        raise ValueError(f"{SPARSE} needs a base")
    if sparse:
        return _encode_sparse(_bytes(data), itemsize, base, base_planes)
    if base is not None:
        mixed = _scratch("mixed", len(data))
        np.bitwise_xor(_bytes(data), _bytes(base), out=mixed)
        planes = split_planes(mixed.data, itemsize, _scratch("planes", len(data)))
    else:
        planes = split_planes(data, itemsize, _scratch("planes", len(data)))
        if base_planes is not None:
            xor_into(planes, base_planes)
    return _compressor().compress(planes.data)


_SPARSE_BLOCK_BYTES = 1 << 19  # per block: fewer calls than 2^17-2^18, and cache-sized (measured)


def _encode_sparse(
    data: np.ndarray,
    itemsize: int,
    base: bytes | bytearray | memoryview | None,
    base_planes: bytes | bytearray | memoryview | np.ndarray | None,
) -> bytes:
    """``xor-sparse-zstd``'s frame: the change mask (``ceil(n / 8)`` bytes, bit ``i % 8`` of
    byte ``i // 8`` set where element ``i`` differs from the base), then the byte planes of the
    differing elements' XOR, in element order.  Built a block of elements at a time, so that
    the XOR, the mask and the gathers stay in the cache, and streamed into one zstd frame."""
    n = len(data) // itemsize
    head = (n + 7) // 8
    step = max(8, _SPARSE_BLOCK_BYTES // itemsize)  # a multiple of 8: whole mask bytes
    mask = _scratch("mask", head)
    dense = _scratch("dense", len(data)).reshape(itemsize, n)
    any_ = _scratch("any", step)
    changed = np.empty(step, dtype=bool)
    base_rows = _bytes(base_planes).reshape(itemsize, n) if base_planes is not None else None
    base_bytes = _bytes(base) if base is not None else None
    m = 0
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        k = hi - lo
        xs = _scratch("x", k * itemsize).reshape(itemsize, k)  # contiguous planes
        if base_rows is not None:
            split_planes(data[lo * itemsize : hi * itemsize].data, itemsize, xs.reshape(-1))
            np.bitwise_xor(xs, base_rows[:, lo:hi], out=xs)
        else:
            assert base_bytes is not None  # the XOR of the bytes, then its planes
            span = slice(lo * itemsize, hi * itemsize)
            mixed = _scratch("mixed", k * itemsize)
            np.bitwise_xor(data[span], base_bytes[span], out=mixed)
            split_planes(mixed.data, itemsize, xs.reshape(-1))
        flags = any_[:k]
        if itemsize == 1:
            np.copyto(flags, xs[0])
        else:
            np.bitwise_or(xs[0], xs[1], out=flags)
            for j in range(2, itemsize):
                np.bitwise_or(flags, xs[j], out=flags)
        ch = changed[:k]
        np.not_equal(flags, 0, out=ch)
        mask[lo // 8 : (hi + 7) // 8] = np.packbits(ch, bitorder="little")
        where = np.flatnonzero(ch)
        for j in range(itemsize):
            np.take(xs[j], where, out=dense[j, m : m + len(where)])
        m += len(where)
    cobj = _compressor().compressobj(size=head + itemsize * m)
    parts = [cobj.compress(mask.data)]
    parts += [cobj.compress(dense[j, :m].data) for j in range(itemsize)]
    parts.append(cobj.flush())
    return b"".join(parts)


def _decompress(frame: bytes | bytearray | memoryview, least: int, most: int, what: str) -> bytes:
    """The content of one zstd frame that declares between ``least`` and ``most`` bytes
    (checked before zstd allocates anything); refused in one line: a frame without that
    size, with a dictionary, too large for its size, or followed by other bytes."""
    try:
        params = zstandard.get_frame_parameters(bytes(frame[:18]))
    except zstandard.ZstdError:
        raise StoreError(f"{what} is not a zstd frame") from None
    size = params.content_size
    if not least <= size <= most or size == zstandard.CONTENTSIZE_UNKNOWN:
        unknown = size == zstandard.CONTENTSIZE_UNKNOWN
        declared = "no size" if unknown else f"{size} bytes"
        allowed = f"{least}" if least == most else f"{least} to {most}"
        raise StoreError(f"{what}: the zstd frame declares {declared}, the descriptor {allowed}")
    if params.dict_id != 0:
        raise StoreError(f"{what}: the zstd frame needs a dictionary")
    if len(frame) > compress_bound(size):
        raise StoreError(f"{what}: {len(frame)} encoded bytes for {size} decoded ones")
    try:
        content = _decompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise StoreError(f"{what} does not decode: {exc}") from None
    if len(content) != size:
        raise StoreError(f"{what}: decoded {len(content)} bytes, expected {size}")
    return content


def decode_planes(
    frame: bytes | bytearray | memoryview, size: int, itemsize: int, what: str = "chunk"
) -> bytes:
    """The byte planes one encoded chunk holds (``size`` bytes, the decoded size the descriptor
    records).  Refused in one line, before zstd allocates anything: a frame that does not
    declare exactly that size, uses a dictionary, or is followed by other bytes."""
    if size % itemsize:
        raise StoreError(f"{what}: {size} bytes are not whole {itemsize}-byte elements")
    return _decompress(frame, size, size, what)


def decode_piece(
    frame: bytes | bytearray | memoryview, itemsize: int, out: memoryview, what: str = "chunk"
) -> None:
    """Decode one encoded chunk into ``out``, whose length is the decoded size the descriptor
    records (the XOR, if any, is undone by the caller); refused as :func:`decode_planes`
    says."""
    merge_planes(decode_planes(frame, len(out), itemsize, what), itemsize, out)


def decode_sparse(
    frame: bytes | bytearray | memoryview,
    itemsize: int,
    base: memoryview | np.ndarray,
    out: memoryview | np.ndarray,
    what: str = "chunk",
) -> None:
    """Decode one ``xor-sparse-zstd`` chunk into ``out`` (the decoded size the descriptor
    records): the same bytes of ``base``, with each element the change mask marks XORed with
    the next stored value.  Refused in one line: a frame declaring a size no mask and values
    of ``len(out)`` bytes can have, a mask with bits past the last element, or a mask that
    marks another number of elements than the frame holds values for."""
    size = len(out)
    if size % itemsize or len(base) != size:
        raise StoreError(f"{what}: {size} bytes are not whole {itemsize}-byte elements")
    n = size // itemsize
    head = (n + 7) // 8
    content = _decompress(frame, head, head + size, what)
    if (len(content) - head) % itemsize:
        raise StoreError(f"{what}: the changed values are not whole {itemsize}-byte elements")
    mask = np.frombuffer(content, dtype=np.uint8, count=head)
    if n % 8 and int(mask[-1]) >> (n % 8):
        raise StoreError(f"{what}: the change mask marks elements past the last one")
    count = (len(content) - head) // itemsize
    rows = np.frombuffer(content, dtype=np.uint8, offset=head).reshape(itemsize, count)
    dest, src = _bytes(out), _bytes(base)
    words = _WORDS[itemsize]
    step = max(8, _SPARSE_BLOCK_BYTES // itemsize)
    m = 0
    for lo in range(0, n, step):  # a block at a time, as the encoder: in the cache
        hi = min(n, lo + step)
        flags = np.unpackbits(mask[lo // 8 : (hi + 7) // 8], count=hi - lo, bitorder="little")
        where = np.flatnonzero(flags.view(bool))
        j = len(where)
        if m + j > count:
            break
        span = slice(lo * itemsize, hi * itemsize)
        if j:  # the block's XOR: zeros, the values scattered in; then the base XOR it
            full = _scratch("full", (hi - lo) * itemsize)
            full.fill(0)
            values = _scratch("values", j * itemsize)
            merge_planes(np.ascontiguousarray(rows[:, m : m + j]).data, itemsize, values.data)
            full.view(words)[where] = values.view(words)
            np.bitwise_xor(src[span], full, out=dest[span])
        else:
            np.copyto(dest[span], src[span])
        m += j
    if m != count:
        marked = int(np.unpackbits(mask).sum(dtype=np.int64))
        raise StoreError(
            f"{what}: the change mask marks {marked} elements, the frame holds {count} values"
        )


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
        if got is not None and got > frame_bound(encoding.name, want):
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

    sparse = encoding.name == SPARSE
    if sparse and xor_with is None:
        raise StoreError(f"{what}: encoding {SPARSE} without its base")

    def one(i: int) -> None:
        size = encoding.sizes[i]
        frame = store.get(chunks[i], verify=True, max_size=frame_bound(encoding.name, size))
        lo, hi = offsets[i], offsets[i + 1]
        if sparse:
            assert xor_with is not None
            decode_sparse(frame, itemsize, xor_with[lo:hi], dest[lo:hi], f"{what} chunk {i}")
            return
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


class XorBases:
    """The XOR bases of one ingest: for each piece of a tensor to encode, the bytes (or byte
    planes) of the same range of its stored base tensor, raw or ``planes-zstd``.

    Every stored chunk is read, checked against its blake3 name and decoded once, however many
    pieces it feeds (a raw 64 MiB chunk feeds eight 8 MiB pieces), and dropped when the last
    of them has taken it.  A ``planes-zstd`` chunk that spans exactly the piece is handed over
    as planes, never reassembled: the XOR is done on the planes.  Thread safe: the pieces are
    encoded in parallel."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._uses: dict[str, int] = {}
        self._held: dict[str, Future[bytes]] = {}

    @staticmethod
    def _spans(chunks: Sequence[str], sizes: Sequence[int], lo: int, hi: int) -> list[_Span]:
        out, pos = [], 0
        for oid, size in zip(chunks, sizes, strict=True):
            if max(lo, pos) < min(hi, pos + size):
                out.append(_Span(oid, pos, size))
            pos += size
        if pos < hi:
            raise StoreError(f"a stored tensor holds {pos} bytes, {hi} were needed")
        return out

    def _sizes(self, chunks: Sequence[str], encoding: Encoding | None) -> list[int]:
        if encoding is not None:
            if encoding.base is not None:
                raise StoreError("an XOR base must not itself be XOR-encoded")
            return list(encoding.sizes)
        sizes = [self.store.size(c) for c in chunks]
        for oid, size in zip(chunks, sizes, strict=True):
            if size is None:
                raise StoreError(f"object {oid[:16]} is missing")
        return [s or 0 for s in sizes]

    def expect(self, chunks: Sequence[str], encoding: Encoding | None, lo: int, hi: int) -> None:
        """Announce that the range ``[lo, hi)`` of this stored tensor will be asked for."""
        spans = self._spans(chunks, self._sizes(chunks, encoding), lo, hi)
        with self._lock:
            for span in spans:
                self._uses[span.oid] = self._uses.get(span.oid, 0) + 1

    def _take(self, span: _Span, encoded: bool, itemsize: int) -> bytes:
        """The chunk's bytes (raw) or byte planes (encoded), verified; read once."""
        with self._lock:
            future = self._held.get(span.oid)
            owner = future is None
            if future is None:
                future = self._held[span.oid] = Future()
        try:
            if owner:
                try:
                    if encoded:
                        frame = self._frame(span)
                        what = f"chunk {span.oid[:16]}"
                        future.set_result(decode_planes(frame, span.size, itemsize, what))
                    else:
                        future.set_result(self.store.get(span.oid, verify=True, max_size=span.size))
                except BaseException as exc:
                    future.set_exception(exc)
            return future.result()
        finally:
            with self._lock:
                left = self._uses.get(span.oid, 1) - 1
                self._uses[span.oid] = left
                if left <= 0:
                    self._held.pop(span.oid, None)

    def _frame(self, span: _Span) -> memoryview:
        """The encoded chunk's frame, read into this thread's frame buffer (no fresh
        allocation per chunk) and checked against its blake3 name."""
        size = self.store.size(span.oid)
        if size is None:
            raise StoreError(f"object {span.oid[:16]} is missing")
        if size > compress_bound(span.size):
            raise StoreError(
                f"chunk {span.oid[:16]} holds {size} bytes, more than {span.size} can encode to"
            )
        frame = _scratch("frame", size).data
        self.store.read_chunk_into(span.oid, frame)
        if blake3.blake3(frame).hexdigest() != span.oid:
            raise StoreError(f"object {span.oid[:16]} does not match its blake3 hash")
        return frame

    def piece(
        self,
        chunks: Sequence[str],
        encoding: Encoding | None,
        itemsize: int,
        lo: int,
        hi: int,
    ) -> dict[str, bytes | memoryview | np.ndarray]:
        """The base of ``[lo, hi)``, as :func:`encode_piece`'s keyword: ``base_planes`` for one
        encoded chunk spanning exactly the range, else ``base`` (bytes)."""
        spans = self._spans(chunks, self._sizes(chunks, encoding), lo, hi)
        encoded = encoding is not None
        if len(spans) == 1:
            span = spans[0]
            data = self._take(span, encoded, itemsize)
            if encoded and (span.pos, span.pos + span.size) == (lo, hi):
                return {"base_planes": data}
            if not encoded:
                return {"base": memoryview(data)[lo - span.pos : hi - span.pos]}
            spans_data = [(span, data)]
        else:
            spans_data = [(span, self._take(span, encoded, itemsize)) for span in spans]
        out = _scratch("base", hi - lo)
        for span, data in spans_data:
            if encoded:
                whole = np.empty(span.size, dtype=np.uint8)
                merge_planes(data, itemsize, whole.data)
                data = whole.data  # type: ignore[assignment]
            a, b = max(lo, span.pos), min(hi, span.pos + span.size)
            out[a - lo : b - lo] = _bytes(data)[a - span.pos : b - span.pos]
        return {"base": out.data}


@dataclass(frozen=True)
class _Span:
    oid: str
    pos: int
    size: int
