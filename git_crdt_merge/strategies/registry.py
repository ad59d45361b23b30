"""The strategy registry: each strategy is declared once, as data, and everything else reads it.

A :class:`Strategy` names its parameters (:class:`Param`: type, default, shared or
per-contribution), its input contract (base required / optional / ignored, how many
contributions) and its merge function, whose docstring is the formula.  Validation
(:func:`resolve_params`, :func:`check_contract`), execution (:func:`run_strategy`), the CLI help
and ``docs/strategies.md`` all derive from that declaration.  Strategies come only from installed
code: :func:`register` is called by the modules of this package at import time.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any, Literal

import torch

from .. import numerics, plugins
from ..errors import ResolveError
from ..numerics import FLOAT_COMPUTE_DTYPES, RandomStream, from_compute, to_compute

__all__ = [
    "EXTRA_KINDS",
    "REQUIRED",
    "ModelContext",
    "ModelPass",
    "ModelValues",
    "Param",
    "Strategy",
    "TensorInputs",
    "all_strategies",
    "check_contract",
    "check_weights",
    "collect_statistics",
    "finish_statistics",
    "prepare_inputs",
    "get_strategy",
    "register",
    "resolve_params",
    "run_strategy",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Sentinel default of a parameter the user must give."""


@dataclass(frozen=True)
class Param:
    """One parameter of a strategy.

    Every numeric parameter has a declared range ``[low, high]`` (``low`` excluded when
    ``low_open``): the manifest is hostile data, and an iteration count of 1e12 or a
    tolerance of 0 must be refused where the register is written, verified and resolved,
    not hang or divide by zero.  Unset bounds come from :data:`CONVENTIONAL_RANGES` by name,
    else from the type (:data:`TYPE_RANGES`)."""

    name: str
    type: type  # float | int | bool | str
    default: Any  # REQUIRED or a value of ``type``
    _: KW_ONLY  # the rest by keyword: Param("density", float, 1.0, per_contribution=True)
    per_contribution: bool = False
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool | None = None

    def bounds(self) -> tuple[float, float, bool]:
        """(low, high, low excluded) of a numeric parameter."""
        low, high, low_open = CONVENTIONAL_RANGES.get(
            self.name, TYPE_RANGES.get(self.type, (-math.inf, math.inf, False))
        )
        return (
            low if self.low is None else self.low,
            high if self.high is None else self.high,
            low_open if self.low_open is None else self.low_open,
        )

    def range_text(self) -> str:
        low, high, low_open = self.bounds()
        return f"{'(' if low_open else '['}{low:g}, {high:g}]"


# The ranges a parameter of this name has unless its declaration says otherwise: fractions,
# tolerances and step sizes are positive; iteration counts and populations are bounded so
# that a resolution finishes (a generation or a step evaluates the whole model).
CONVENTIONAL_RANGES: dict[str, tuple[float, float, bool]] = {
    "density": (0.0, 1.0, True),
    "base_density": (0.0, 1.0, True),
    "eta": (0.0, 1.0, True),
    "energy": (0.0, 1.0, True),
    "mutation_rate": (0.0, 1.0, True),
    "rank_fraction": (0.0, 1.0, True),
    "fraction": (0.0, 1.0, False),
    "select_topk": (0.0, 1.0, False),
    "init": (0.0, 1.0, False),
    "gamma": (0.0, 1.0, False),
    "tol": (0.0, 1.0, True),
    "fd_step": (0.0, 1.0, True),
    "lr": (0.0, 10.0, True),
    "sigma": (0.0, 10.0, True),
    "eps": (0.0, 1e6, False),
    "epsilon": (0.0, 1e6, False),
    "ridge": (0.0, 1e6, False),
    "cosine_weight": (0.0, 1e6, False),
    "l1_weight": (0.0, 1e6, False),
    "l2_weight": (0.0, 1e6, False),
    "max_iter": (0, 1000, False),
    "steps": (0, 10_000, False),
    "generations": (0, 500, False),
    "population_size": (2, 256, False),
    "rank": (0, 65_536, False),
}
# String parameters that name an installed plugin (verify checks that it is installed; the
# register may name one that only the resolving machine has).
PLUGIN_PARAMS: dict[str, str] = {
    "objective": plugins.FITNESS_GROUP,
    "fitness": plugins.FITNESS_GROUP,
}
TYPE_RANGES: dict[type, tuple[float, float, bool]] = {
    float: (-1e6, 1e6, False),
    int: (0, 1_000_000, False),
}


