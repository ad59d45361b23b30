"""Layer 1 manifest: the OR-Set + LWW-register CRDT, its canonical bytes and strict parser."""

from __future__ import annotations

import json
import random

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_crdt_merge.errors import ManifestError
from git_crdt_merge.replicated.manifest import (
    Manifest,
    Record,
    add_record,
    canonical_json,
    join,
    merkle_root,
    remove_record,
    set_record,
)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IDS = [blake3.blake3(bytes([i])).hexdigest() for i in range(4)]
NAMES = ["alpha", "beta", "gamma", "é-model", "模型"]
REPLICAS = ["0" * 16, "f" * 16, "0123456789abcdef"]


def tag(i: int) -> str:
    return f"{i:032x}"


def state(records: list[Record]) -> Manifest:
    return Manifest({}).with_records(records)


@st.composite
def universes(draw: st.DrawFn) -> tuple[list[Record], list[Record], list[Record]]:
    """A pool of mutually consistent records (tags unique across the pool)."""
    adds = [
        add_record(tag(i + 1), draw(st.sampled_from(IDS)), draw(st.sampled_from(NAMES)))
        for i in range(draw(st.integers(0, 8)))
    ]
    removes = []
    if adds:
        for j in range(draw(st.integers(0, 4))):
            obs = draw(st.lists(st.sampled_from([a.tag for a in adds]), min_size=1, unique=True))
            removes.append(remove_record(tag(1000 + j), obs))
    sets = []
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(["strategy", "output"]))
        if key == "strategy":
            value: object = {
                "name": draw(st.sampled_from(["linear", "ties"])),
                "params": {"k": draw(st.integers(0, 3))},
            }
        else:
            value = draw(st.sampled_from(["merged", "out/a", "ü"]))
        # small clocks and few replicas so that ties on (clock, replica) happen often
        sets.append(
            set_record(key, value, draw(st.integers(1, 3)), draw(st.sampled_from(REPLICAS)))
        )
    return adds, removes, sets


def closed_subset(
    draw: st.DrawFn, pool: tuple[list[Record], list[Record], list[Record]]
) -> list[Record]:
    """A valid state drawn from the pool: every remove comes with the adds it observed."""
    adds, removes, sets = pool
    chosen = [r for r in adds + removes + sets if draw(st.booleans())]
    by_tag = {a.tag: a for a in adds}
    for r in list(chosen):
        if r.op == "remove":
            chosen += [by_tag[t] for t in r.fields["observed"]]
    return list({r.line: r for r in chosen}.values())


@st.composite
def states(draw: st.DrawFn, n: int) -> list[Manifest]:
    pool = draw(universes())
    return [state(closed_subset(draw, pool)) for _ in range(n)]


@st.composite
def record_lists(draw: st.DrawFn) -> list[Record]:
    pool = draw(universes())
    return closed_subset(draw, pool)


# -- the join is a semilattice -----------------------------------------------------------------
@PROPS
@given(states(2))
def test_join_is_commutative(ms: list[Manifest]) -> None:
    a, b = ms
    assert join(a, b).serialize() == join(b, a).serialize()


@PROPS
@given(states(3))
def test_join_is_associative(ms: list[Manifest]) -> None:
    a, b, c = ms
    assert join(join(a, b), c).serialize() == join(a, join(b, c)).serialize()


@PROPS
@given(states(2))
def test_join_is_idempotent_and_absorbs_known_state(ms: list[Manifest]) -> None:
    a, b = ms
    assert join(a, a).serialize() == a.serialize()
    ab = join(a, b)
    assert join(ab, a).serialize() == ab.serialize()
    assert join(ab, b).serialize() == ab.serialize()


@PROPS
@given(states(2))
def test_join_is_the_sorted_union_of_lines(ms: list[Manifest]) -> None:
    a, b = ms
    lines = set(a.serialize().splitlines()) | set(b.serialize().splitlines())
    assert join(a, b).serialize() == b"".join(line + b"\n" for line in sorted(lines))


# -- derived state depends only on the record set -----------------------------------------------
def derived(m: Manifest) -> tuple[object, ...]:
    return (
        m.visible_contributions(),
        m.register("strategy"),
        m.register("output"),
        m.strategy(),
        m.output(),
        m.base(),
        m.merkle_root(),
        m.max_clock(),
    )


