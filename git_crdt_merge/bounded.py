"""Bounded reads of repository content (no torch, no git): what a pull may have planted.

Every file git-crdt reads from the work tree is opened without following a symbolic link,
must be a regular file, and is read up to a size limit; every JSON document is parsed with a
bound on its nesting.  A pulled ``.crdt/manifest`` that is a symbolic link to ``/dev/zero``,
a 20 GB file or a document nested 200,000 deep is then a one-line error, not a hang, an
out-of-memory kill or a traceback (docs/security.md, "Bounded reads").  Text taken from the
repository is shown through :func:`display`, so no escape sequence reaches a terminal.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import CrdtError, ManifestError

MAX_JSON_DEPTH = 64


def read_regular(
    path: Path, limit: int, what: str, error: type[CrdtError] = ManifestError
) -> bytes:
    """The bytes of the regular file ``path`` (never through a final symbolic link), at most
    ``limit`` of them.  FileNotFoundError passes through; anything else is ``error``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} is a symbolic link; refusing to follow it") from None
        raise error(f"{what} cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} is not a regular file")
        if st.st_size > limit:
            raise error(f"{what} is larger than the limit of {limit} bytes")
        chunks = []
        left = limit + 1
        while left > 0:
            piece = os.read(fd, min(left, 1 << 20))
            if not piece:
                break
            chunks.append(piece)
            left -= len(piece)
        data = b"".join(chunks)
        if len(data) > limit:
            raise error(f"{what} is larger than the limit of {limit} bytes")
        return data
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def json_depth(value: Any) -> int:
    """The nesting depth of a decoded JSON value (iterative: no recursion limit)."""
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in node)
    return depth


def loads_json(
    data: bytes | str,
    what: str,
    error: type[CrdtError] = ManifestError,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Decode JSON with a bound on nesting; bad input is ``error`` with a one-line reason."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise error(f"{what} is nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise error(f"{what} is not JSON ({getattr(exc, 'msg', exc)})") from None
    if json_depth(value) > max_depth:
        raise error(f"{what} is nested deeper than {max_depth} levels")
    return value


def display(text: object) -> str:
    """``text`` safe for a terminal: control characters (C0, DEL, C1, and the Unicode
    bidirectional overrides) are shown as escapes instead of being interpreted."""
    out = []
    for ch in str(text):
        o = ord(ch)
        if ch in "\n\t" or not (
            o < 32 or 0x7F <= o < 0xA0 or 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069
        ):
            out.append(ch)
        else:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
    return "".join(out)


def display_data(value: Any) -> Any:
    """:func:`display` applied to every string (keys too) of a JSON-like value."""
    if isinstance(value, str):
        return display(value)
    if isinstance(value, dict):
        return {display_data(k): display_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [display_data(v) for v in value]
    return value
