"""Lookup and validation: register, find (installed plugins too), check parameters and contracts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .. import plugins
from ..errors import ResolveError, did_you_mean
from . import layered
from .declarations import REQUIRED, Param, Strategy

_REGISTRY: dict[str, Strategy] = {}


_ALIASES: dict[str, str] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to the registry (names and aliases must be new)."""
    for key in (strategy.name, *strategy.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"strategy name {key!r} registered twice")
    _REGISTRY[strategy.name] = strategy
    for alias in strategy.aliases:
        _ALIASES[alias] = strategy.name
    return strategy


def _register_installed(name: str) -> None:
    """Register the third-party strategy that the installed entry point ``name`` of group
    ``git_crdt_merge.strategies`` names (nothing if there is none)."""
    if not plugins.installed(plugins.STRATEGY_GROUP, name):
        return
    found = plugins.load_entry_point(plugins.STRATEGY_GROUP, name)
    where = f"plugin {name!r} of entry point group {plugins.STRATEGY_GROUP!r}"
    if not isinstance(found, Strategy):
        raise ResolveError(f"{where} is not a git_crdt_merge Strategy")
    if found.name != name:
        raise ResolveError(f"{where} declares the strategy name {found.name!r}")
    try:
        register(found)
    except ValueError as exc:
        raise ResolveError(f"{where}: {exc}") from None


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (or one of its aliases): a built-in one, or an installed
    third-party one (entry point group ``git_crdt_merge.strategies``) registered on first use."""
    if _ALIASES.get(name, name) not in _REGISTRY:
        _register_installed(name)
    key = _ALIASES.get(name, name)
    try:
        return _REGISTRY[key]
    except KeyError:
        names = sorted([*_REGISTRY, *_ALIASES])
        raise ResolveError(
            f"unknown strategy {name!r}{did_you_mean(name, names)}; known strategies: "
            f"{', '.join(names)}"
        ) from None


def all_strategies() -> list[Strategy]:
    """Every registered strategy, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _coerce(strategy: Strategy, param: Param, value: Any, where: str = "") -> Any:
    label = f"strategy {strategy.name}: parameter {param.name}{where}"
    if param.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ResolveError(f"{label} must be a number, got {value!r}")
        if isinstance(value, int) and abs(value) > 2**63:
            raise ResolveError(f"{label} must be within {param.range_text()}, got a huge integer")
        result = float(value)
        if not math.isfinite(result):
            raise ResolveError(f"{label} must be finite, got {value!r}")
        _check_range(param, result, label)
        return result
    if param.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ResolveError(f"{label} must be an integer, got {value!r}")
        _check_range(param, value, label)
        return int(value)
    if param.type is bool:
        if not isinstance(value, bool):
            raise ResolveError(f"{label} must be true or false, got {value!r}")
        return value
    if param.type is str:
        if not isinstance(value, str):
            raise ResolveError(f"{label} must be a string, got {value!r}")
        if len(value) > 200:
            raise ResolveError(f"{label} is longer than 200 characters")
        return value
    raise ResolveError(f"{label} has unsupported type {param.type!r}")  # pragma: no cover


def _check_range(param: Param, value: float, label: str) -> None:
    """The declared range; the message says the violated side, or the interval for
    fractions."""
    low, high, low_open = param.bounds()
    below = value <= low if low_open else value < low
    if not below and value <= high:
        return
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    if len(shown) > 24:
        shown = shown[:20] + "..."
    if high <= 1:  # a fraction: the interval says it best
        raise ResolveError(f"{label} must be in {param.range_text()}, got {shown}")
    if below and not low_open:
        raise ResolveError(f"{label} must be >= {low:g}, got {shown}")
    side = f"> {low:g}" if below else f"<= {high:g}"
    raise ResolveError(f"{label} must be {side}, got {shown}")


def _value(strategy: Strategy, param: Param, value: Any, where: str = "") -> Any:
    """A plain value (checked by :func:`_coerce`) or a per-tensor one (:mod:`.layered`),
    whose every value and gradient anchor gets the same check."""
    if not layered.is_per_tensor(value):
        return _coerce(strategy, param, value, where)
    label = f"strategy {strategy.name}: parameter {param.name}{where}"
    if strategy.model_pass is not None or strategy.required_extras is not None:
        raise ResolveError(
            f"{label}: per-tensor values are not offered by strategies with a whole-model "
            "pass or optional extra inputs; give one value"
        )
    return layered.parse(
        value,
        label=label,
        param_type=param.type,
        default=param.default,
        required=param.default is REQUIRED,
        coerce=lambda x, w: _coerce(strategy, param, x, where + w.removeprefix(label)),
    )


