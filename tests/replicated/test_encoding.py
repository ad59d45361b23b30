"""Lossless chunk encodings (replicated/encoding.py, docs/format.md "Chunk encodings"): exact
round trips for every dtype and bit pattern, bounded and one-line refusals of hostile frames,
identity that ignores the encoding, and merged bytes that do not depend on it, also across a
clone."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from helpers import crdt, descriptor_address, fresh_repo, git
from hypothesis import given, settings
from hypothesis import strategies as st

from git_crdt_merge.errors import StoreError
from git_crdt_merge.replicated import checks, encoding
from git_crdt_merge.replicated.descriptor import Descriptor
from git_crdt_merge.replicated.formats import DTYPE_SIZES
from git_crdt_merge.replicated.manifest import canonical_json
from git_crdt_merge.replicated.store import ObjectStore

ITEMSIZES = sorted(set(DTYPE_SIZES.values()))
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def roundtrip(data: bytes, itemsize: int, base: bytes | None = None) -> bytes:
    frame = encoding.encode_piece(data, itemsize, base)
    out = bytearray(len(data))
    encoding.decode_piece(frame, itemsize, memoryview(out))
    if base is not None:
        encoding.xor_into(memoryview(out), base)
    return bytes(out)


def roundtrip_sparse(data: bytes, itemsize: int, base: bytes) -> bytes:
    frame = encoding.encode_piece(data, itemsize, base, sparse=True)
    out = bytearray(len(data))
    encoding.decode_sparse(frame, itemsize, memoryview(base), memoryview(out))
    return bytes(out)


# -- the codec ---------------------------------------------------------------------------------
def test_stored_encoding_names_agree_with_validation() -> None:
    assert checks.STORED_ENCODINGS == encoding.STORED_ENCODINGS
    assert set(checks.ENCODING_KEYS) == set(encoding.STORED_ENCODINGS)


@settings(max_examples=200, deadline=None)
@given(
    itemsize=st.sampled_from(ITEMSIZES),
    words=st.integers(0, 300),
    data=st.data(),
)
def test_planes_round_trip_every_bit_pattern(
    itemsize: int, words: int, data: st.DataObject
) -> None:
    """Random bytes cover every bit pattern of every dtype: NaN payloads, signed zeros,
    subnormals, infinities; odd element counts and the empty tensor."""
    raw = data.draw(st.binary(min_size=words * itemsize, max_size=words * itemsize))
    base = data.draw(st.binary(min_size=len(raw), max_size=len(raw)))
    assert roundtrip(raw, itemsize) == raw
    assert roundtrip(raw, itemsize, base) == raw
    # xor-sparse-zstd: against a random base, an equal one, and one that differs in a few
    # elements, in a few bytes of an element, or in a single bit
    assert roundtrip_sparse(raw, itemsize, base) == raw
    assert roundtrip_sparse(raw, itemsize, raw) == raw
    near = bytearray(raw)
    for pos in data.draw(st.lists(st.integers(0, max(0, len(raw) - 1)), max_size=8)):
        if raw:
            near[pos] ^= 1 << data.draw(st.integers(0, 7))
    assert roundtrip_sparse(raw, itemsize, bytes(near)) == raw


SPECIAL = {
    np.float16: [0.0, -0.0, np.inf, -np.inf],
    np.float32: [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45],
    np.float64: [0.0, -0.0, np.inf, -np.inf, 5e-324],
}
NAN_BITS = {np.float16: 0x7C01, np.float32: 0x7FC00123, np.float64: 0xFFF8000000000ABC}
UINT = {np.float16: np.uint16, np.float32: np.uint32, np.float64: np.uint64}


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_nan_payloads_and_signed_zeros_survive_bit_for_bit(
    dtype: type, shape: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) if shape else 1
    values = rng.standard_normal(n).astype(dtype)
    specials = np.array(SPECIAL[dtype], dtype=dtype)
    nan = np.array([NAN_BITS[dtype]], dtype=UINT[dtype]).view(dtype)
    pool = np.concatenate([specials, nan, -nan])
    pick = rng.random(n) < 0.3
    values[pick] = pool[rng.integers(0, len(pool), int(pick.sum()))]
    raw = values.reshape(shape).tobytes()
    base = rng.standard_normal(n).astype(dtype).tobytes()
    assert roundtrip(raw, values.itemsize) == raw
    assert roundtrip(raw, values.itemsize, base) == raw
    assert roundtrip_sparse(raw, values.itemsize, base) == raw
    # a base that differs from the data only in its signed zeros and NaN payloads
    flipped = values.copy()
    flipped[values == 0] *= -1
    assert roundtrip_sparse(raw, values.itemsize, flipped.tobytes()) == raw


def test_bf16_planes_compress_and_xor_of_a_fine_tune_compresses_more() -> None:
    """The ratios the issue measured, on a small bf16 tensor (weights ~ N(0, 0.02), a fine-tune
    that changes about a third of the words)."""
    rng = np.random.default_rng(0)
    f32 = (rng.standard_normal(1 << 18) * 0.02).astype(np.float32)
    base = (f32.view(np.uint32) >> 16).astype(np.uint16)
    tuned32 = f32 + (rng.standard_normal(f32.size) * 0.02 * 0.002).astype(np.float32)
    tuned = (tuned32.view(np.uint32) >> 16).astype(np.uint16)
    changed = float(np.mean(base != tuned))
    assert 0.2 < changed < 0.5
    planes = len(encoding.encode_piece(base.tobytes(), 2)) / base.nbytes
    xor = len(encoding.encode_piece(tuned.tobytes(), 2, base.tobytes())) / base.nbytes
    frame = encoding.encode_piece(tuned.tobytes(), 2, base.tobytes(), sparse=True)
    sparse = len(frame) / base.nbytes
    assert planes < 0.75 and xor < 0.3 and sparse < 0.3
    assert roundtrip(tuned.tobytes(), 2, base.tobytes()) == tuned.tobytes()
    assert roundtrip_sparse(tuned.tobytes(), 2, base.tobytes()) == tuned.tobytes()
    # the frame is the change mask, then the planes of the changed words' XOR
    content = zstandard.ZstdDecompressor().decompress(frame)
    mask = base != tuned
    head = (mask.size + 7) // 8
    assert content[:head] == np.packbits(mask, bitorder="little").tobytes()
    diff = (base ^ tuned)[mask]
    assert content[head:] == encoding.split_planes(diff.tobytes(), 2).tobytes()


def test_pieces_hold_whole_elements_and_cover_the_tensor() -> None:
    assert encoding.pieces(0, 64, 4) == [(0, 0)]
    assert encoding.pieces(10, 7, 2) == [(0, 6), (6, 10)]
    assert encoding.pieces(12, 1, 4) == [(0, 4), (4, 8), (8, 12)]  # at least one element
    assert encoding.pieces(2**31, 2**30, 2)[0] == (0, encoding.PIECE_BYTES)


# -- hostile frames: refused in one line before zstd allocates ---------------------------------
def refused(frame: bytes, size: int, itemsize: int = 1) -> str:
    with pytest.raises(StoreError) as exc:
        encoding.decode_piece(frame, itemsize, memoryview(bytearray(size)))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_a_frame_declaring_another_size_is_refused_unread() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 26))  # 64 MiB of zeros
    assert len(bomb) < 4096
    assert "declares 67108864 bytes, the descriptor 4096" in refused(bomb, 4096)


def test_a_frame_without_a_content_size_is_refused() -> None:
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    frame = cobj.compress(b"x" * 100) + cobj.flush()
    assert "declares no size" in refused(frame, 100)


def test_trailing_bytes_or_a_second_frame_are_refused() -> None:
    frame = encoding.encode_piece(b"abcd" * 10, 1)
    assert "does not decode" in refused(frame + b"\0", 40)
    assert "does not decode" in refused(frame + frame, 40)


def test_a_dictionary_frame_and_garbage_are_refused() -> None:
    samples = [f"record {i} value {i * 7} name foo bar".encode() * 3 for i in range(2000)]
    dict_data = zstandard.train_dictionary(1024, samples)
    frame = zstandard.ZstdCompressor(dict_data=dict_data).compress(b"payload" * 10)
    assert "dictionary" in refused(frame, 70)
    assert "not a zstd frame" in refused(b"\1\2\3", 3)
    assert "not whole" in refused(encoding.encode_piece(b"abc", 1), 3, itemsize=2)


def sparse_refused(content: bytes, size: int, itemsize: int = 2) -> str:
    frame = zstandard.ZstdCompressor(level=1).compress(content)
    with pytest.raises(StoreError) as exc:
        encoding.decode_sparse(frame, itemsize, bytes(size), memoryview(bytearray(size)))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_hostile_sparse_frames_are_refused_in_one_line() -> None:
    """10 two-byte elements: a 2-byte mask, then 2 bytes per marked element."""
    one = b"\x01\x00" + b"\xaa\xbb"  # element 0 changed
    out = bytearray(20)
    good = zstandard.ZstdCompressor(level=1).compress(one)
    encoding.decode_sparse(good, 2, bytes(range(20)), memoryview(out))
    assert out == bytes([0 ^ 0xAA, 1 ^ 0xBB]) + bytes(range(2, 20))
    assert "declares 1 bytes, the descriptor 2 to 22" in sparse_refused(b"\x01", 20)
    # a bomb: more than a mask and every value can be
    assert "declares 4096 bytes, the descriptor 2 to 22" in sparse_refused(bytes(4096), 20)
    assert "not whole 2-byte elements" in sparse_refused(b"\x01\x00\xaa", 20)
    assert "marks 2 elements, the frame holds 1 values" in sparse_refused(b"\x03\x00ab", 20)
    assert "marks 0 elements, the frame holds 1 values" in sparse_refused(b"\x00\x00ab", 20)
    # bit 10 of the mask is past the 10th element
    assert "past the last one" in sparse_refused(b"\x00\x04ab", 20)
    assert "not a zstd frame" in refused(b"\1\2\3", 3)
    with pytest.raises(ValueError, match="needs a base"):
        encoding.encode_piece(b"ab", 2, sparse=True)


def test_sparse_frames_hold_the_mask_and_the_changed_planes_across_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The encoder works a block of elements at a time: with small blocks, every element
    count (whole blocks, a partial last block, a partial mask byte) gives the format's
    content, from the base's bytes and from its planes."""
    monkeypatch.setattr(encoding, "_SPARSE_BLOCK_BYTES", 64)
    rng = np.random.default_rng(7)
    for itemsize in ITEMSIZES:
        words = _WORDS[itemsize]
        for n in (0, 1, 7, 8, 9, 63, 64, 65, 200, 1000):
            data = rng.integers(0, 256, n * itemsize, dtype=np.uint8)
            base = data.copy()
            base[rng.random(base.size) < 0.2] ^= np.uint8(1 << int(rng.integers(0, 8)))
            x = (data ^ base).view(words)
            changed = x != 0
            want = np.packbits(changed, bitorder="little").tobytes()
            want += encoding.split_planes(x[changed].tobytes(), itemsize).tobytes()
            planes = encoding.split_planes(base.tobytes(), itemsize).copy()
            for kw in ({"base": base.tobytes()}, {"base_planes": planes}):
                frame = encoding.encode_piece(data.tobytes(), itemsize, sparse=True, **kw)
                assert zstandard.ZstdDecompressor().decompress(frame) == want, (itemsize, n)
            assert roundtrip_sparse(data.tobytes(), itemsize, base.tobytes()) == data.tobytes()