@dataclass(frozen=True)
class TensorInputs:
    """Everything a merge function sees for one tensor name."""

    name: str  # tensor name
    base: torch.Tensor | None  # in compute dtype; None if no base (or the base is ignored)
    # contributions in canonical order (by id), compute dtype; they belong to this call, so a
    # strategy may overwrite them in place (the base is shared: never overwrite it)
    tensors: list[torch.Tensor]
    contribution_ids: list[str]
    weights: list[float]  # per-contribution weight from each descriptor (default 1.0)
    rng: RandomStream
    # extra inputs by kind (``Strategy.extra_inputs``), aligned with ``tensors``: a contribution's
    # tensor of that kind for this name in compute dtype, or None where it has none
    extras: Mapping[str, list[torch.Tensor | None]] = field(default_factory=dict)
    # what the whole-model statistics pass (``Strategy.model_pass``) found for this tensor name
    model: Any = None
    # where a strategy with a ``side_output`` file puts the side tensors it computes for this
    # name (side tensor name -> float tensor, rounded once to the storage dtype); None when
    # the caller does not want them (the strategy may then skip computing them)
    side: dict[str, torch.Tensor] | None = None


MergeFn = Callable[[TensorInputs, Mapping[str, Any]], torch.Tensor]

EXTRA_KINDS: dict[str, str] = {
    "fisher": "Fisher information diagonals: one tensor per model tensor, same shape, >= 0",
    "gram": "RegMean Gram matrices X^T X: keyed by a 2-D weight (out, in), shape (in, in)",
}
"""The kinds of extra inputs a contribution can carry (``add-contribution --KIND FILE``)."""


@dataclass(frozen=True)
class ModelContext:
    """What the end of a statistics pass sees: one summary per floating tensor name."""

    summaries: dict[str, Any]  # tensor name -> what ``ModelPass.collect`` returned, name order
    numels: dict[str, int]  # tensor name -> element count
    contribution_ids: list[str]
    weights: list[float]
    rng: RandomStream
    has_base: bool
    # a fresh copy of one tensor name's inputs (compute dtype), read from the object store on
    # demand, one name at a time (objective plugins that evaluate a candidate model use it);
    # None when no store is behind the pass
    read: Callable[[str], TensorInputs] | None = None


@dataclass(frozen=True)
class ModelValues:
    """The result of a statistics pass: a value per tensor name for the per-tensor pass, and a
    JSON-ready report for ``resolution.json`` (e.g. the coefficients a search found)."""

    per_tensor: dict[str, Any]
    report: dict[str, Any]


