"""Layer 1: reading a contribution's descriptor, bounded and checked, as a typed value.

Every reader of descriptors goes through here: resolution's plan, the read-side commands,
the writers that reuse a stored contribution.  A descriptor arrives by pull, so it is hostile
until checked: its size is bounded before it is read, its bytes are verified against their
address, its fields are validated (``checks.descriptor_problems``), and its content must give
the id the manifest names, so a descriptor swapped under a record is never used.
"""

from __future__ import annotations

from typing import Any

from .. import bounded
from ..errors import ManifestError, StoreError
from . import checks, descriptor
from .descriptor import Descriptor
from .manifest import Manifest
from .store import ObjectStore

__all__ = ["load_descriptor", "read_descriptor"]


def _load(store: ObjectStore, address: str) -> tuple[dict[str, Any], bytes]:
    size = store.size(address)
    if size is not None and size > checks.MAX_DESCRIPTOR_BYTES:
        raise ManifestError(f"descriptor {address[:16]} is larger than the limit")
    # verified: a descriptor rewritten in place (same size, other bytes) is refused
    data = store.get(address, verify=True, max_size=checks.MAX_DESCRIPTOR_BYTES)
    desc = bounded.loads_json(data, f"descriptor {address[:16]}")
    if not isinstance(desc, dict) or not isinstance(desc.get("tensors"), dict):
        raise ManifestError(f"descriptor {address[:16]} has no tensor table")
    return desc, data


def load_descriptor(store: ObjectStore, address: str) -> dict[str, Any]:
    """The descriptor object stored at ``address`` as JSON, unchecked: for ``verify``, which
    reports every problem rather than the first (everyone else: :func:`read_descriptor`)."""
    return _load(store, address)[0]


def read_descriptor(store: ObjectStore, manifest: Manifest, contribution_id: str) -> Descriptor:
    """The validated descriptor of contribution (or base) ``contribution_id``: found through
    the manifest (format 2 records name the descriptor's address), and refused unless its
    content gives that id."""
    address = manifest.descriptor_address(contribution_id)
    desc, data = _load(store, address)
    problems = checks.descriptor_problems(desc, f"descriptor {address[:16]}")
    if problems:  # every reader then sees well-typed fields (weights, shapes, names)
        raise StoreError(problems[0])
    got = descriptor.contribution_id(desc, data)
    if got != contribution_id:
        raise ManifestError(
            f"descriptor {address[:16]} describes contribution {got[:16]}, not "
            f"{contribution_id[:16]} (a substituted or corrupt object: run 'git crdt verify')"
        )
    return Descriptor.from_json(desc)
