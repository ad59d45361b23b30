"""replicated/lfs.py: the strict bounded parsers of what a pull brings (LFS pointers, slice
records, the storage mode) and the bounded reads of LFS objects."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from git_crdt_merge.errors import InputError, ManifestError, StoreError
from git_crdt_merge.replicated import lfs

OID = "0123456789abcdef" * 4


def test_pointer_round_trip_is_git_lfs_canonical_form() -> None:
    p = lfs.Pointer(OID, 12345)
    assert p.encode() == (
        b"version https://git-lfs.github.com/spec/v1\noid sha256:"
        + OID.encode()
        + b"\nsize 12345\n"
    )
    assert lfs.parse_pointer(p.encode()) == p


@pytest.mark.parametrize(
    "text",
    [
        b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize 012\n",  # leading zero
        b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize 12",  # no newline
        b"version https://git-lfs.github.com/spec/v1\r\noid sha256:%s\r\nsize 12\r\n",  # CRLF
        b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize -1\n",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize 12\nx 1\n",  # extra
        b"version https://git-lfs.github.com/spec/v1\next-0-foo sha256:%s\noid sha256:%s\n"
        b"size 12\n",  # an extension
        b"version https://hawser.github.com/spec/v1\noid sha256:%s\nsize 12\n",  # pre-release
        b"version https://git-lfs.github.com/spec/v1\noid sha1:%s\nsize 12\n",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize 99999999999999999999\n",
    ],
)
def test_pointer_parser_refuses_every_non_canonical_form(text: bytes) -> None:
    data = text.replace(b"%s", OID.encode())
    assert lfs.parse_pointer(data) is None


def test_pointer_parser_refuses_upper_case_and_short_oids_and_is_bounded() -> None:
    good = lfs.Pointer(OID, 1).encode()
    assert lfs.parse_pointer(good.replace(b"abcdef", b"ABCDEF")) is None
    assert lfs.parse_pointer(good.replace(OID.encode(), OID[:-1].encode())) is None
    assert lfs.parse_pointer(good + b" " * 1000) is None
    assert lfs.parse_pointer(good * 2) is None


@given(st.binary(max_size=300))
def test_pointer_and_slice_parsers_never_raise(data: bytes) -> None:
    lfs.parse_pointer(data)
    lfs.parse_slice(data)


def test_slice_round_trip_and_refusals() -> None:
    s = lfs.Slice(OID, 8, 65536)
    assert lfs.parse_slice(s.encode()) == s
    assert lfs.parse_slice(s.encode().replace(b"offset 8", b"offset 08")) is None
    assert lfs.parse_slice(s.encode() + b"\n") is None
    assert (
        lfs.parse_pointer(s.encode()) is None
        and lfs.parse_slice(lfs.Pointer(OID, 1).encode()) is None
    )


def test_storage_mode_accepts_only_the_two_words(tmp_path: Path) -> None:
    assert lfs.read_mode(tmp_path) == "git"  # no .crdt/storage
    (tmp_path / ".crdt").mkdir()
    (tmp_path / ".crdt" / "storage").write_bytes(b"lfs\n")
    assert lfs.read_mode(tmp_path) == "lfs"
    for bad in (b"LFS\n", b"s3\n", b"lfs\n" * 100, b"\xff"):
        (tmp_path / ".crdt" / "storage").write_bytes(bad)
        with pytest.raises(ManifestError):
            lfs.read_mode(tmp_path)
    (tmp_path / ".crdt" / "storage").unlink()
    os.symlink("/etc/hostname", tmp_path / ".crdt" / "storage")
    with pytest.raises(ManifestError, match="symbolic link"):
        lfs.read_mode(tmp_path)
    with pytest.raises(InputError):
        lfs.check_mode("s3")


def test_lfs_object_reads_are_bounded_and_size_checked(tmp_path: Path) -> None:
    media = tmp_path / "lfs"
    data = os.urandom(5000)
    pointer = lfs.Pointer(hashlib.sha256(data).hexdigest(), len(data))
    buf = bytearray(len(data))
    with pytest.raises(StoreError, match="not fetched"):
        lfs.read_object_into(media, pointer, memoryview(buf), "chunk")
    assert lfs.write_object(media, data, pointer) and not lfs.write_object(media, data, pointer)
    lfs.read_object_into(media, pointer, memoryview(buf), "chunk")
    assert bytes(buf) == data
    part = bytearray(100)
    lfs.read_object_into(media, pointer, memoryview(part), "chunk", offset=4000)
    assert bytes(part) == data[4000:4100]
    with pytest.raises(StoreError, match="outside"):
        lfs.read_object_into(media, pointer, memoryview(part), "chunk", offset=4950)
    # a pointer that claims another size than the file's: refused before any read
    liar = lfs.Pointer(pointer.oid, 10**9)
    with pytest.raises(StoreError, match="its pointer says"):
        lfs.read_object_into(media, liar, memoryview(bytearray(10)), "chunk")
    # an object that is a symbolic link is not followed
    path = lfs.object_file(media, pointer.oid)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(data)
    with pytest.raises(StoreError):
        lfs.read_object_into(media, pointer, memoryview(buf), "chunk")


def test_a_pointer_file_is_recognised(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(lfs.Pointer(OID, 5).encode())
    (tmp_path / "q").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert lfs.is_pointer_file(tmp_path / "p") and not lfs.is_pointer_file(tmp_path / "q")