@dataclass(frozen=True)
class ModelPass:
    """A whole-model statistics pass run before the per-tensor pass.

    ``collect`` sees one tensor name at a time (streamed, like the merge) and returns a small
    summary (a few floats per contribution pair, never a tensor of the model's size);
    ``finish`` turns all summaries into :class:`ModelValues`.  Both are pure functions of the
    set, so the Merkle root already names their result."""

    collect: Callable[[TensorInputs, Mapping[str, Any]], Any]
    finish: Callable[[ModelContext, Mapping[str, Any]], ModelValues]


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A registered merge strategy, declared with keywords; what most strategies share is the
    default (no aliases, at least one contribution, no upper bound)."""

    name: str
    params: tuple[Param, ...]
    base: Literal["required", "optional", "ignored"]
    stochastic: bool
    merge: MergeFn
    summary: str
    aliases: tuple[str, ...] = ()
    min_inputs: int = 1  # contributions, not counting the base
    max_inputs: int | None = None
    # False for methods whose formula has no per-contribution weight: a contribution added with
    # a weight other than 1 is then refused (check_weights) instead of being silently ignored
    uses_weights: bool = True
    # kinds of extra inputs (EXTRA_KINDS) the merge function reads from each contribution
    extra_inputs: tuple[str, ...] = ()
    # which of ``extra_inputs`` the resolved parameters make mandatory (default: all of them),
    # for methods that also offer an explicitly requested data-free variant
    required_extras: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None
    # a whole-model statistics pass run before the per-tensor pass (None: purely per tensor)
    model_pass: ModelPass | None = None
    # name of a second safetensors file of the output folder (e.g. ``surgery.safetensors``)
    # that holds the side tensors the merge function puts in ``TensorInputs.side``; the model
    # files keep exactly the model's tensor names
    side_output: str | None = None

    def needed_extras(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The extra-input kinds every contribution must carry under ``params``."""
        if self.required_extras is None:
            return self.extra_inputs
        return self.required_extras(params)

    @property
    def formula(self) -> str:
        """The merge function's docstring: the formula this strategy computes."""
        return inspect.getdoc(self.merge) or ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


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
        known = ", ".join(sorted([*_REGISTRY, *_ALIASES]))
        raise ResolveError(f"unknown strategy {name!r}; known strategies: {known}") from None


