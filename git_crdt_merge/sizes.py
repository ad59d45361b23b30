"""Byte sizes as people write them: the one parser of every size option and setting.

``--chunk-size``, ``--max-shard-size``, ``gc --max-bytes``, ``crdt.cacheMaxBytes`` and
``crdt.maxShardSize`` all read sizes through :func:`parse_size`.  The rules, exactly:

- a whole number of bytes: ``500000000``;
- a number (whole or decimal: ``1.5GB``) and a unit, case-insensitive, spaces allowed between:
  ``B`` = 1; ``KB``, ``MB``, ``GB``, ``TB`` = 1000, 1000**2, 1000**3, 1000**4 (SI);
  ``KiB``, ``MiB``, ``GiB``, ``TiB`` = 1024, 1024**2, 1024**3, 1024**4 (binary);
  ``k``, ``m``, ``g``, ``t`` alone = powers of 1024, as ``git config --type=int`` reads them;
- the result is rounded down to a whole byte; negative, non-finite and empty values are
  refused.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .errors import UsageError

UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*\Z")


def parse_size(text: str | int, what: str = "size", error: type[Exception] = UsageError) -> int:
    """``text`` as a number of bytes (see the module's rules); ``what`` names it in the error."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise error(f"{what} must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(str(text).lower())
    if match is None or match.group(2) not in UNITS or len(str(text)) > 64:
        raise error(
            f"{what} {str(text)[:64]!r} is not a size (e.g. 50MB, 2GiB, 500000000; "
            "KB=1000, KiB=1024)"
        )
    try:
        value = Decimal(match.group(1)) * UNITS[match.group(2)]
    except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
        raise error(f"{what} {text!r} is not a size") from None
    return int(value)
