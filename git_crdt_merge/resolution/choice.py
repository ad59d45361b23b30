"""``git crdt strategy``: check a strategy choice against the registry and write the register.

The ``strategy`` register is Layer 1 data, but whether a name and its parameters are valid is
known only to the registry (Layer 2), so the choice is made here, above both: the writer in
:mod:`contributions` stays free of the strategies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import CrdtError
from ..replicated import contributions
from ..replicated.repo import Repo


def choose_strategy(
    repo: Repo, name: str, params_text: Sequence[str]
) -> tuple[dict[str, Any], str | None]:
    """Validate ``name`` and its ``KEY=VALUE`` parameters, then write the ``strategy``
    register.  Returns the value written and a warning when the current (non-empty) set does
    not meet the strategy's input contract: the choice stands, ``merged/`` stays stale."""
    from ..strategies import registry

    repo.require_initialized()
    found = registry.get_strategy(name)
    params = registry.canonical_params(
        found, dict(contributions.parse_param(p) for p in params_text)
    )
    manifest = repo.read_manifest()
    registry.resolve_params(found, params, manifest.visible_contributions())
    value = {"name": found.name, "params": params}
    contributions.set_register(repo, "strategy", value)
    warning = None
    visible = manifest.visible_contributions()
    if visible:  # an empty set has no contract to meet yet
        try:
            registry.check_contract(found, len(visible), manifest.base() is not None)
        except CrdtError as exc:
            warning = str(exc)
    return value, warning
