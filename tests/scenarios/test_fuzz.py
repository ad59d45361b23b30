"""Fuzzing the manifest parser, the merge driver and repair with random bytes and random
mutations of valid manifests: never a traceback (only ManifestError), never a dropped valid
record."""

from __future__ import annotations

from pathlib import Path

import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_crdt_merge.errors import ManifestError
from git_crdt_merge.integration import driver
from git_crdt_merge.replicated.manifest import (
    Manifest,
    Record,
    add_record,
    remove_record,
    set_record,
)
from git_crdt_merge.replicated.repair import repair_bytes

IDS = [blake3.blake3(bytes([i])).hexdigest() for i in range(5)]
REPLICAS = ["a" * 16, "b" * 16, "0123456789abcdef"]
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def states(draw: st.DrawFn, tag_base: int = 0) -> list[Record]:
    """A valid state: adds with unique tags, removes of some of them, register writes."""
    n = draw(st.integers(0, 5))
    adds = [
        add_record(
            f"{tag_base + i + 1:032x}",
            draw(st.sampled_from(IDS)),
            draw(st.sampled_from(["alpha", "beta", "é ü", "名前", "x y"])),
            draw(st.one_of(st.none(), st.text(max_size=20))),
        )
        for i in range(n)
    ]
    recs = list(adds)
    if adds and draw(st.booleans()):
        observed = draw(st.lists(st.sampled_from([a.tag for a in adds]), min_size=1, unique=True))
        recs.append(remove_record(f"{tag_base + 900:032x}", observed))
    for _ in range(draw(st.integers(0, 2))):
        key, value = draw(
            st.sampled_from(
                [
                    ("output", "out"),
                    ("base", IDS[0]),
                    ("base", None),
                    ("strategy", {"name": "ties", "params": {"density": 0.5}}),
                ]
            )
        )
        recs.append(
            set_record(key, value, draw(st.integers(1, 5)), draw(st.sampled_from(REPLICAS)))
        )
    return recs


def serialize(recs: list[Record]) -> bytes:
    return Manifest({}).with_records(recs).serialize()


MUTATIONS = ["flip", "delete", "insert", "duplicate", "swap", "truncate", "marker", "crlf"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(valid manifest bytes, the same bytes after one random mutation)."""
    data = serialize(draw(states()))
    out = bytearray(data)
    kind = draw(st.sampled_from(MUTATIONS))
    pos = draw(st.integers(0, max(len(out) - 1, 0)))
    if kind == "flip" and out:
        out[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "delete" and out:
        del out[pos : pos + draw(st.integers(1, 8))]
    elif kind == "insert":
        out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    elif kind in ("duplicate", "swap") and data:
        lines = data.splitlines(keepends=True)
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
        if kind == "duplicate":
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        out = bytearray(b"".join(lines))
    elif kind == "truncate":
        del out[pos:]
    elif kind == "marker":
        out[pos:pos] = b"\n=======\n"
    elif kind == "crlf":
        out = bytearray(bytes(out).replace(b"\n", b"\r\n"))
    return data, bytes(out)


def parse_or_error(data: bytes) -> Manifest | None:
    try:
        m = Manifest.parse(data)
    except ManifestError:
        return None
    assert m.serialize() == data  # whatever parses was canonical already
    return m


@SETTINGS
@given(st.binary(max_size=400))
def test_parser_on_random_bytes_raises_only_manifest_error(data: bytes) -> None:
    parse_or_error(data)


@SETTINGS
@given(mutated())
def test_parser_on_mutated_manifests_raises_only_manifest_error(pair: tuple[bytes, bytes]) -> None:
    parse_or_error(pair[1])


def run_driver(tmp: Path, ours: bytes, theirs: bytes) -> tuple[int, bytes]:
    (tmp / "O").write_bytes(b"")
    (tmp / "A").write_bytes(ours)
    (tmp / "B").write_bytes(theirs)
    code = driver.main([str(tmp / "O"), str(tmp / "A"), str(tmp / "B"), "7", ".crdt/manifest"])
    return code, (tmp / "A").read_bytes()


def valid_lines(data: bytes) -> set[bytes]:
    m = parse_or_error(data)
    return set() if m is None else set(m.serialize().splitlines())


@SETTINGS
@given(mutated(), states(tag_base=1000), st.booleans())
def test_driver_never_crashes_nor_drops_a_valid_record(
    tmp_path: Path, pair: tuple[bytes, bytes], other: list[Record], swap: bool
) -> None:
    theirs = serialize(other)
    ours = pair[1]
    if swap:
        ours, theirs = theirs, ours
    code, out = run_driver(tmp_path, ours, theirs)
    assert code in (0, 1)
    if code == 0:
        merged = Manifest.parse(out)
        assert valid_lines(ours) | valid_lines(theirs) <= set(merged.serialize().splitlines())
    else:
        # a conflict keeps both sides verbatim, so nothing is lost; repair recovers them
        assert ours.rstrip(b"\n") in out and theirs.rstrip(b"\n") in out
        try:
            repaired = repair_bytes(out, drop_invalid=True).manifest
        except ManifestError:
            return  # a side reuses a tag for two records: repair refuses, naming it
        kept = set(repaired.serialize().splitlines())
        assert set(theirs.splitlines() if not swap else ours.splitlines()) <= kept


@SETTINGS
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_driver_on_random_bytes_exits_zero_or_one_and_keeps_both_sides(
    tmp_path: Path, ours: bytes, theirs: bytes
) -> None:
    code, out = run_driver(tmp_path, ours, theirs)
    assert code in (0, 1)
    if code == 1:
        assert ours.rstrip(b"\n") in out and theirs.rstrip(b"\n") in out


@SETTINGS
@given(st.binary(max_size=400))
def test_repair_on_random_bytes_raises_only_manifest_error(data: bytes) -> None:
    try:
        result = repair_bytes(data, drop_invalid=True)
    except ManifestError:
        return
    Manifest.parse(result.manifest.serialize())