def all_strategies() -> list[Strategy]:
    """Every registered strategy, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


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


def _per_contribution(
    strategy: Strategy, param: Param, value: Any, contributions: Sequence[tuple[str, str]]
) -> list[Any]:
    if not isinstance(value, Mapping):
        if param.default is REQUIRED and value is REQUIRED:
            raise ResolveError(f"strategy {strategy.name}: parameter {param.name} is required")
        resolved = _coerce(strategy, param, value)
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
        values[index] = _coerce(strategy, param, item, f"[{key}]")
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


def resolve_params(
    strategy: Strategy, raw: Mapping[str, Any], contributions: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """Validate ``raw`` parameters against ``strategy`` and fill the defaults.

    ``contributions`` are (id, name) pairs in canonical order.  A per-contribution parameter may
    be given as one value for all, or as a mapping from contribution id or name to value (absent
    ones take the default); it resolves to a list aligned with ``contributions``.  An ``int`` is
    accepted for a ``float`` parameter, a ``bool`` is not."""
    known = {p.name for p in strategy.params}
    unknown = sorted(set(raw) - known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise ResolveError(
            f"strategy {strategy.name}: unknown parameter {unknown[0]!r} (accepted: {accepted})"
        )
    resolved: dict[str, Any] = {}
    for param in strategy.params:
        if param.per_contribution:
            value = raw.get(param.name, param.default)
            resolved[param.name] = _per_contribution(strategy, param, value, contributions)
        elif param.name in raw:
            resolved[param.name] = _coerce(strategy, param, raw[param.name])
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
    """Raise :class:`ResolveError` if ``strategy`` takes no weights but a contribution has one.

    ``weights`` and ``contributions`` ((id, name) pairs) are aligned, in canonical order."""
    if strategy.uses_weights:
        return
    for (cid, cname), weight in zip(contributions, weights, strict=True):
        if weight != 1.0:
            raise ResolveError(
                f"strategy {strategy.name} takes no per-contribution weights, but contribution "
                f"{cname!r} ({cid[:12]}) has weight {weight:g}; re-add it without --weight or "
                "choose a weighted strategy"
            )


# ---------------------------------------------------------------------------------------------
# execution
# ---------------------------------------------------------------------------------------------


def _own(converted: torch.Tensor, original: torch.Tensor, owned: bool) -> torch.Tensor:
    """A tensor the strategy may overwrite."""
    return converted if owned or converted is not original else converted.clone()


def _prepare(
    strategy: Strategy,
    name: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    contribution_ids: Sequence[str],
    weights: Sequence[float],
    rng: RandomStream,
    compute_dtype: torch.dtype,
    owned: bool,
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None,
    model: Any,
    side: dict[str, torch.Tensor] | None = None,
) -> tuple[TensorInputs | None, torch.Tensor, torch.dtype]:
    """Check and convert the inputs of one tensor name: (inputs or None when the tensor passes
    through unchanged, the source tensor (base, else first contribution), storage dtype)."""
    if compute_dtype not in FLOAT_COMPUTE_DTYPES:
        raise ResolveError(
            f"strategy {strategy.name}: compute dtype must be float32 or float64, "
            f"not {compute_dtype}"
        )
    check_contract(strategy, len(tensors), base is not None)
    if not (len(tensors) == len(contribution_ids) == len(weights)):
        raise ResolveError(
            f"strategy {strategy.name}: tensor {name}: {len(tensors)} tensors, "
            f"{len(contribution_ids)} ids and {len(weights)} weights"
        )
    source = base if base is not None else tensors[0]
    for cid, t in zip(contribution_ids, tensors, strict=True):
        if t.shape != source.shape:
            raise ResolveError(
                f"strategy {strategy.name}: tensor {name} has shape {tuple(t.shape)} in "
                f"contribution {cid} but {tuple(source.shape)} in the "
                f"{'base' if base is not None else 'first contribution'}"
            )
    if not source.is_floating_point() or source.numel() == 0:
        return None, source, source.dtype
    converted_extras: dict[str, list[torch.Tensor | None]] = {}
    for kind, items in (extras or {}).items():
        if len(items) != len(tensors):
            raise ResolveError(
                f"strategy {strategy.name}: tensor {name}: {len(items)} {kind} inputs for "
                f"{len(tensors)} contributions"
            )
        converted_extras[kind] = [
            None if x is None else _own(to_compute(x, compute_dtype), x, owned) for x in items
        ]
    inputs = TensorInputs(
        name=name,
        base=None if base is None else to_compute(base, compute_dtype),
        tensors=[_own(to_compute(t, compute_dtype), t, owned) for t in tensors],
        contribution_ids=list(contribution_ids),
        weights=[float(w) for w in weights],
        rng=rng,
        extras=converted_extras,
        model=model,
        side=side,
    )
    return inputs, source, source.dtype


def run_strategy(
    strategy: Strategy,
    name: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    contribution_ids: Sequence[str],
    weights: Sequence[float],
    params: Mapping[str, Any],
    rng: RandomStream,
    compute_dtype: torch.dtype = torch.float32,
    *,
    owned: bool = False,
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    model: ModelValues | None = None,
    side: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge one tensor: tensors in their storage dtype in, one tensor in storage dtype out.

    ``params`` are the output of :func:`resolve_params`.  The output dtype is the base's when the
    strategy uses a base, else the first contribution's (canonical order).  Non-floating tensors
    (position ids, masks, counters) are passed through unchanged from that same source: averaging
    integers has no meaning that every tool would agree on.  Inputs are converted to
    ``compute_dtype`` (float32 or float64) and the result is cast back with one rounding.
    ``extras`` maps an extra-input kind to one tensor (or None) per contribution for this name;
    ``model`` is the result of :func:`finish_statistics` for strategies with a statistics pass.
    ``side``, for a strategy with a ``side_output`` file, receives the side tensors it computed
    for this name (side tensor name -> tensor in the same storage dtype as the result; nothing
    for a tensor that passes through); without it the strategy may skip computing them.

    Strategies may overwrite the contributions' compute tensors (never the base): pass
    ``owned=True`` when the caller gives up ``tensors`` (resolve does, to keep memory near
    K + 3 tensors); otherwise they are copied first when the conversion did not copy them."""
    if strategy.base == "ignored":
        base = None
    if strategy.model_pass is not None and model is None:
        raise ResolveError(
            f"strategy {strategy.name} needs its whole-model statistics pass before merging"
        )
    inputs, source, storage_dtype = _prepare(
        strategy,
        name,
        base,
        tensors,
        contribution_ids,
        weights,
        rng,
        compute_dtype,
        owned,
        extras,
        None if model is None else model.per_tensor.get(name),
        {} if side is not None and strategy.side_output is not None else None,
    )
    if inputs is None:
        return source.clone()
    # factory calls inside strategies and numerics (zeros, empty, tensor ...) allocate on the
    # inputs' device, so that --device cuda runs the same code
    with numerics.on_device(source.device):
        merged = strategy.merge(inputs, params)
    if side is not None and inputs.side:
        for key in sorted(inputs.side):
            if key in side:
                raise ResolveError(f"strategy {strategy.name}: side tensor {key!r} given twice")
            side[key] = from_compute(inputs.side[key], storage_dtype)
    return from_compute(merged.reshape(source.shape), storage_dtype)


