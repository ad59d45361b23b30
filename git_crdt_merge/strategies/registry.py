"""The strategy registry: each strategy is declared once, as data, and everything else reads it.

A :class:`Strategy` names its parameters (:class:`Param`: type, default, shared or
per-contribution), its input contract (base required / optional / ignored, how many
contributions) and its merge function, whose docstring is the formula.  Validation
(:func:`resolve_params`, :func:`check_contract`), execution (:func:`run_strategy`), the CLI help
and ``docs/strategies.md`` all derive from that declaration.  Strategies come only from installed
code: :func:`register` is called by the modules of this package at import time.

This module is the public face: the declarations are in :mod:`.declarations`, lookup and
validation in :mod:`.validate`, execution in :mod:`.run`; everything is re-exported here.
"""

from __future__ import annotations

from .declarations import (  # noqa: F401
    CONVENTIONAL_RANGES,
    EXTRA_KINDS,
    PLUGIN_PARAMS,
    REQUIRED,
    TYPE_RANGES,
    MergeFn,
    ModelContext,
    ModelPass,
    ModelValues,
    Param,
    Strategy,
    TensorInputs,
)
from .run import (  # noqa: F401
    StoredInputs,
    collect_statistics,
    finish_statistics,
    prepare_inputs,
    run_strategy,
)
from .validate import (  # noqa: F401
    _ALIASES,
    _REGISTRY,
    all_strategies,
    canonical_params,
    check_contract,
    check_weights,
    get_strategy,
    register,
    resolve_params,
)

__all__ = [
    "EXTRA_KINDS",
    "REQUIRED",
    "ModelContext",
    "ModelPass",
    "ModelValues",
    "Param",
    "StoredInputs",
    "Strategy",
    "TensorInputs",
    "all_strategies",
    "canonical_params",
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