@PROPS
@given(record_lists(), st.randoms(use_true_random=False))
def test_derived_state_is_independent_of_insertion_order(
    records: list[Record], rnd: random.Random
) -> None:
    m = state(records)
    shuffled = list(records)
    rnd.shuffle(shuffled)
    m2 = state(shuffled)
    reparsed = Manifest.parse(m.serialize())
    assert m2.serialize() == m.serialize() == reparsed.serialize()
    assert derived(m2) == derived(m) == derived(reparsed)


@PROPS
@given(record_lists())
def test_visible_contributions_are_adds_not_observed_by_any_remove(records: list[Record]) -> None:
    m = state(records)
    removed = {t for r in records if r.op == "remove" for t in r.fields["observed"]}
    live = sorted(
        (r.fields["id"], r.tag, r.fields["name"])
        for r in records
        if r.op == "add" and r.tag not in removed
    )
    expected: dict[str, str] = {}
    for cid, _t, name in live:
        expected.setdefault(cid, name)  # the name on the smallest live tag
    assert m.visible_contributions() == sorted(expected.items())
    assert len({cid for cid, _ in m.visible_contributions()}) == len(m.visible_contributions())


@PROPS
@given(record_lists())
def test_register_value_is_the_greatest_plausible_clock_replica_hash(records: list[Record]) -> None:
    m = state(records)
    for key in ("strategy", "output"):
        writes = [r for r in records if r.op == "set" and r.fields["key"] == key]
        if not writes:
            assert m.register(key) is None
            continue
        # a clock above the number of register writes is implausible (docs/format.md)
        cap = sum(1 for r in m.records.values() if r.op == "set")
        best = max(
            writes,
            key=lambda r: (
                r.fields["clock"] <= cap,
                r.fields["clock"],
                r.fields["replica"],
                blake3.blake3(r.line.encode()).hexdigest(),
            ),
        )
        assert m.register(key) == best.fields["value"]


@PROPS
@given(record_lists())
def test_merkle_root_depends_only_on_visible_ids_and_config(records: list[Record]) -> None:
    m = state(records)
    # A state with only the visible adds (fresh tags) and the winning register writes.
    visible = [
        add_record(tag(5000 + i), cid, name)
        for i, (cid, name) in enumerate(m.visible_contributions())
    ]
    regs = [r for r in (m.register_record("strategy"), m.register_record("output")) if r]
    other = state(visible + regs)
    assert other.merkle_root() == m.merkle_root()
    ids = [cid for cid, _ in m.visible_contributions()]
    assert merkle_root(list(reversed(ids)), m.resolution_config()) == m.merkle_root()


def test_merkle_root_changes_with_the_visible_set_and_the_strategy() -> None:
    a = state([add_record(tag(1), IDS[0], "a")])
    b = state([add_record(tag(1), IDS[0], "a"), add_record(tag(2), IDS[1], "b")])
    c = a.with_records([set_record("strategy", {"name": "ties", "params": {}}, 1, REPLICAS[0])])
    roots = {Manifest({}).merkle_root(), a.merkle_root(), b.merkle_root(), c.merkle_root()}
    assert len(roots) == 4
    # Names and tags do not name the result: the same ids under other tags give the same root.
    a2 = state([add_record(tag(9), IDS[0], "renamed")])
    assert a2.merkle_root() == a.merkle_root()


# -- canonical bytes -----------------------------------------------------------------------------
@PROPS
@given(record_lists())
def test_serialize_is_canonical_and_parse_accepts_it_back(records: list[Record]) -> None:
    data = state(records).serialize()
    if records:
        assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1] if data else []
    assert lines == sorted(set(lines))
    for line in lines:
        obj = json.loads(line)
        assert canonical_json(obj).encode() == line
    again = Manifest.parse(data)
    assert again.serialize() == data
    assert set(again.records) == {r.line for r in records}


def test_empty_bytes_are_the_empty_state() -> None:
    m = Manifest.parse(b"")
    assert m.serialize() == b""
    assert m.visible_contributions() == []
    assert m.strategy() == {"name": "linear", "params": {}}
    assert m.output() == "merged"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.text(min_size=0, max_size=40), min_size=1, max_size=4))
def test_parse_either_round_trips_exactly_or_raises_manifest_error(lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    try:
        m = Manifest.parse(data)
    except ManifestError as exc:
        assert str(exc).startswith("manifest")
    else:
        assert m.serialize() == data


# -- strict validation ---------------------------------------------------------------------------
ADD1 = add_record(tag(1), IDS[0], "alpha").line
ADD2 = add_record(tag(2), IDS[1], "beta").line
ADD_UNI = add_record(tag(3), IDS[2], "é").line
FIRST, SECOND = sorted([ADD1, ADD2], key=str.encode)
SET1 = set_record("output", "out", 1, REPLICAS[0]).line


def unsorted_keys(line: str) -> str:
    obj = json.loads(line)
    return json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":"), ensure_ascii=False)