def _per_contribution(
    strategy: Strategy, param: Param, value: Any, contributions: Sequence[tuple[str, str]]
) -> list[Any]:
    if not isinstance(value, Mapping) or layered.is_per_tensor(value):
        if param.default is REQUIRED and value is REQUIRED:
            raise ResolveError(f"strategy {strategy.name}: parameter {param.name} is required")
        resolved = _value(strategy, param, value)
        return [resolved] * len(contributions)
    ids = [cid for cid, _ in contributions]
    by_name: dict[str, list[int]] = {}
    for index, (_, cname) in enumerate(contributions):
        by_name.setdefault(cname, []).append(index)
    values: list[Any] = [REQUIRED] * len(contributions)
    for key, item in value.items():
        if not isinstance(key, str):
            raise ResolveError(
                f"strategy {strategy.name}: parameter {param.name}: key {key!r} is not a string"
            )
        if key in ids:
            index = ids.index(key)
        elif key in by_name:
            if len(by_name[key]) > 1:
                raise ResolveError(
                    f"strategy {strategy.name}: parameter {param.name}: name {key!r} matches "
                    f"{len(by_name[key])} contributions; use contribution ids"
                )
            index = by_name[key][0]
        else:
            raise ResolveError(
                f"strategy {strategy.name}: parameter {param.name}: no visible contribution "
                f"with id or name {key!r}"
            )
        if values[index] is not REQUIRED:
            raise ResolveError(
                f"strategy {strategy.name}: parameter {param.name}: contribution {key!r} "
                "is given twice (by id and by name)"
            )
        values[index] = _value(strategy, param, item, f"[{key}]")
    for index, item in enumerate(values):
        if item is REQUIRED:
            if param.default is REQUIRED:
                cid, cname = contributions[index]
                raise ResolveError(
                    f"strategy {strategy.name}: parameter {param.name} is required for "
                    f"contribution {cname!r} ({cid})"
                )
            values[index] = param.default
    return values


def canonical_params(strategy: Strategy, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` as it is written to the ``strategy`` register: per-tensor values in their
    canonical form (:func:`layered.canonical`; a bare list is a gradient), plain values
    untouched, so a register of plain values keeps its exact bytes."""
    types = {p.name: p for p in strategy.params}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        param = types.get(key)
        if param is None:
            out[key] = value  # resolve_params reports it
        elif (
            param.per_contribution
            and isinstance(value, Mapping)
            and not layered.is_per_tensor(value)
        ):
            out[key] = {k: layered.canonical(v, param.type) for k, v in value.items()}
        else:
            out[key] = layered.canonical(value, param.type)
    return out


def resolve_params(
    strategy: Strategy, raw: Mapping[str, Any], contributions: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """Validate ``raw`` parameters against ``strategy`` and fill the defaults.

    ``contributions`` are (id, name) pairs in canonical order.  A per-contribution parameter may
    be given as one value for all, or as a mapping from contribution id or name to value (absent
    ones take the default); it resolves to a list aligned with ``contributions``.  An ``int`` is
    accepted for a ``float`` parameter, a ``bool`` is not.  A per-tensor value
    (``{"layers": [...]}``, :mod:`.layered`) resolves to a :class:`layered.PerTensor`, which
    :func:`layered.for_tensor` evaluates for each tensor before the strategy runs."""
    known = {p.name for p in strategy.params}
    unknown = sorted(set(raw) - known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise ResolveError(
            f"strategy {strategy.name}: unknown parameter {unknown[0]!r}"
            f"{did_you_mean(unknown[0], known)} (accepted: {accepted})"
        )
    resolved: dict[str, Any] = {}
    for param in strategy.params:
        if param.per_contribution:
            value = raw.get(param.name, param.default)
            resolved[param.name] = _per_contribution(strategy, param, value, contributions)
        elif param.name in raw:
            resolved[param.name] = _value(strategy, param, raw[param.name])
        elif param.default is REQUIRED:
            raise ResolveError(f"strategy {strategy.name}: parameter {param.name} is required")
        else:
            resolved[param.name] = param.default
    return resolved


def check_contract(strategy: Strategy, n_contributions: int, has_base: bool) -> None:
    """Raise :class:`ResolveError` unless ``strategy`` accepts this many contributions and this
    base presence."""
    if strategy.base == "required" and not has_base:
        raise ResolveError(f"strategy {strategy.name} requires a base model; none is configured")
    lo, hi = strategy.min_inputs, strategy.max_inputs
    if n_contributions < lo or (hi is not None and n_contributions > hi):
        if hi is None:
            wanted = f"at least {lo}"
        elif hi == lo:
            wanted = f"exactly {lo}"
        else:
            wanted = f"{lo} to {hi}"
        raise ResolveError(
            f"strategy {strategy.name} needs {wanted} contribution(s) besides the base, "
            f"got {n_contributions}"
        )


def check_weights(
    strategy: Strategy, weights: Sequence[float], contributions: Sequence[tuple[str, str]]
) -> None:
    """Raise :class:`ResolveError` if ``strategy`` takes no weights but a contribution has one
    (unless the strategy accepts and ignores them: ``Strategy.weights_ignored``).

    ``weights`` and ``contributions`` ((id, name) pairs) are aligned, in canonical order."""
    if strategy.uses_weights or strategy.weights_ignored:
        return
    for (cid, cname), weight in zip(contributions, weights, strict=True):
        if weight != 1.0:
            raise ResolveError(
                f"strategy {strategy.name} takes no per-contribution weights, but contribution "
                f"{cname!r} ({cid[:12]}) has weight {weight:g}; re-add it without --weight or "
                "choose a weighted strategy"
            )
