"""Installed plugins, found through Python entry points and named in the manifest.

A strategy parameter may name a plugin (``fitness=myteam-eval``); the code that runs is the
entry point of that name in the group below, installed in this Python environment by its
owner.  Repository content never names a module or a path to import: a name that is not
installed is an error, not a download.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

from .errors import ResolveError

__all__ = [
    "FITNESS_GROUP",
    "STRATEGY_GROUP",
    "installed",
    "load_entry_point",
    "load_plugin",
    "plugin_origin",
]

FITNESS_GROUP = "git_crdt_merge.fitness"
"""Search objectives: ``objective(candidate) -> float``, lower is better (see
``docs/strategies.md``, "Data-aware and search-based methods")."""


STRATEGY_GROUP = "git_crdt_merge.strategies"
"""Third-party strategies: the entry point names a :class:`~.strategies.registry.Strategy`
object whose ``name`` is the entry point's name; it is registered on first use."""


def installed(group: str, name: str) -> bool:
    """Whether an entry point ``name`` of ``group`` is installed."""
    return any(ep.name == name for ep in metadata.entry_points(group=group))


def load_entry_point(group: str, name: str) -> Any:
    """The object that the entry point ``name`` of ``group`` names.

    Raises a one-line :class:`ResolveError` naming the group and the name when it is not
    installed, several distributions define it or it fails to import."""
    found = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if not found:
        installed = sorted({ep.name for ep in metadata.entry_points(group=group)})
        known = ", ".join(installed) if installed else "none installed"
        raise ResolveError(
            f"plugin {name!r} not found in entry point group {group!r} ({known}); install the "
            "package that provides it in this Python environment"
        )
    values = sorted({ep.value for ep in found})
    if len(values) > 1:
        raise ResolveError(
            f"plugin {name!r} of entry point group {group!r} is defined several times "
            f"({', '.join(values)}); uninstall all but one"
        )
    try:
        loaded = found[0].load()
    except Exception as exc:  # noqa: BLE001 - any import failure of foreign code
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResolveError(
            f"plugin {name!r} of entry point group {group!r} failed to load: {first}"
        ) from None
    return loaded


def load_plugin(group: str, name: str) -> Callable[..., Any]:
    """The callable that the entry point ``name`` of ``group`` names (errors as
    :func:`load_entry_point`, and when it is not callable)."""
    loaded = load_entry_point(group, name)
    if not callable(loaded):
        raise ResolveError(f"plugin {name!r} of entry point group {group!r} is not callable")
    return loaded


def plugin_origin(group: str, name: str) -> str:
    """``distribution version`` of the installed entry point (recorded in resolution.json:
    the Merkle root names the plugin, not its code, so a result says which code made it)."""
    for ep in metadata.entry_points(group=group):
        if ep.name == name and ep.dist is not None:
            return f"{ep.dist.name} {ep.dist.version}"
    return "unknown"