def test_sparse_against_planes_equals_sparse_against_bytes() -> None:
    rng = np.random.default_rng(6)
    for itemsize in ITEMSIZES:
        data = rng.integers(0, 256, itemsize * 301, dtype=np.uint8)
        base = data.copy()
        base[rng.random(base.size) < 0.1] ^= 0x10  # a tenth of the bytes differ
        by_bytes = encoding.encode_piece(data.tobytes(), itemsize, base.tobytes(), sparse=True)
        planes = encoding.split_planes(base.tobytes(), itemsize).copy()
        assert encoding.encode_piece(data, itemsize, base_planes=planes, sparse=True) == by_bytes
        assert roundtrip_sparse(data.tobytes(), itemsize, base.tobytes()) == data.tobytes()


def test_an_oversized_frame_for_its_declared_size_is_refused() -> None:
    frame = encoding.encode_piece(b"a" * 64, 1)
    padded = frame + b"\0" * 4096
    assert "encoded bytes for 64 decoded ones" in refused(padded, 64)


def test_encodings_are_validated_before_any_buffer() -> None:
    entry = {
        "blake3": "a" * 64,
        "bytes": 8,
        "chunks": ["b" * 64, "c" * 64],
        "dtype": "F32",
        "shape": [2],
    }

    def problems(enc: object, fmt: int = 2) -> list[str]:
        table = dict(entry, encoding=enc)
        if fmt == 1:
            del table["blake3"]
        return checks.descriptor_problems({"format": fmt, "tensors": {"t": table}}, "d")

    good = {"name": "planes-zstd", "sizes": [4, 4]}
    assert problems(good) == []
    assert "must have exactly" in problems(good, fmt=1)[0]
    assert "unknown encoding" in problems({"name": "raw", "sizes": [4, 4]})[0]
    assert "one decoded size per chunk" in problems({"name": "planes-zstd", "sizes": [8]})[0]
    assert "decodes to 2147483648" in problems({"name": "planes-zstd", "sizes": [2**30] * 2})[0]
    assert "whole elements" in problems({"name": "planes-zstd", "sizes": [2, 6]})[0]
    assert "whole elements" in problems({"name": "planes-zstd", "sizes": [2**31, 0]})[0]
    ref = {"blake3": "d" * 64, "chunks": ["e" * 64]}
    xor = {"name": "xor-planes-zstd", "sizes": [4, 4], "base": ref}
    assert problems(xor) == []
    nested = dict(ref, encoding=xor)
    assert "must not itself be XOR" in problems(dict(xor, base=nested))[0]
    sparse = dict(xor, name="xor-sparse-zstd")
    assert problems(sparse) == []
    assert "must have exactly" in problems({"name": "xor-sparse-zstd", "sizes": [4, 4]})[0]
    assert "must not itself be XOR" in problems(dict(xor, base=dict(ref, encoding=sparse)))[0]
    assert "malformed content hash" in problems(dict(xor, base=dict(ref, blake3="x")))[0]
    # the base's chunks are references (fetched, checked); its content hash is not
    desc = {"format": 2, "tensors": {"t": dict(entry, encoding=xor)}}
    refs = {oid for oid, _ in checks.object_references(desc)}
    assert refs == {"b" * 64, "c" * 64, "e" * 64}


