"""Merge strategies: pure deterministic functions from contributions to one tensor.

Importing this package registers every built-in strategy (modules below); look them up with
:func:`get_strategy`.  Strategies come only from installed code, never from repository content.
"""

from __future__ import annotations

from . import (
    consensus,
    data_aware,
    interpolation,
    model_stock,
    passthrough,
    search,
    selective,
    spectral,
    spherical,
    surgery,
    task_arithmetic,
)
from .registry import (
    REQUIRED,
    Param,
    Strategy,
    TensorInputs,
    all_strategies,
    canonical_params,
    check_contract,
    get_strategy,
    resolve_params,
    run_strategy,
)

__all__ = [
    "REQUIRED",
    "Param",
    "Strategy",
    "TensorInputs",
    "all_strategies",
    "canonical_params",
    "check_contract",
    "consensus",
    "data_aware",
    "get_strategy",
    "interpolation",
    "model_stock",
    "passthrough",
    "resolve_params",
    "run_strategy",
    "search",
    "selective",
    "spectral",
    "spherical",
    "surgery",
    "task_arithmetic",
]