def collect_statistics(
    strategy: Strategy,
    name: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    contribution_ids: Sequence[str],
    weights: Sequence[float],
    params: Mapping[str, Any],
    rng: RandomStream,
    compute_dtype: torch.dtype = torch.float32,
    *,
    owned: bool = False,
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
) -> Any:
    """The statistics-pass summary of one tensor name (None for tensors that pass through
    unchanged: integers and empty tensors).  Same inputs and checks as :func:`run_strategy`."""
    if strategy.model_pass is None:
        raise ResolveError(f"strategy {strategy.name} has no statistics pass")
    if strategy.base == "ignored":
        base = None
    inputs, _, _ = _prepare(
        strategy,
        name,
        base,
        tensors,
        contribution_ids,
        weights,
        rng,
        compute_dtype,
        owned,
        extras,
        None,
    )
    if inputs is None:
        return None
    with numerics.on_device(inputs.tensors[0].device if inputs.tensors else "cpu"):
        return strategy.model_pass.collect(inputs, params)


def finish_statistics(
    strategy: Strategy,
    summaries: Mapping[str, Any],
    numels: Mapping[str, int],
    contribution_ids: Sequence[str],
    weights: Sequence[float],
    params: Mapping[str, Any],
    rng: RandomStream,
    has_base: bool,
    read: Callable[[str], TensorInputs] | None = None,
) -> ModelValues:
    """Turn the per-tensor summaries (None entries dropped) into :class:`ModelValues`.

    ``read`` gives the search access to one tensor name's inputs at a time (see
    :class:`ModelContext`)."""
    if strategy.model_pass is None:
        raise ResolveError(f"strategy {strategy.name} has no statistics pass")
    kept = {n: summaries[n] for n in sorted(summaries) if summaries[n] is not None}
    context = ModelContext(
        summaries=kept,
        numels={n: int(numels[n]) for n in kept},
        contribution_ids=list(contribution_ids),
        weights=[float(w) for w in weights],
        rng=rng,
        has_base=has_base and strategy.base != "ignored",
        read=read,
    )
    return strategy.model_pass.finish(context, params)


def prepare_inputs(
    strategy: Strategy,
    name: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    contribution_ids: Sequence[str],
    weights: Sequence[float],
    rng: RandomStream,
    compute_dtype: torch.dtype = torch.float32,
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
) -> TensorInputs | None:
    """The checked :class:`TensorInputs` of one tensor name, copies in compute dtype that the
    caller may keep (None for a tensor that passes through: integers, empty)."""
    if strategy.base == "ignored":
        base = None
    inputs, _, _ = _prepare(
        strategy,
        name,
        base,
        tensors,
        contribution_ids,
        weights,
        rng,
        compute_dtype,
        False,
        extras,
        None,
    )
    if inputs is not None and inputs.base is not None and inputs.base is base:
        inputs = replace(inputs, base=inputs.base.clone())
    return inputs
