"""Running a strategy on one tensor name: checked inputs, the merge, the statistics pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from .. import numerics
from ..errors import CpuError, ResolveError
from ..numerics import FLOAT_COMPUTE_DTYPES, RandomStream, from_compute, to_compute
from . import layered
from .declarations import ModelContext, ModelValues, Strategy, TensorInputs
from .validate import check_contract


def _own(converted: torch.Tensor, original: torch.Tensor, owned: bool) -> torch.Tensor:
    """A tensor the strategy may overwrite."""
    return converted if owned or converted is not original else converted.clone()


@dataclass(frozen=True)
class StoredInputs:
    """One tensor name's inputs as read, before the checks and the conversion to compute dtype:
    the arguments of :func:`run_strategy` that :func:`collect_statistics` and
    :func:`prepare_inputs` take as one value (fields as there)."""

    name: str
    base: torch.Tensor | None
    tensors: Sequence[torch.Tensor]
    contribution_ids: Sequence[str]
    weights: Sequence[float]
    rng: RandomStream
    compute_dtype: torch.dtype = torch.float32
    owned: bool = False
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None = None


def _prepare(
    strategy: Strategy,
    stored: StoredInputs,
    *,
    model: Any = None,
    side: dict[str, torch.Tensor] | None = None,
) -> tuple[TensorInputs | None, torch.Tensor, torch.dtype]:
    """Check and convert the inputs of one tensor name (the base dropped when the strategy
    ignores it): (inputs or None when the tensor passes through unchanged, the source tensor
    (base, else first contribution), storage dtype).  The one input path of
    :func:`run_strategy`, :func:`collect_statistics` and :func:`prepare_inputs`."""
    name, tensors, compute_dtype = stored.name, stored.tensors, stored.compute_dtype
    owned, contribution_ids, weights = stored.owned, stored.contribution_ids, stored.weights
    base = None if strategy.base == "ignored" else stored.base
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
    for kind, items in (stored.extras or {}).items():
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
        rng=stored.rng,
        extras=converted_extras,
        model=model,
        side=side,
    )
    return inputs, source, source.dtype


@contextmanager
def _naming(strategy: Strategy) -> Iterator[None]:
    """Put the strategy's name in front of a :class:`CpuError` from the numerics (they cannot
    know which strategy called them)."""
    try:
        yield
    except CpuError as exc:
        raise CpuError(f"strategy {strategy.name}: {exc}") from None


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
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor: tensors in their storage dtype in, one tensor in storage dtype out.

    ``params`` are the output of :func:`resolve_params`.  The output dtype of a floating tensor
    is ``output_dtype`` when given, else the base's when the strategy uses a base, else the
    first contribution's (canonical order); inputs of other float dtypes are cast on
    conversion to ``compute_dtype``.  Non-floating tensors
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
    if strategy.model_pass is not None and model is None:
        raise ResolveError(
            f"strategy {strategy.name} needs its whole-model statistics pass before merging"
        )
    if layered.has_per_tensor(params):  # the caller evaluates them: layered.for_tensor
        raise ResolveError(f"strategy {strategy.name}: per-tensor parameters not evaluated")
    stored = StoredInputs(
        name, base, tensors, contribution_ids, weights, rng, compute_dtype, owned, extras
    )
    inputs, source, storage_dtype = _prepare(
        strategy,
        stored,
        model=None if model is None else model.per_tensor.get(name),
        side={} if side is not None and strategy.side_output is not None else None,
    )
    if inputs is None:
        return source.clone()
    if output_dtype is not None:
        storage_dtype = output_dtype
    # factory calls inside strategies and numerics (zeros, empty, tensor ...) allocate on the
    # inputs' device, so that --device cuda runs the same code
    with numerics.on_device(source.device), _naming(strategy):
        merged = strategy.merge(inputs, params)
    if side is not None and inputs.side:
        for key in sorted(inputs.side):
            if key in side:
                raise ResolveError(f"strategy {strategy.name}: side tensor {key!r} given twice")
            side[key] = from_compute(inputs.side[key], storage_dtype)
    return from_compute(merged.reshape(source.shape), storage_dtype)


def collect_statistics(strategy: Strategy, stored: StoredInputs, params: Mapping[str, Any]) -> Any:
    """The statistics-pass summary of one tensor name (None for tensors that pass through
    unchanged: integers and empty tensors).  Same inputs and checks as :func:`run_strategy`."""
    if strategy.model_pass is None:
        raise ResolveError(f"strategy {strategy.name} has no statistics pass")
    inputs, _, _ = _prepare(strategy, stored)
    if inputs is None:
        return None
    with (
        numerics.on_device(inputs.tensors[0].device if inputs.tensors else "cpu"),
        _naming(strategy),
    ):
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


def prepare_inputs(strategy: Strategy, stored: StoredInputs) -> TensorInputs | None:
    """The checked :class:`TensorInputs` of one tensor name, copies in compute dtype that the
    caller may keep (None for a tensor that passes through: integers, empty)."""
    inputs, _, _ = _prepare(strategy, replace(stored, owned=False))
    if inputs is not None and inputs.base is not None and inputs.base is stored.base:
        inputs = replace(inputs, base=inputs.base.clone())
    return inputs
