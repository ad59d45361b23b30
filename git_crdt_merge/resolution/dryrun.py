"""``--dry-run``: what a resolution would do (tensors, inputs, parameters per tensor,
estimated time and memory), computed from the plan alone: no tensor is read, nothing is
written.

Memory is the estimate the resolution itself checks before it starts
(:func:`.resolve.memory_needed`: the largest tensor times the inputs + 3).  Time is the
bytes every input holds, read at :data:`READ_RATE`, times the strategy's cost relative to
that reading floor (:data:`RELATIVE_COST`, from the catalogue benchmark in
docs/performance.md, 2 cores; :data:`DEFAULT_COST` for a strategy not measured): a rough
order of magnitude on a similar machine, not a promise.
"""

from __future__ import annotations

from typing import Any

from ..strategies import layered
from .plan import Plan
from .resolve import memory_needed

READ_RATE = 3.0e9  # bytes/s: the benchmark's IO floor (2.0 GB of inputs in 0.6-0.7 s)
DEFAULT_COST = 10.0
# resolve time / IO floor, docs/performance.md "Every strategy" (rounded; the decomposition
# and solve strategies from the third session's re-measurement, 8 layers, 2 workers; della,
# della_linear and arcee_fusion from the fourth session's)
RELATIVE_COST: dict[str, float] = {
    "ada_merging": 16,
    "adarank": 148,
    "arcee_fusion": 5.9,
    "breadcrumbs": 5.3,
    "breadcrumbs_ties": 6.5,
    "dam": 7.4,
    "dare_linear": 4.0,
    "dare_ties": 3.8,
    "della": 6.4,
    "della_linear": 5.6,
    "dual_projection": 5.8,
    "emr": 8.2,
    "evolutionary_merge": 6.1,
    "fisher_merge": 6.1,
    "genetic_merge": 6.5,
    "karcher": 5.9,
    "led_merge": 9.6,
    "linear": 2.0,
    "model_stock": 7.0,
    "multislerp": 5.7,
    "nearswap": 3.2,
    "negative_merge": 3.4,
    "nuslerp": 3.5,
    "passthrough": 1.0,
    "ram": 5.9,
    "ramplus_tl": 8.0,
    "regression_mean": 33,
    "representation_surgery": 143,
    "safe_merge": 9.0,
    "sce": 20,
    "slerp": 3.4,
    "split_unlearn_merge": 6.5,
    "star": 131,
    "svd_knot_tying": 63,
    "task_arithmetic": 2.3,
    "ties": 4.4,
    "weight_scope_alignment": 8.5,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return repr(value)


def describe_plan(plan: Plan) -> dict[str, Any]:
    """The plan as JSON: every tensor with its parameters after gradients and filters, the
    inputs, and the estimates (module docstring)."""
    varying = sorted(k for k, v in plan.params.items() if layered.has_per_tensor({k: v}))
    inputs = [*plan.descriptors, *([plan.base] if plan.base is not None else [])]
    input_bytes = sum(d.total_bytes() for d in inputs)
    largest = plan.largest_input()
    cost = RELATIVE_COST.get(plan.strategy.name, DEFAULT_COST)
    tensors = []
    for spec in plan.specs:
        params = plan.tensor_params(spec.name)
        tensors.append(
            {
                "name": spec.name,
                "dtype": spec.dtype,
                "shape": spec.shape,
                "bytes": spec.nbytes,
                "layer": layered.layer_index(spec.name),
                "params": {k: _jsonable(params[k]) for k in varying},
            }
        )
    return {
        "merkle_root": plan.root,
        "strategy": plan.strategy.name,
        "params": _jsonable(plan.raw_params),
        "per_tensor_params": varying,
        "layers": plan.layers,
        "base": plan.base_id,
        "contributions": [
            {"id": cid, "name": name, "weight": w}
            for (cid, name), w in zip(plan.contributions, plan.weights, strict=True)
        ],
        "tensors": tensors,
        "input_bytes": input_bytes,
        "output_bytes": sum(s.nbytes for s in plan.specs),
        "estimated_memory_bytes": memory_needed(largest, len(plan.descriptors) + 1),
        "estimated_seconds": input_bytes / READ_RATE * cost,
        "relative_cost": cost,
    }
