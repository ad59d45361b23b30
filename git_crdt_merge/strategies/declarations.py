"""Strategy declarations: Strategy, Param, what a merge function gets, parameter ranges.

Data only; :mod:`.registry` is the public face.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

import torch

from .. import plugins
from ..numerics import RandomStream
from ..vocabulary import EXTRA_INPUT_KINDS


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


EXTRA_KINDS: dict[str, str] = EXTRA_INPUT_KINDS
"""The kinds of extra inputs a contribution can carry (``vocabulary.EXTRA_INPUT_KINDS``)."""


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
    # True for methods without a per-contribution weight whose recipes may still carry one
    # (mergekit ignores ``weight`` for slerp and model_stock): a weight other than 1 is then
    # accepted and has no effect (``uses_weights`` must be False)
    weights_ignored: bool = False
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
    # True where the per-tensor arithmetic, not reading the inputs, sets the time (measured:
    # ratio to the IO floor above about 10, docs/performance.md): resolve then uses every core
    # by default (one worker process per core, resolution/pool.py); False keeps one process
    compute_bound: bool = False
    # float64 working matrices one tensor's merge holds at its peak, beyond the input slots:
    # (per tensor, per contribution, square), counted in float64 copies of the largest tensor
    # (per tensor, and again per contribution) and of a d x d matrix for d the largest side of
    # any 2-D tensor (Gram matrices, out x out modules); see scratch_bytes.  The default number
    # of worker processes is capped so that every worker's share fits in memory
    float64_scratch: tuple[int, int, int] = (0, 0, 0)
    # bumped where a new algorithm changes the output bytes (part of the cache key, recorded in
    # resolution.json); every value other than 1 is mirrored in vocabulary.STRATEGY_REVISIONS
    revision: int = 1

    def scratch_bytes(self, largest: int, side: int, contributions: int) -> int:
        """Bytes of :attr:`float64_scratch` for tensors of at most ``largest`` elements and 2-D
        sides of at most ``side``, with ``contributions`` inputs."""
        per_tensor, per_contribution, square = self.float64_scratch
        return 8 * ((per_tensor + per_contribution * contributions) * largest + square * side**2)

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
