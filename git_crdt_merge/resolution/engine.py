"""Layer 2 engine: compute one merged model from the visible set, streamed tensor by tensor.

For every tensor name, in sorted order, the tensors of all visible contributions (canonical
order: by contribution id) and of the base are read from the object store, merged by the
strategy in the manifest, cast back to the contributions' dtype and appended to the output.
Only one tensor name is in memory at a time, so peak memory is about (K + 2) x the largest
tensor, whatever the model size.  A strategy may also emit side tensors (``Strategy.side_output``,
e.g. representation_surgery's per-task modules): they are streamed to a second safetensors
file of the same folder (:class:`SideFile`).  The result is written into the cache under the
Merkle root and published to the output folder (``cache``).  ``resolve`` drives it; this
module and its parts (:mod:`.plan`, :mod:`.buffers`, :mod:`.heap`, :mod:`.writer`) are the only
ones on that path that import torch.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import FORMAT_VERSION, __version__
from ..errors import ResolveError
from ..heap import bound_heap, release_free_heap
from ..numerics import COMPUTE_DTYPES, RandomStream, from_compute
from ..replicated import checks
from ..replicated.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..replicated.formats import MAX_AUX_BYTES
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH, TORCH_TO_NAME
from ..strategies import registry
from . import align, cache, card
from . import lowrank as lowrank_mod
from .buffers import InputSlots, load_inputs
from .cache import cache_key, seed_of
from .lowrank import DeltaSlots
from .plan import (
    Plan,
    TensorSpec,
    make_plan,  # noqa: F401 (re-exported)
)
from .writer import SideFile, SidePart, safetensors_header, shard_layout, shard_names, write_tensor


def merge_tensor(
    plan: Plan,
    spec: TensorSpec,
    store: ObjectStore,
    rng: RandomStream,
    compute: torch.dtype,
    device: str,
    slots: InputSlots,
    extra_slots: InputSlots | None = None,
    model: registry.ModelValues | None = None,
    side: SideFile | SidePart | None = None,
    deltas: DeltaSlots | None = None,
    keep_compute: bool = False,
) -> torch.Tensor:
    """Read every input of one tensor name and merge it; returns the storage dtype on CPU
    (``keep_compute``: the strategy's result before that last rounding, for the adapter
    output).

    The inputs live in ``slots`` and are overwritten by the next call: the result is written
    out before that (a strategy may return a view of an input, e.g. integer pass-through).
    Side tensors the strategy computed for this name are appended to ``side``.  Where every
    contribution is a LoRA adapter and none changes the tensor, it is the base's.  A result
    that is not finite from finite inputs is refused (:func:`_check_finite`).

    This is the whole per-tensor computation, and it depends only on the plan entry (never on
    what was resolved before it or where), so the serial loop of :func:`write_weights` and
    the workers of :mod:`.pool` give the same bytes."""
    extra_slots = extra_slots or InputSlots(0, 0)
    storage = NAME_TO_TORCH[spec.dtype]
    if plan.lowrank is not None and plan.lowrank.untouched(spec.name):
        kept = slots.load(len(plan.descriptors), store, plan.lowrank.base.tensors[spec.name])
        return kept if kept.dtype == storage else from_compute(kept, storage)
    base, tensors, extras = load_inputs(plan, spec, store, device, slots, extra_slots, deltas)
    if keep_compute and base is not None:  # the result in the compute dtype, not the base's
        base = base.to(compute)
    output_dtype = compute if keep_compute else storage
    tail = None
    if _resized(spec, base, tensors):  # a resized vocabulary (align): rows merged apart
        weights = plan.weights if plan.strategy.uses_weights else [1.0] * len(tensors)
        tensors, tail = align.split_rows(
            base, tensors, weights, spec.shape[0], compute, output_dtype
        )
    side_tensors: dict[str, torch.Tensor] | None = {} if side is not None else None
    out = registry.run_strategy(
        plan.strategy,
        spec.name,
        base,
        tensors,
        [cid for cid, _ in plan.contributions],
        plan.weights,
        plan.tensor_params(spec.name),  # per-tensor values evaluated for this name
        rng,
        compute,
        owned=True,
        extras=extras,
        model=model,
        side=side_tensors,
        output_dtype=output_dtype,
    )
    if tail is not None:
        out = torch.cat([out, tail.to(out.device)])
    if side is not None and side_tensors:
        for key, tensor in side_tensors.items():
            side.add(key, tensor.to("cpu"))
    if out.dtype != output_dtype:  # one rounding to the tensor's dtype
        out = from_compute(out, output_dtype)
    out = out.to("cpu")
    _check_finite(plan, spec, out, store, device, slots, deltas)
    return out


def _resized(spec: TensorSpec, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> bool:
    """Whether the inputs of ``spec`` differ in row count (a resized vocabulary)."""
    return any(list(t.shape) != spec.shape for t in (base, *tensors) if t is not None)


def _shared_rows(
    spec: TensorSpec, base: torch.Tensor | None, tensors: list[torch.Tensor], compute: torch.dtype
) -> list[torch.Tensor]:
    """For the statistics pass: the rows of a resized vocabulary the strategy merges."""
    if not _resized(spec, base, tensors):
        return tensors
    return align.split_rows(base, tensors, [1.0] * len(tensors), spec.shape[0], compute, compute)[0]


def statistics_pass(
    plan: Plan,
    store: ObjectStore,
    rng: RandomStream,
    compute: torch.dtype,
    device: str,
    slots: InputSlots,
    extra_slots: InputSlots,
    deltas: DeltaSlots | None = None,
) -> registry.ModelValues:
    """The strategy's whole-model pass: one tensor name at a time through the same slots as
    the merge (memory stays a few tensors), each reduced to a small summary at once."""
    summaries: dict[str, Any] = {}
    numels: dict[str, int] = {}
    ids = [cid for cid, _ in plan.contributions]
    for spec in plan.specs:
        base, tensors, extras = load_inputs(plan, spec, store, device, slots, extra_slots, deltas)
        tensors = _shared_rows(spec, base, tensors, compute)
        stored = registry.StoredInputs(
            spec.name, base, tensors, ids, plan.weights, rng, compute, owned=True, extras=extras
        )
        summaries[spec.name] = registry.collect_statistics(plan.strategy, stored, plan.params)
        numels[spec.name] = math.prod(spec.shape)
        del base, tensors, extras, stored
    by_name = {spec.name: spec for spec in plan.specs}

    def read(name: str) -> registry.TensorInputs:
        """One tensor name's inputs, copied out of the slots (for objective plugins)."""
        if name not in by_name:
            raise ResolveError(f"strategy {plan.strategy.name}: no tensor named {name!r}")
        base, tensors, extras = load_inputs(
            plan, by_name[name], store, device, slots, extra_slots, deltas
        )
        tensors = _shared_rows(by_name[name], base, tensors, compute)
        stored = registry.StoredInputs(
            name, base, tensors, ids, plan.weights, rng, compute, extras=extras
        )
        inputs = registry.prepare_inputs(plan.strategy, stored)
        if inputs is None:
            raise ResolveError(
                f"strategy {plan.strategy.name}: tensor {name!r} is not a floating tensor"
            )
        return inputs

    return registry.finish_statistics(
        plan.strategy,
        summaries,
        numels,
        ids,
        plan.weights,
        plan.params,
        rng,
        plan.base is not None,
        read,
    )