def test_xor_bases_give_every_range_of_a_stored_base_reading_each_chunk_once(
    tmp_path: Path,
) -> None:
    """Ingest's XOR bases (encoding.XorBases), raw and planes-zstd, for ranges aligned with the
    stored chunks, inside one, and across two: the base's exact bytes (or its exact planes),
    and every chunk read from the store once however many ranges it feeds."""
    from git_crdt_merge.replicated.descriptor import Encoding

    repo = fresh_repo(tmp_path / "r")
    itemsize = 2
    data = np.random.default_rng(3).integers(0, 256, 6000, dtype=np.uint8).tobytes()

    class Counting(ObjectStore):
        reads: dict[str, int] = {}

        def get(self, object_id: str, **kw: Any) -> bytes:
            self.reads[object_id] = self.reads.get(object_id, 0) + 1
            return super().get(object_id, **kw)

        def read_chunk_into(self, object_id: str, dest: memoryview) -> None:
            self.reads[object_id] = self.reads.get(object_id, 0) + 1
            super().read_chunk_into(object_id, dest)

    store = Counting(repo)
    raw_chunks = store.put_chunks([memoryview(data)[i : i + 2500] for i in range(0, 6000, 2500)])
    frames = [encoding.encode_piece(data[i : i + 1000], itemsize) for i in range(0, 6000, 1000)]
    enc_chunks = store.put_chunks([memoryview(f) for f in frames])
    planes = Encoding(encoding.PLANES, (1000,) * 6)
    ranges = [(0, 1000), (1000, 2000), (2000, 3000), (2400, 2600), (5000, 6000)]
    for chunks, enc in ((raw_chunks, None), (enc_chunks, planes)):
        bases = encoding.XorBases(store)
        for lo, hi in ranges:
            bases.expect(chunks, enc, lo, hi)
        store.reads.clear()
        for lo, hi in ranges:
            ((kind, got),) = bases.piece(chunks, enc, itemsize, lo, hi).items()
            want = data[lo:hi]
            if kind == "base_planes":
                assert enc is not None and (hi - lo) == 1000 and lo % 1000 == 0
                want = bytes(encoding.split_planes(want, itemsize))
            assert bytes(got) == want, (kind, lo, hi)
            # a piece encoded against either form decodes, XORed with the base, to itself
            tuned = bytes(b ^ (i % 7) for i, b in enumerate(data[lo:hi]))
            out = bytearray(hi - lo)
            frame = encoding.encode_piece(tuned, itemsize, **{kind: got})
            encoding.decode_piece(frame, itemsize, memoryview(out))
            encoding.xor_into(memoryview(out), data[lo:hi])
            assert bytes(out) == tuned
        assert store.reads and set(store.reads) <= set(chunks)
        assert set(store.reads.values()) == {1}
        assert bases._held == {}  # nothing kept once every expected range was taken


