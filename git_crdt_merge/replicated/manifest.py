"""Layer 1: the manifest, an observed-remove set of contributions plus last-writer-wins registers.

The manifest (``.crdt/manifest``) is a grow-only set of immutable records, one canonical JSON
object per line (sorted keys, compact separators, UTF-8), lines sorted bytewise, no duplicates,
a trailing newline after every line.  The state *is* the set of lines, so the join of two states
is the sorted union of their lines: commutative, associative and idempotent by construction.

Record kinds (``op``):

``add``     ``{"desc": D, "id": C, "name": N, "op": "add", "tag": T}`` (optional ``"message"``):
            contribution ``C`` is in the set under the unique tag ``T``.  ``C`` is computed from
            the contribution's content (``descriptor.content_id``); ``D`` is the address (blake3)
            of the descriptor object that lists its chunks.  Records written before descriptor
            format 2 have no ``desc``: there the id is the descriptor's address.
``remove``  ``{"observed": [T1, ...], "op": "remove", "tag": T}``: removes the add tags it observed.
            A concurrent add of the same contribution (a new tag) survives.
``set``     ``{"clock": L, "key": K, "op": "set", "replica": R, "value": V}``: a register write.
            The register's value is the write with the greatest ``(clock, replica, record hash)``.
            ``base`` holds a contribution id (format 1) or ``{"desc": D, "id": C}``;
            ``chunk_size`` the repository's chunk size in bytes (a storage choice, outside the
            Merkle root); ``output_dtype`` the dtype of the merged floating tensors
            (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``, or null: each keeps
            its source's dtype), in the Merkle root only when not null.

Everything a replica derives (visible contributions, register values, Merkle root) is a pure
function of the record set.  This module imports neither torch nor git: the merge driver runs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from .. import FORMAT_VERSION
from ..bounded import json_depth
from ..errors import ManifestError
from ..vocabulary import OUTPUT_DTYPES

CRDT_DIR = ".crdt"
MANIFEST_PATH = f"{CRDT_DIR}/manifest"
MAX_LINE_BYTES = 64 * 1024
# A state larger than this is refused as a whole (every command parses the manifest, and a
# pulled one is hostile data): 100,000 records parse in about 2 s here.
MAX_RECORDS = 100_000
MAX_MANIFEST_BYTES = 64 * 1024**2
MAX_RECORD_DEPTH = 16  # a record is a few levels deep (per-contribution parameter mappings)
MAX_NAME_CHARS = 200
TAG_RE = re.compile(r"[0-9a-f]{32}\Z")
ID_RE = re.compile(r"[0-9a-f]{64}\Z")
REPLICA_RE = re.compile(r"[0-9a-f]{16,64}\Z")
KEY_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}\Z")
# Register keys this format version knows, with the validator of their value.
REGISTER_KEYS = (
    "adapter_rank",
    "base",
    "chunk_size",
    "config_from",
    "output",
    "output_dtype",
    "strategy",
)
MAX_ADAPTER_RANK = 65536
MAX_CHUNK_SIZE = 1024**3  # store.MAX_OBJECT_BYTES (this module imports no store)
DEFAULT_STRATEGY: dict[str, Any] = {"name": "linear", "params": {}}
DEFAULT_OUTPUT = "merged"


def canonical_json(obj: Any) -> str:
    """The one serialisation of a JSON value: sorted keys, no spaces, raw UTF-8."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def check_name(name: str, what: str = "name") -> str:
    """A display name: printable, no path separators or ``..``, at most 200 characters."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{what} is not valid UTF-8") from None
    if not name or len(name) > MAX_NAME_CHARS:
        raise ManifestError(f"{what} must be 1 to {MAX_NAME_CHARS} characters, got {len(name)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ManifestError(f"{what} {name!r} contains a control character")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name:
        raise ManifestError(f"{what} {name!r} contains a path separator or '..'")
    if name != name.strip():
        raise ManifestError(f"{what} {name!r} has leading or trailing spaces")
    return name


# Characters an output path may not hold: control characters (a newline would add a line to
# .git/info/exclude), and those that git's pattern syntax reads (``*?[]!#\``).
_OUTPUT_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f*?\[\]!#\\]")


def _check_output_path(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ManifestError("register 'output' must be a non-empty relative path")
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in value:
        raise ManifestError(f"register 'output' {value!r} must be a plain relative path")
    if len(value) > 1024 or _OUTPUT_BAD.search(value):
        raise ManifestError(
            f"register 'output' {value[:64]!r} holds a control or pattern character, or is "
            "longer than 1024 characters"
        )
    for p in parts:
        if p != p.strip() or len(p.encode("utf-8", "surrogatepass")) > 255:
            raise ManifestError(f"register 'output' {value!r}: {p!r} is not a plain name")
        if p.casefold() in (".git", ".crdt"):  # at any depth: a nested repository's .git too
            raise ManifestError(f"register 'output' {value!r} may not point into .git or .crdt")


def _check_register_value(key: str, value: Any) -> None:
    if key == "base":
        if value is None or (isinstance(value, str) and ID_RE.match(value)):
            return
        if not (
            isinstance(value, dict)
            and set(value) == {"desc", "id"}
            and all(isinstance(v, str) and ID_RE.match(v) for v in value.values())
        ):
            raise ManifestError(
                'register \'base\' must be a contribution id, {"desc": ..., "id": ...} or null'
            )
    elif key == "chunk_size":
        if not _is_int(value) or not 0 < value <= MAX_CHUNK_SIZE:
            raise ManifestError(f"register 'chunk_size' must be 1 to {MAX_CHUNK_SIZE} bytes")
    elif key == "output":
        _check_output_path(value)
    elif key == "config_from":
        if value is not None and not (isinstance(value, str) and ID_RE.match(value)):
            raise ManifestError("register 'config_from' must be a contribution id or null")
    elif key == "adapter_rank":
        if value is not None and (not _is_int(value) or not 0 < value <= MAX_ADAPTER_RANK):
            raise ManifestError(f"register 'adapter_rank' must be 1 to {MAX_ADAPTER_RANK} or null")
    elif key == "output_dtype":
        if value is not None and value not in OUTPUT_DTYPES:
            raise ManifestError(
                f"register 'output_dtype' must be one of {', '.join(OUTPUT_DTYPES)} or null"
            )
    elif key == "strategy":
        if not isinstance(value, dict) or set(value) != {"name", "params"}:
            raise ManifestError('register \'strategy\' must be {"name": ..., "params": {...}}')
        if not isinstance(value["name"], str) or not KEY_RE.match(value["name"]):
            raise ManifestError(f"strategy name {value['name']!r} is not a valid identifier")
        if not isinstance(value["params"], dict):
            raise ManifestError("strategy params must be an object")


@dataclass(frozen=True)
class Record:
    """One parsed, validated manifest line.  ``line`` is its canonical text (no newline)."""

    op: str
    line: str
    fields: Mapping[str, Any]

    @property
    def tag(self) -> str:
        return str(self.fields["tag"])

    @property
    def record_hash(self) -> str:
        return blake3.blake3(self.line.encode()).hexdigest()


def _require(obj: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    missing = required - obj.keys()
    if missing:
        raise ManifestError(f"missing field {sorted(missing)[0]!r}")
    extra = obj.keys() - allowed
    if extra:
        raise ManifestError(f"unknown field {sorted(extra)[0]!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(line: str) -> Record:
    """Parse and validate one line (without its newline).  Raises ManifestError with the reason."""
    if len(line.encode()) > MAX_LINE_BYTES:
        raise ManifestError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # also: digit limit, nesting depth
        raise ManifestError(f"not JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(obj, dict):
        raise ManifestError("not a JSON object")
    if json_depth(obj) > MAX_RECORD_DEPTH:
        raise ManifestError(f"nested deeper than {MAX_RECORD_DEPTH} levels")
    op = obj.get("op")
    if op == "add":
        _require(obj, {"op", "tag", "id", "name", "message", "desc"}, {"op", "tag", "id", "name"})
        if not isinstance(obj["id"], str) or not ID_RE.match(obj["id"]):
            raise ManifestError("'id' must be 64 lowercase hex digits (a blake3 hash)")
        if "desc" in obj and not (isinstance(obj["desc"], str) and ID_RE.match(obj["desc"])):
            raise ManifestError("'desc' must be 64 lowercase hex digits (a blake3 hash)")
        if not isinstance(obj["name"], str):
            raise ManifestError("'name' must be a string")
        check_name(obj["name"])
        if "message" in obj and (not isinstance(obj["message"], str) or len(obj["message"]) > 4096):
            raise ManifestError("'message' must be a string of at most 4096 characters")
    elif op == "remove":
        _require(obj, {"op", "tag", "observed"}, {"op", "tag", "observed"})
        obs = obj["observed"]
        if not isinstance(obs, list) or not obs:
            raise ManifestError("'observed' must be a non-empty list of tags")
        if not all(isinstance(t, str) and TAG_RE.match(t) for t in obs):
            raise ManifestError("'observed' holds a malformed tag")
        if obs != sorted(set(obs)):
            raise ManifestError("'observed' must be sorted and without duplicates")
    elif op == "set":
        _require(
            obj,
            {"op", "key", "value", "clock", "replica"},
            {"op", "key", "value", "clock", "replica"},
        )
        if not isinstance(obj["key"], str) or obj["key"] not in REGISTER_KEYS:
            raise ManifestError(f"unknown register {obj['key']!r}")
        if not _is_int(obj["clock"]) or not 0 < obj["clock"] < 2**53:
            raise ManifestError("'clock' must be a positive integer")
        if not isinstance(obj["replica"], str) or not REPLICA_RE.match(obj["replica"]):
            raise ManifestError("'replica' must be 16 to 64 lowercase hex digits")
        _check_register_value(obj["key"], obj["value"])
    else:
        raise ManifestError(f"unknown record kind {op!r} (written by a newer git-crdt?)")
    if op != "set" and not (isinstance(obj["tag"], str) and TAG_RE.match(obj["tag"])):
        raise ManifestError("'tag' must be 32 lowercase hex digits")
    try:
        canon = canonical_json(obj)
    except ValueError:
        raise ManifestError("NaN or Infinity is not allowed") from None
    if canon != line:
        raise ManifestError("not in canonical form (sorted keys, compact separators, raw UTF-8)")
    return Record(op=op, line=line, fields=obj)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest state: records keyed by their canonical line."""

    records: Mapping[str, Record] = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes, source: str = "manifest") -> Manifest:
        """Parse manifest bytes strictly: every line valid and canonical, sorted, unique.

        Errors name the source and the 1-based line number.
        """
        if not data:
            return cls({})
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{source}: larger than the limit of {MAX_MANIFEST_BYTES} bytes")
        if data.count(b"\n") > MAX_RECORDS:
            raise ManifestError(f"{source}: more than {MAX_RECORDS} records")
        if b"\r" in data:
            raise ManifestError(f"{source}: contains a carriage return (CRLF line endings?)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line_no = data[: exc.start].count(b"\n") + 1
            raise ManifestError(f"{source}:{line_no}: not valid UTF-8") from None
        if not text.endswith("\n"):
            raise ManifestError(f"{source}: missing the trailing newline")
        lines = text[:-1].split("\n")
        records: dict[str, Record] = {}
        prev: bytes | None = None
        for no, line in enumerate(lines, 1):
            if line.startswith(("<<<<<<<", "=======", ">>>>>>>", "|||||||")):
                raise ManifestError(
                    f"{source}:{no}: conflict marker: run 'git crdt install' and redo the merge,"
                    " or 'git crdt repair'"
                )
            try:
                rec = parse_record(line)
            except ManifestError as exc:
                raise ManifestError(f"{source}:{no}: {exc}") from None
            raw = line.encode()
            if prev is not None and raw <= prev:
                why = "duplicate line" if raw == prev else "lines not sorted"
                raise ManifestError(f"{source}:{no}: {why}")
            prev = raw
            records[line] = rec
        state = cls(records)
        state._check_consistency(source)
        return state

    def _check_consistency(self, source: str) -> None:
        """A state is self-contained: tags unique, removes observe only tags present."""
        # Line numbers are positions in the canonical (sorted) order, i.e. in the file.
        ordered = sorted(self.records.values(), key=lambda r: r.line.encode())
        add_tags: set[str] = set()
        tag_line: dict[str, int] = {}
        for no, rec in enumerate(ordered, 1):
            if rec.op == "set":
                continue
            if rec.tag in tag_line:
                raise ManifestError(
                    f"{source}:{no}: tag {rec.tag} is used by two different records "
                    f"(also line {tag_line[rec.tag]})"
                )
            tag_line[rec.tag] = no
            if rec.op == "add":
                add_tags.add(rec.tag)
        for no, rec in enumerate(ordered, 1):
            if rec.op == "remove":
                unknown = [t for t in rec.fields["observed"] if t not in add_tags]
                if unknown:
                    raise ManifestError(
                        f"{source}:{no}: remove observes unknown add tag {unknown[0]}"
                    )

    def serialize(self) -> bytes:
        """Canonical bytes: sorted lines, each followed by a newline."""
        lines = sorted(line.encode() for line in self.records)
        return b"".join(line + b"\n" for line in lines)

    def with_records(self, new: Iterable[Record]) -> Manifest:
        merged = dict(self.records)
        for rec in new:
            merged[rec.line] = rec
        state = Manifest(merged)
        state._check_consistency("manifest")
        return state

    # -- derived state (pure functions of the record set) ----------------------------------
    def adds(self) -> list[Record]:
        return [r for r in self.records.values() if r.op == "add"]

    def removed_tags(self) -> set[str]:
        out: set[str] = set()
        for r in self.records.values():
            if r.op == "remove":
                out.update(r.fields["observed"])
        return out

    def visible_adds(self) -> list[Record]:
        """Add records no remove has observed, sorted by (contribution id, tag)."""
        removed = self.removed_tags()
        live = [r for r in self.adds() if r.tag not in removed]
        return sorted(live, key=lambda r: (r.fields["id"], r.tag))

    def visible_contributions(self) -> list[tuple[str, str]]:
        """(id, name) of every visible contribution, in canonical order (by id).

        A contribution added under several tags is visible once; its name is the one on its
        smallest live tag, so every replica shows the same name.
        """
        seen: dict[str, str] = {}
        for r in self.visible_adds():
            seen.setdefault(r.fields["id"], r.fields["name"])
        return sorted(seen.items())

    def clock_cap(self) -> int:
        """The largest clock a write in this state can honestly have: the number of register
        writes (each write's clock is one more than the greatest it saw, and a state keeps
        every record it saw, so an honest state with n writes has no clock above n)."""
        return sum(1 for r in self.records.values() if r.op == "set")

    def plausible(self, rec: Record) -> bool:
        """Whether a write's clock is within :meth:`clock_cap`.

        A pulled record can carry any clock up to 2^53 - 1; taken at face value it would pin
        the register forever (no later write could have a greater clock).  An implausible
        write ranks below every plausible one, so the next honest write wins.  A pure
        function of the record set, so every replica picks the same value."""
        return int(rec.fields["clock"]) <= self.clock_cap()

    def register_record(self, key: str) -> Record | None:
        """The winning write: greatest (plausible, clock, replica, record hash)."""
        cap = self.clock_cap()
        best: Record | None = None
        best_key: tuple[bool, int, str, str] | None = None
        for r in self.records.values():
            if r.op == "set" and r.fields["key"] == key:
                clock = int(r.fields["clock"])
                k = (clock <= cap, clock, r.fields["replica"], r.record_hash)
                if best_key is None or k > best_key:
                    best, best_key = r, k
        return best

    def register(self, key: str, default: Any = None) -> Any:
        rec = self.register_record(key)
        return default if rec is None else rec.fields["value"]

    def max_clock(self) -> int:
        """The greatest plausible clock: a new write takes this plus one, which the cap of
        the state with that write admits, so it is plausible and wins (registers stay
        writable)."""
        cap = self.clock_cap()
        clocks = [int(r.fields["clock"]) for r in self.records.values() if r.op == "set"]
        return max((c for c in clocks if c <= cap), default=0)

    def write_register(self, key: str, value: Any, replica: str) -> Manifest:
        """This state plus a write of ``value`` to register ``key`` that wins.

        The clock is one more than the greatest plausible clock, which beats every record
        whatever clock it claims (:meth:`plausible`); a pulled record with exactly that clock
        and a greater replica id becomes plausible with the write and ties it, so write again
        (each write raises the cap by one).  Registers therefore stay writable."""
        state = self
        for _ in range(8):
            rec = set_record(key, value, state.max_clock() + 1, replica)
            state = state.with_records([rec])
            if state.register_record(key) == rec:
                return state
        raise ManifestError(
            f"register {key!r} could not be written over the records that claim greater "
            "clocks; run 'git crdt log' to see who wrote them"
        )

    def strategy(self) -> dict[str, Any]:
        return dict(self.register("strategy", DEFAULT_STRATEGY))

    def base(self) -> str | None:
        """The base's contribution id (None: no base)."""
        value = self.register("base")
        if isinstance(value, dict):
            return str(value["id"])
        return value if isinstance(value, str) else None

    def output_dtype(self) -> str | None:
        """The dtype of the merged floating tensors (None: each keeps its source's dtype)."""
        value = self.register("output_dtype")
        return value if isinstance(value, str) else None

    def chunk_size(self) -> int | None:
        """The repository's chunk size (None: not set, the tool's default applies)."""
        value = self.register("chunk_size")
        return value if isinstance(value, int) else None

    def descriptors_of(self, contribution_id: str) -> list[str]:
        """Addresses of every descriptor recorded for ``contribution_id`` (add records and
        base writes), the preferred one first: that of its smallest live add tag, else the
        current base's, else the smallest address.  Several exist when the same content was
        stored twice (e.g. with two chunk sizes); all of them describe the same bytes."""
        removed = self.removed_tags()
        adds = sorted(
            (r for r in self.adds() if r.fields["id"] == contribution_id),
            key=lambda r: (r.tag in removed, r.tag),
        )
        found = [str(r.fields.get("desc", contribution_id)) for r in adds if r.tag not in removed]
        current = self.register("base")
        if isinstance(current, dict) and current["id"] == contribution_id:
            found.append(str(current["desc"]))
        elif current == contribution_id:
            found.append(contribution_id)
        others = {str(r.fields.get("desc", contribution_id)) for r in adds}
        for r in self.records.values():
            if r.op == "set" and r.fields["key"] == "base":
                value = r.fields["value"]
                if isinstance(value, dict) and value["id"] == contribution_id:
                    others.add(str(value["desc"]))
                elif value == contribution_id:
                    others.add(contribution_id)
        return list(dict.fromkeys(found + sorted(others)))

    def descriptor_address(self, contribution_id: str) -> str:
        """The descriptor to read for ``contribution_id`` (see :meth:`descriptors_of`)."""
        found = self.descriptors_of(contribution_id)
        return found[0] if found else contribution_id

    def output(self) -> str:
        return str(self.register("output", DEFAULT_OUTPUT))

    def config_from(self) -> str | None:
        """The contribution whose config and tokenizer the output takes (None: the rule of
        docs/format.md, base first)."""
        value = self.register("config_from")
        return value if isinstance(value, str) else None

    def adapter_rank(self) -> int | None:
        """Write LoRA merges as an adapter of this rank (None: full weights)."""
        value = self.register("adapter_rank")
        return value if isinstance(value, int) else None

    def resolution_config(self) -> dict[str, Any]:
        """What besides the set decides the merged model: one Merkle leaf."""
        strategy = self.strategy()
        config: dict[str, Any] = {
            "base": self.base(),
            "format": FORMAT_VERSION,
            "params": strategy["params"],
            "strategy": strategy["name"],
        }
        # Output settings enter the leaf only when set, so the roots of sets that never set
        # them do not change.
        if self.config_from() is not None:
            config["config_from"] = self.config_from()
        if self.adapter_rank() is not None:
            config["adapter_rank"] = self.adapter_rank()
        if self.output_dtype() is not None:
            config["output_dtype"] = self.output_dtype()
        return config

    def merkle_root(self) -> str:
        """blake3 Merkle root over the sorted visible ids plus the resolution-config leaf."""
        ids = [cid for cid, _ in self.visible_contributions()]
        return merkle_root(ids, self.resolution_config())


def join(a: Manifest, b: Manifest) -> Manifest:
    """The CRDT join: the union of both record sets, validated as one state."""
    merged = dict(a.records)
    merged.update(b.records)
    state = Manifest(merged)
    state._check_consistency("joined manifest")
    return state


def merkle_root(ids: Iterable[str], config: Mapping[str, Any]) -> str:
    """Leaves: ``H(0x00 || id)`` per sorted id, then ``H(0x00 || canonical config)``.

    Inner nodes ``H(0x01 || left || right)``; an odd node is promoted unchanged.
    """
    leaves = [blake3.blake3(b"\x00" + bytes.fromhex(i)).digest() for i in sorted(ids)]
    leaves.append(blake3.blake3(b"\x00" + canonical_json(dict(config)).encode()).digest())
    level = leaves
    while len(level) > 1:
        nxt = [
            blake3.blake3(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


# -- record constructors -------------------------------------------------------------------
def make_record(obj: dict[str, Any]) -> Record:
    try:
        line = canonical_json(obj)
    except ValueError:
        raise ManifestError("NaN or Infinity is not allowed in a record") from None
    if not _is_utf8(line):
        raise ManifestError("a record value is not valid UTF-8")
    return parse_record(line)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def add_record(
    tag: str,
    contribution_id: str,
    name: str,
    message: str | None = None,
    desc: str | None = None,
) -> Record:
    obj: dict[str, Any] = {"op": "add", "tag": tag, "id": contribution_id, "name": name}
    if message:
        obj["message"] = message
    if desc is not None and desc != contribution_id:
        obj["desc"] = desc
    return make_record(obj)


def remove_record(tag: str, observed: Iterable[str]) -> Record:
    return make_record({"op": "remove", "tag": tag, "observed": sorted(set(observed))})


def set_record(key: str, value: Any, clock: int, replica: str) -> Record:
    return make_record(
        {"op": "set", "key": key, "value": value, "clock": clock, "replica": replica}
    )