def lowrank_bytes(plan: Plan, largest: int, compute_dtype: str) -> int:
    """Memory the plan's LoRA deltas add to the slots, for the largest tensor of ``largest``
    elements (0 without adapters): :func:`lowrank.extra_bytes`."""
    return lowrank_mod.extra_bytes(plan.lowrank, largest, COMPUTE_DTYPES[compute_dtype])


def resolution_record(
    plan: Plan,
    compute_dtype: str,
    device: str,
    max_shard: int,
    statistics: dict[str, Any] | None = None,
    side_output: dict[str, Any] | None = None,
) -> dict[str, Any]:
    record = {
        "format": FORMAT_VERSION,
        "cache_key": cache_key(plan.root, compute_dtype, device, max_shard, plan.strategy.revision),
        "compute_dtype": compute_dtype,
        "device": device,
        "merkle_root": plan.root,
        "seed": seed_of(plan.root).hex(),
        "strategy": plan.strategy.name,
        "strategy_revision": plan.strategy.revision,
        "params": plan.raw_params,
        "base": plan.base_id,
        "contributions": [
            {"id": cid, "kind": d.kind, "name": name, "weight": w}
            for (cid, name), d, w in zip(
                plan.contributions, plan.descriptors, plan.weights, strict=True
            )
        ],
        "files": {
            "copied": {name: source for name, (_, source) in plan.files.items()},
            "left_out": plan.left_out,
        },
        "output": "adapter" if plan.lowrank is not None and plan.lowrank.rank else "full",
        "tool": f"git-crdt-merge {__version__}",
    }
    if plan.config_from is not None:
        record["config_from"] = plan.config_from
    if plan.lowrank is not None and plan.lowrank.rank is not None:
        record["adapter_rank"] = plan.lowrank.rank
    if statistics is not None:  # what the whole-model pass found (e.g. coefficients)
        record["statistics"] = statistics
    if side_output is not None:  # the strategy's second file of side tensors
        record["side_output"] = side_output
    return record