def test_xor_against_planes_equals_xor_against_bytes() -> None:
    rng = np.random.default_rng(4)
    for itemsize in ITEMSIZES:
        data = rng.integers(0, 256, itemsize * 301, dtype=np.uint8).tobytes()
        base = rng.integers(0, 256, itemsize * 301, dtype=np.uint8).tobytes()
        by_bytes = encoding.encode_piece(data, itemsize, base)
        base_planes = encoding.split_planes(base, itemsize).copy()
        assert encoding.encode_piece(data, itemsize, base_planes=base_planes) == by_bytes
        assert roundtrip(data, itemsize, base) == data


# -- in a repository ---------------------------------------------------------------------------
SHAPES = {"a.weight": (64, 48), "b.weight": (33,), "c.bias": (0,), "d.weight": (5, 7)}


def bf16_models(tmp: Path) -> tuple[Path, Path, Path]:
    """A bf16 base and two fine-tunes (base + a small delta), random normal weights, plus an
    fp32 tensor with NaN payloads and signed zeros and an odd-sized int8 tensor."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    base = {
        n: torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 0.02)
        for n, s in SHAPES.items()
    }
    special = np.array([0.0, -0.0, 1.5, -2.0] * 8, dtype=np.float32)
    special.view(np.uint32)[3] = 0x7FC01234  # a NaN with a payload
    out = []
    for i, scale in enumerate((0.0, 0.003, 0.01)):
        tensors = {
            n: (
                t + torch.from_numpy(rng.standard_normal(t.shape).astype(np.float32)) * 0.02 * scale
            ).to(torch.bfloat16)
            for n, t in base.items()
        }
        tensors["e.special"] = torch.from_numpy(special.copy())
        tensors["f.int8"] = torch.from_numpy(rng.integers(-128, 128, 101, dtype=np.int8))
        path = tmp / f"model{i}.safetensors"
        save_file(tensors, str(path))
        out.append(path)
    return out[0], out[1], out[2]


def build(repo: Path, models: tuple[Path, Path, Path], enc: str, chunk: str = "1000") -> list[str]:
    base, one, two = models
    crdt(repo, "chunk-size", chunk)
    crdt(repo, "set-base", str(base), "--allow-nonfinite", "--encoding", enc, "-q")
    ids = [
        json.loads(crdt(repo, "set-base", str(base), "--json", "--allow-nonfinite").stdout)["id"]
    ]
    for m in (one, two):
        out = crdt(
            repo, "add-contribution", str(m), "--allow-nonfinite", "--encoding", enc, "--json"
        )
        ids.append(json.loads(out.stdout)["id"])
    crdt(repo, "strategy", "task_arithmetic")
    git(repo, "commit", "-q", "-m", f"{enc} set")
    return ids


def merged(repo: Path) -> bytes:
    crdt(repo, "resolve", "-q")
    return (repo / "merged" / "model.safetensors").read_bytes()


def test_merged_bytes_and_ids_do_not_depend_on_the_encoding(tmp_path: Path) -> None:
    models = bf16_models(tmp_path)
    results = {}
    for enc in encoding.ENCODINGS:
        repo = fresh_repo(tmp_path / enc)
        ids = build(repo, models, enc, chunk="1000" if enc != "planes-zstd" else "4096")
        results[enc] = (ids, merged(repo))
        assert crdt(repo, "verify", "--full", check=False).returncode == 0
    raw_ids, raw_bytes = results["raw"]
    for enc, (ids, data) in results.items():
        assert ids == raw_ids, enc
        assert data == raw_bytes, enc


@pytest.mark.parametrize("xor", encoding.XOR_ENCODINGS)
def test_encoded_chunks_are_recorded_and_read_back_exactly(tmp_path: Path, xor: str) -> None:
    models = bf16_models(tmp_path)
    repo = fresh_repo(tmp_path / "r")
    ids = build(repo, models, xor)
    from git_crdt_merge.replicated.encoding import read_tensor_into
    from git_crdt_merge.replicated.formats import discover, iter_tensors

    store = ObjectStore(repo)
    base = Descriptor.from_json(json.loads(store.get(descriptor_address(repo, ids[0]))))
    tuned = Descriptor.from_json(json.loads(store.get(descriptor_address(repo, ids[2]))))
    assert base.tensors["a.weight"].encoding.name == "planes-zstd"  # type: ignore[union-attr]
    enc = tuned.tensors["a.weight"].encoding
    assert enc is not None and enc.name == xor and enc.base is not None
    assert enc.base.chunks == base.tensors["a.weight"].chunks
    assert enc.base.blake3 == base.tensors["a.weight"].blake3
    assert len(tuned.tensors["a.weight"].chunks) == 7  # 6144 bytes in pieces of 1000 -> 1000
    for t in iter_tensors(discover(models[2])):
        entry = tuned.tensors[t.name]
        out = bytearray(entry.nbytes)
        read_tensor_into(store, entry, memoryview(out))
        assert bytes(out) == bytes(t.data), t.name


def test_the_encoding_defaults_to_this_clones_git_config(tmp_path: Path) -> None:
    models = bf16_models(tmp_path)
    repo = fresh_repo(tmp_path / "r")
    git(repo, "config", "crdt.encoding", "planes-zstd")
    out = json.loads(
        crdt(repo, "add-contribution", str(models[1]), "--json", "--allow-nonfinite").stdout
    )
    desc = json.loads(ObjectStore(repo).get(descriptor_address(repo, out["id"])))
    assert {e["encoding"]["name"] for e in desc["tensors"].values()} == {"planes-zstd"}
    shown = json.loads(crdt(repo, "show", out["name"], "--json").stdout)
    assert {t["encoding"] for t in shown["tensors"]} == {"planes-zstd"}
    git(repo, "config", "crdt.encoding", "gzip")
    bad = crdt(repo, "add-contribution", str(models[2]), "--allow-nonfinite", check=False)
    assert bad.returncode != 0 and "unknown encoding 'gzip'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("xor", encoding.XOR_ENCODINGS)
def test_a_compressed_repository_clones_and_resolves_to_the_raw_bytes(
    tmp_path: Path, xor: str
) -> None:
    """Add with compression, push to a bare remote over file://, clone with git crdt clone,
    resolve: the same merged bytes as a raw repository of the same models."""
    models = bf16_models(tmp_path)
    raw = fresh_repo(tmp_path / "raw")
    build(raw, models, "raw")
    src = fresh_repo(tmp_path / "src")
    build(src, models, xor)
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    git(src, "push", "-q", f"file://{remote}", "HEAD:main")
    crdt(tmp_path, "clone", f"file://{remote}", str(tmp_path / "clone"))
    clone = tmp_path / "clone"
    want = merged(raw)
    assert merged(clone) == want
    assert crdt(clone, "verify", "--full", check=False).returncode == 0
    # the base changes later: contributions still decode against the bytes they name
    crdt(clone, "set-base", str(models[2]), "--allow-nonfinite", "-q")
    crdt(raw, "set-base", str(models[2]), "--allow-nonfinite", "-q")
    assert merged(clone) == merged(raw)


def forge(repo: Path, cid: str, edit: Callable[[dict[str, Any], ObjectStore], None]) -> None:
    """As a hostile peer: the descriptor of ``cid`` edited by ``edit`` (storage fields only,
    so the id stays), stored, and put in place of the honest one (observed remove + add)."""
    from git_crdt_merge.replicated.manifest import add_record, remove_record
    from git_crdt_merge.replicated.repo import Repo, new_tag

    store = ObjectStore(repo)
    desc = json.loads(store.get(descriptor_address(repo, cid)))
    edit(desc, store)
    address = store.put(canonical_json(desc).encode())
    store.flush()
    r = Repo.open(repo)
    m = r.read_manifest()
    tags = [a.tag for a in m.visible_adds() if a.fields["id"] == cid]
    name = next(n for c, n in m.visible_contributions() if c == cid)
    recs = [remove_record(new_tag(), tags), add_record(new_tag(), cid, name, desc=address)]
    r.write_manifest(m.with_records(recs))
    git(repo, "commit", "-q", "--no-verify", "-am", "forged")


def one_line_error(repo: Path, *args: str) -> str:
    proc = crdt(repo, *args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("git-crdt: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_chunks_that_decode_to_other_content_are_refused_in_one_line(tmp_path: Path) -> None:
    models = bf16_models(tmp_path)
    repo = fresh_repo(tmp_path / "r")
    ids = build(repo, models, "xor-planes-zstd", chunk="100000")

    def swap_base(desc: dict[str, Any], store: ObjectStore) -> None:
        # XOR against other stored bytes of the same size: the contribution's own chunks
        enc = desc["tensors"]["a.weight"]["encoding"]
        enc["base"] = {
            "blake3": "0" * 64,
            "chunks": desc["tensors"]["a.weight"]["chunks"],
            "encoding": {"name": "planes-zstd", "sizes": enc["sizes"]},
        }

    forge(repo, ids[1], swap_base)
    line = one_line_error(repo, "resolve")
    assert "content hash" in line
    assert crdt(repo, "verify", check=False).returncode == 0  # fast checks: sizes are sane
    assert crdt(repo, "verify", "--full", check=False).returncode == 1


def test_a_zstd_bomb_under_a_small_claimed_size_is_refused_with_bounded_memory(
    tmp_path: Path,
) -> None:
    models = bf16_models(tmp_path)
    repo = fresh_repo(tmp_path / "r")
    ids = build(repo, models, "planes-zstd", chunk="100000")

    def bomb(zeros: int) -> Callable[[dict[str, Any], ObjectStore], None]:
        def edit(desc: dict[str, Any], store: ObjectStore) -> None:
            frame = zstandard.ZstdCompressor(level=19).compress(bytes(zeros))
            entry = desc["tensors"]["a.weight"]
            entry["chunks"] = [store.put(frame)]
            entry["encoding"] = {"name": "planes-zstd", "sizes": [entry["bytes"]]}

        return edit

    # 1 GiB of zeros (32 KiB encoded): larger than any encoding of the 6144 bytes it claims,
    # refused from the object's header before anything is read
    forge(repo, ids[1], bomb(2**30))
    assert "more than 6144 can encode to" in one_line_error(repo, "resolve")
    # 16 MiB of zeros (under 1 KiB encoded): refused from the frame header, before zstd
    # allocates anything
    forge(repo, ids[1], bomb(2**24))
    line = one_line_error(repo, "resolve")
    assert "the zstd frame declares 16777216 bytes, the descriptor 6144" in line