def body(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


BAD_ID = json.loads(ADD1) | {"id": IDS[0].upper()}
BAD_TAG = json.loads(ADD1) | {"tag": "zz" * 16}
UNKNOWN_OP = {"op": "rename", "tag": tag(7)}
UNKNOWN_FIELD = json.loads(ADD1) | {"color": "red"}

STRICT_CASES = [
    ("spaces", body(FIRST, SECOND.replace(",", ", ")), "manifest:2: not in canonical form"),
    ("unsorted keys", body(unsorted_keys(ADD1)), "manifest:1: not in canonical form"),
    (
        "escaped unicode",
        body(json.dumps(json.loads(ADD_UNI), sort_keys=True, separators=(",", ":"))),
        "manifest:1: not in canonical form",
    ),
    ("unsorted lines", body(SECOND, FIRST), "manifest:2: lines not sorted"),
    ("duplicate lines", body(FIRST, FIRST), "manifest:2: duplicate line"),
    ("bad hex id", body(canonical_json(BAD_ID)), "manifest:1: 'id' must be 64 lowercase hex"),
    ("bad hex tag", body(canonical_json(BAD_TAG)), "manifest:1: 'tag' must be 32 lowercase hex"),
    ("unknown op", body(canonical_json(UNKNOWN_OP)), "manifest:1: unknown record kind 'rename'"),
    ("unknown field", body(canonical_json(UNKNOWN_FIELD)), "manifest:1: unknown field 'color'"),
    ("NaN", body(SET1.replace('"clock":1', '"clock":NaN')), "manifest:1:"),
    ("invalid utf-8", body(FIRST) + b'{"id":"\xff\xfe"}\n', "manifest:2: not valid UTF-8"),
    (
        "conflict marker",
        b"<<<<<<< ours\n" + body(ADD1) + b"=======\n>>>>>>> theirs\n",
        "manifest:1: conflict marker",
    ),
    ("conflict marker inside", body(FIRST) + b"=======\n", "manifest:2: conflict marker"),
    ("blank line", body(FIRST, "", SECOND), "manifest:2: not JSON"),
    ("not an object", b"[1,2]\n", "manifest:1: not a JSON object"),
    (
        "remove observing an unknown tag",
        body(remove_record(tag(9), [tag(1)]).line),
        "observes unknown add tag " + tag(1),
    ),
    (
        "tag used twice",
        body(ADD1, remove_record(tag(1), [tag(1)]).line),
        "is used by two different records",
    ),
    ("CRLF", body(FIRST, SECOND).replace(b"\n", b"\r\n"), "manifest: contains a carriage return"),
    (
        "missing trailing newline",
        body(FIRST, SECOND)[:-1],
        "manifest: missing the trailing newline",
    ),
    (
        "unknown register",
        body(SET1.replace('"key":"output"', '"key":"colour"')),
        "manifest:1: unknown register 'colour'",
    ),
    (
        "clock zero",
        body(SET1.replace('"clock":1', '"clock":0')),
        "manifest:1: 'clock' must be a positive integer",
    ),
    (
        "output escapes the work tree",
        body(SET1.replace('"value":"out"', '"value":"../x"')),
        "manifest:1: register 'output'",
    ),
    (
        "name with a path separator",
        body(ADD1.replace('"alpha"', '"a/b"')),
        "manifest:1: name 'a/b' contains a path separator",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"), [c[1:] for c in STRICT_CASES], ids=[c[0] for c in STRICT_CASES]
)
def test_parse_rejects_non_canonical_or_invalid_input_naming_the_line(
    data: bytes, message: str
) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.parse(data)
    assert message in str(info.value)
    assert str(info.value).startswith("manifest")


def test_parse_error_names_the_given_source() -> None:
    with pytest.raises(ManifestError, match=r"^HEAD:\.crdt/manifest:2: duplicate line$"):
        Manifest.parse(body(FIRST, FIRST), "HEAD:.crdt/manifest")


def test_remove_observing_an_unknown_tag_error_names_its_line() -> None:
    with pytest.raises(ManifestError, match=r"^manifest:2: "):
        Manifest.parse(body(FIRST, remove_record(tag(9), [tag(8)]).line))


def test_parse_rejects_a_huge_integer_with_manifest_error() -> None:
    line = SET1.replace('"clock":1', '"clock":' + "1" * 5000)
    with pytest.raises(ManifestError, match=r"^manifest:1: "):
        Manifest.parse(body(line))


def test_parse_rejects_deeply_nested_json_with_manifest_error() -> None:
    with pytest.raises(ManifestError, match=r"^manifest:1: "):
        Manifest.parse(b"[" * 30000 + b"]" * 30000 + b"\n")


# -- observed-remove and last-writer-wins semantics -----------------------------------------------
def test_concurrent_add_with_a_new_tag_survives_a_remove() -> None:
    base = state([add_record(tag(1), IDS[0], "m")])
    remover = base.with_records([remove_record(tag(2), [tag(1)])])
    readder = base.with_records([add_record(tag(3), IDS[0], "m")])
    assert remover.visible_contributions() == []
    for merged in (join(remover, readder), join(readder, remover)):
        assert merged.visible_contributions() == [(IDS[0], "m")]
        assert [r.tag for r in merged.visible_adds()] == [tag(3)]


def test_remove_is_never_undone_by_rejoining_the_old_add() -> None:
    base = state([add_record(tag(1), IDS[0], "m")])
    removed = base.with_records([remove_record(tag(2), [tag(1)])])
    for merged in (join(removed, base), join(base, removed), join(join(base, removed), base)):
        assert merged.visible_contributions() == []


def test_same_contribution_under_two_tags_is_visible_once_with_the_smallest_tags_name() -> None:
    m = state([add_record(tag(5), IDS[0], "late"), add_record(tag(4), IDS[0], "early")])
    assert m.visible_contributions() == [(IDS[0], "early")]
    m2 = m.with_records([remove_record(tag(6), [tag(4)])])
    assert m2.visible_contributions() == [(IDS[0], "late")]


def test_visible_contributions_are_ordered_by_id_not_name() -> None:
    ids = sorted(IDS)
    m = state(
        [
            add_record(tag(1), ids[2], "a"),
            add_record(tag(2), ids[0], "z"),
            add_record(tag(3), ids[1], "m"),
        ]
    )
    assert [cid for cid, _ in m.visible_contributions()] == ids[:3]


def test_lww_register_greater_clock_wins() -> None:
    m = state([set_record("output", "old", 1, "f" * 16), set_record("output", "new", 2, "0" * 16)])
    assert m.output() == "new"
    assert m.max_clock() == 2


def test_lww_register_tie_on_clock_is_broken_by_replica() -> None:
    low = set_record("output", "from-low", 3, "0" * 16)
    high = set_record("output", "from-high", 3, "f" * 16)
    for order in ([low, high], [high, low]):
        assert state(order).output() == "from-high"
    assert join(state([low]), state([high])).output() == "from-high"
    assert join(state([high]), state([low])).output() == "from-high"


def test_lww_register_tie_on_clock_and_replica_is_broken_by_record_hash() -> None:
    writes = [set_record("output", f"v{i}", 3, "a" * 16) for i in range(6)]
    winner = max(writes, key=lambda r: blake3.blake3(r.line.encode()).hexdigest())
    for rot in range(len(writes)):
        m = state(writes[rot:] + writes[:rot])
        assert m.output() == winner.fields["value"]
        assert m.register_record("output") == winner


def test_record_constructors_reject_invalid_values() -> None:
    with pytest.raises(ManifestError):
        add_record(tag(1), "not-hex", "m")
    with pytest.raises(ManifestError):
        add_record(tag(1), IDS[0], "..")
    with pytest.raises(ManifestError):
        set_record("strategy", {"name": "Bad Name", "params": {}}, 1, REPLICAS[0])
    with pytest.raises(ManifestError):
        set_record("output", ".git/hooks", 1, REPLICAS[0])
    with pytest.raises(ManifestError):
        set_record("output", "x", 1, "short")


def test_record_constructors_reject_non_finite_numbers_with_manifest_error() -> None:
    with pytest.raises(ManifestError):
        set_record("strategy", {"name": "linear", "params": {"x": [float("nan")]}}, 1, REPLICAS[0])


def test_join_of_states_reusing_a_tag_for_different_records_is_rejected() -> None:
    a = state([add_record(tag(1), IDS[0], "a")])
    b = state([add_record(tag(1), IDS[1], "b")])
    with pytest.raises(ManifestError, match="used by two different records"):
        join(a, b)


def test_name_with_a_lone_surrogate_is_rejected_with_manifest_error() -> None:
    with pytest.raises(ManifestError):
        add_record(tag(1), IDS[0], "bad\udcff")