def compute(
    plan: Plan,
    store: ObjectStore,
    work: Path,
    settings: cache.Settings,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the merged model for ``plan`` into the empty folder ``work``: the weights (or,
    for LoRA adapters with an ``adapter_rank``, the adapter), the side files
    (:func:`copy_files`), the model card ``README.md`` and ``resolution.json``.

    With ``settings.workers`` > 1 the tensors are resolved by that many processes
    (:mod:`.pool`) after the statistics pass (run here, once, and sent to every worker; side
    tensors come back to ``side``, assembled here); a set with LoRA adapters runs in this
    process whatever ``workers`` says."""
    device, compute_dtype, max_shard = settings.device, settings.compute_dtype, settings.max_shard
    workers = settings.workers or 1
    if compute_dtype not in COMPUTE_DTYPES:
        raise ResolveError(f"compute dtype must be float32 or float64, not {compute_dtype!r}")
    compute = COMPUTE_DTYPES[compute_dtype]
    largest = plan.largest_input()
    bound_heap(largest)
    rng = RandomStream.from_seed(seed_of(plan.root))
    metadata = {"format": "pt", "merkle_root": plan.root}
    slots = InputSlots(len(plan.descriptors) + 1, largest)
    extra_slots = InputSlots(
        len(plan.descriptors) * len(plan.strategy.extra_inputs), plan.largest_extra()
    )
    deltas = None
    if plan.lowrank is not None:
        largest = max((math.prod(s.shape) for s in plan.specs), default=0)
        deltas = DeltaSlots(plan.lowrank, largest, compute)
    model = None
    if plan.strategy.model_pass is not None:
        model = statistics_pass(plan, store, rng, compute, device, slots, extra_slots, deltas)
    side = None
    if plan.strategy.side_output is not None:
        side = SideFile(work / plan.strategy.side_output)
    merge = functools.partial(
        merge_tensor,
        plan,
        store=store,
        rng=rng,
        compute=compute,
        device=device,
        slots=slots,
        extra_slots=extra_slots,
        model=model,
        side=side,
        deltas=deltas,
    )
    if plan.lowrank is not None and plan.lowrank.rank is not None:
        write_adapter(plan, work, merge, slots, store, metadata, progress)
    else:
        parallel = None
        if workers > 1 and plan.lowrank is None:
            from . import pool

            parallel = functools.partial(
                pool.write_shards,
                plan,
                store,
                work,
                metadata=metadata,
                model=model,
                side=side,
                compute_dtype=compute_dtype,
                device=device,
                workers=workers,
                progress=progress,
            )
        write_weights(
            plan, work, merge, max_shard, metadata, progress, device, store, slots, deltas, parallel
        )
    side_record = None if side is None else side.finish(metadata)
    copy_files(plan, store, work, side)
    record = resolution_record(
        plan,
        compute_dtype,
        device,
        max_shard,
        None if model is None else model.report,
        side_record,
    )
    (work / card.CARD).write_text(card.model_card(plan, record), encoding="utf-8")
    (work / cache.RESOLUTION_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_weights(
    plan: Plan,
    work: Path,
    merge: Callable[..., torch.Tensor],
    max_shard: int,
    metadata: dict[str, str],
    progress: Callable[[int], None] | None,
    device: str,
    store: ObjectStore,
    slots: InputSlots,
    deltas: DeltaSlots | None,
    parallel: Callable[[dict[str, list[TensorSpec]]], None] | None = None,
) -> None:
    """The merged weights: safetensors shards in name order (and their index), written here
    tensor by tensor, or by ``parallel`` (:func:`.pool.write_shards`: worker processes that
    write each tensor at its offset; the same bytes)."""
    layout = shard_layout(plan.specs, max_shard)
    names = shard_names(len(layout))
    serial = list(zip(names, layout, strict=True))
    if parallel is not None:
        parallel(dict(serial))
        serial = []  # every shard written by the workers
    for fname, specs in serial:
        with open(work / fname, "wb") as fh:
            fh.write(safetensors_header(specs, metadata))
            for spec in specs:
                out = merge(spec)
                write_tensor(fh, out, spec)
                del out
                release_free_heap()
                if progress is not None:
                    progress(spec.nbytes)
            fh.flush()
            os.fsync(fh.fileno())
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in plan.specs)},
            "weight_map": {
                s.name: n for n, specs in zip(names, layout, strict=True) for s in specs
            },
        }
        (work / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )


def write_adapter(
    plan: Plan,
    work: Path,
    merge: Callable[..., torch.Tensor],
    slots: InputSlots,
    store: ObjectStore,
    metadata: dict[str, str],
    progress: Callable[[int], None] | None,
) -> None:
    """The merge of LoRA adapters written as one adapter of rank ``lowrank.rank``: per target
    module, the merged delta re-factorised (:func:`lowrank.factorise`), then
    ``adapter_config.json``."""
    lowrank = plan.lowrank
    assert lowrank is not None and lowrank.rank is not None
    rank = lowrank.rank
    dtype = lowrank_mod.factor_dtype(lowrank)
    dname = TORCH_TO_NAME[dtype]
    by_name = {spec.name: spec for spec in plan.specs}
    mods = lowrank_mod.adapter_layout(lowrank)
    out_specs = []
    for mod in mods:
        p, q = (mod.shape[1], mod.shape[0]) if mod.transpose else mod.shape
        out_specs += [TensorSpec(mod.a, dname, [rank, q]), TensorSpec(mod.b, dname, [p, rank])]
    with open(work / ADAPTER_WEIGHTS, "wb") as fh:
        fh.write(safetensors_header(out_specs, metadata))
        for mod, a_spec, b_spec in zip(mods, out_specs[::2], out_specs[1::2], strict=True):
            spec = by_name[mod.target]
            merged = merge(spec, keep_compute=True)
            base = slots.load(len(plan.descriptors), store, lowrank.base.tensors[mod.target])
            a, b = lowrank_mod.factorise(merged, base, mod, rank)
            write_tensor(fh, from_compute(a, dtype), a_spec)
            write_tensor(fh, from_compute(b, dtype), b_spec)
            del merged, a, b
            release_free_heap()
            if progress is not None:
                progress(spec.nbytes)
        fh.flush()
        os.fsync(fh.fileno())
    (work / ADAPTER_CONFIG).write_bytes(lowrank_mod.adapter_config(lowrank, rank))


def copy_files(plan: Plan, store: ObjectStore, work: Path, side: SideFile | None) -> None:
    """The side files of ``plan.files`` (config, tokenizer, the base's other files), each
    checked against its object name and bounded, never over a file of ours."""
    for fname, (oid, _) in sorted(plan.files.items()):
        why = checks.file_name_problem(fname)
        if why is not None:  # the output's namespace is fixed: never a contribution's name
            raise ResolveError(f"the model's file {fname!r} {why}")
        if fname.casefold() in (card.CARD.casefold(), ADAPTER_CONFIG):
            raise ResolveError(f"the model's file {fname!r} is written by git-crdt-merge")
        if side is not None and fname == side.path.name:
            raise ResolveError(
                f"the model's file {fname!r} has the name of the side output of strategy "
                f"{plan.strategy.name}"
            )
        size = store.size(oid)
        if size is not None and size > MAX_AUX_BYTES:  # bounded, like at ingest
            raise ResolveError(f"the model's file {fname!r} is larger than {MAX_AUX_BYTES} bytes")
        try:
            with open(work / fname, "xb") as fh:  # exclusive: never over a file of ours
                fh.write(store.get(oid, verify=True, max_size=MAX_AUX_BYTES))
        except FileExistsError:
            raise ResolveError(f"the model's file {fname!r} is given twice") from None


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: on the CPU by the bit patterns (checks.count_nonfinite, about
    ten times faster than ``torch.isfinite`` on bf16 here), elsewhere with torch."""
    name = TORCH_TO_NAME.get(t.dtype)
    if t.device.type != "cpu" or name is None:
        return bool(torch.isfinite(t).all())
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return checks.count_nonfinite(name, memoryview(raw.data)) == 0


def _check_finite(
    plan: Plan,
    spec: TensorSpec,
    out: torch.Tensor,
    store: ObjectStore,
    device: str,
    slots: InputSlots,
    deltas: DeltaSlots | None = None,
) -> None:
    """A merged tensor of finite inputs must be finite: a weight or parameter inside its
    declared range can still overflow float32 for some values (weight x value > 3.4e38), and
    that must be an error, not a model full of Inf or NaN.  The inputs are read again only
    when the result is not finite (inputs with NaN, admitted by --allow-nonfinite, may give
    NaN)."""
    if not out.is_floating_point() or _all_finite(out):
        return
    base, tensors, _ = load_inputs(plan, spec, store, device, slots, InputSlots(0, 0), deltas)
    inputs = [t for t in (base, *tensors) if t is not None and t.is_floating_point()]
    if all(bool(torch.isfinite(t).all()) for t in inputs):
        bad = int(out.numel() - torch.isfinite(out).sum())
        raise ResolveError(
            f"strategy {plan.strategy.name} gives {bad} non-finite values in tensor "
            f"{spec.name!r} from finite inputs: a weight or parameter is too large for "
            f"{spec.dtype} (weights {', '.join(f'{w:g}' for w in plan.weights[:4])})"
        )
