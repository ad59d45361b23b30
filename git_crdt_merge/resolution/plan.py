"""The resolution plan: the strategy, parameters, descriptors and tensor table of a set.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ResolveError
from ..replicated import alignment
from ..replicated.descriptor import Descriptor, TensorEntry
from ..replicated.manifest import Manifest
from ..replicated.reader import read_descriptor
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH
from ..strategies import layered, registry
from ..vocabulary import OUTPUT_DTYPES
from . import align


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * int(torch.empty((), dtype=NAME_TO_TORCH[self.dtype]).element_size())


@dataclass
class Plan:
    """Everything resolution needs, read from the manifest and descriptors."""

    root: str
    strategy: registry.Strategy
    params: dict[str, Any]
    raw_params: dict[str, Any]
    contributions: list[tuple[str, str]]
    descriptors: list[Descriptor]
    base_id: str | None
    base: Descriptor | None  # None when there is no base or the strategy ignores it
    specs: list[TensorSpec]
    files: dict[str, str]  # config and tokenizer files to copy: the base's, else the first's
    # (input index, tensor name) -> the tensor that input gives for it (a tied head's
    # embedding); inputs are the contributions in canonical order, then the base
    stand_ins: dict[tuple[int, str], str] = field(default_factory=dict)
    layers: int = 0  # layers in the model (1 + largest layer index): per-tensor parameters

    def tensor_params(self, name: str) -> dict[str, Any]:
        """The parameters of tensor ``name``: gradients and filters evaluated
        (:mod:`..strategies.layered`); the plain parameters themselves when there are none."""
        if not layered.has_per_tensor(self.params):
            return self.params
        return layered.for_tensor(self.params, name, self.layers)

    @property
    def weights(self) -> list[float]:
        return [d.weight for d in self.descriptors]

    def entry(self, index: int, name: str) -> TensorEntry:
        """Input ``index``'s tensor for output tensor ``name`` (contributions in canonical
        order, then the base at ``len(descriptors)``)."""
        desc = self.base if index == len(self.descriptors) else self.descriptors[index]
        assert desc is not None
        return desc.tensors[self.stand_ins.get((index, name), name)]

    def largest_input(self) -> int:
        """Bytes of the largest tensor any input gives or the output has: one slot's size."""
        inputs = [*self.descriptors, *([self.base] if self.base is not None else [])]
        return max(
            [s.nbytes for s in self.specs]
            + [self.entry(i, s.name).nbytes for i in range(len(inputs)) for s in self.specs],
            default=0,
        )

    def extra_infos(self, name: str) -> dict[str, list[TensorEntry | None]]:
        """Per extra-input kind the strategy reads: each contribution's table entry for tensor
        ``name`` (None where it has none)."""
        return {
            kind: [d.extra(kind, name) for d in self.descriptors]
            for kind in self.strategy.extra_inputs
        }

    def largest_extra(self) -> int:
        return max(
            (
                info.nbytes
                for d in self.descriptors
                for kind in self.strategy.extra_inputs
                for info in d.extras.get(kind, {}).values()
            ),
            default=0,
        )


def _output_specs(
    store: ObjectStore,
    source: Descriptor,
    source_what: str,
    inputs: list[tuple[Descriptor, str]],
    output_dtype: str | None,
) -> tuple[list[TensorSpec], dict[tuple[int, str], str]]:
    """The output's tensor table (the source's names; shapes and dtypes by the rules of
    :mod:`.align`) and the stand-ins: (input index, name) -> the tensor read instead (a tied
    head's embedding).  Refuses, in one line naming the tensor, what no rule absorbs."""
    names = set(source.tensors)
    stand_ins: dict[tuple[int, str], str] = {}
    for index, (desc, what) in enumerate(inputs):
        align.refuse_extra_head(desc, names, what, source_what)
        for name in sorted(names):
            read = align.stand_in(store, desc, name, what)
            if read != name:
                stand_ins[index, name] = read
    specs = []
    for name in sorted(names):
        src = source.tensors[name]
        entries = [
            desc.tensors[stand_ins.get((i, name), name)] for i, (desc, _) in enumerate(inputs)
        ]
        for entry, (_, what) in zip(entries, inputs, strict=True):
            why = alignment.difference(
                name, (src.dtype, src.shape), (entry.dtype, entry.shape), source_what, what
            )
            if why is not None:
                raise ResolveError(why)
        shape = align.output_shape([src.shape, *(e.shape for e in entries)])
        floating = src.dtype in alignment.FLOAT_DTYPES
        if len({src.shape, *(e.shape for e in entries)}) > 1 and not floating:
            raise ResolveError(
                f"tensor {name!r}: a resized vocabulary must be floating, not {src.dtype}"
            )
        dtype = OUTPUT_DTYPES[output_dtype] if output_dtype and floating else src.dtype
        specs.append(TensorSpec(name, dtype, shape))
    return specs, stand_ins


def make_plan(store: ObjectStore, manifest: Manifest) -> Plan:
    contributions = manifest.visible_contributions()
    strategy_value = manifest.strategy()
    strategy = registry.get_strategy(strategy_value["name"])
    base_id = manifest.base()
    registry.check_contract(strategy, len(contributions), base_id is not None)
    params = registry.resolve_params(strategy, strategy_value["params"], contributions)
    descriptors = [read_descriptor(store, manifest, cid) for cid, _ in contributions]
    base_desc = read_descriptor(store, manifest, base_id) if base_id is not None else None
    files = dict((base_desc or descriptors[0]).files)
    base = None if strategy.base == "ignored" else base_desc
    inputs = [
        (desc, f"contribution {name!r} ({cid[:12]})")
        for (cid, name), desc in zip(contributions, descriptors, strict=True)
    ]
    if base is not None:
        source, source_what = base, "the base"
    else:
        (source, source_what), inputs = inputs[0], inputs[1:]
    specs, stand_ins = _output_specs(store, source, source_what, inputs, manifest.output_dtype())
    if base is None:  # the first contribution is the source: the others' indices shift
        stand_ins = {(i + 1, n): r for (i, n), r in stand_ins.items()}
    registry.check_weights(strategy, [d.weight for d in descriptors], contributions)
    kinds = {d.kind for d in descriptors}
    if len(kinds) > 1:
        raise ResolveError(f"contributions mix kinds {sorted(kinds)}; merge like with like")
    for kind in strategy.needed_extras(params):
        for (cid, cname), desc in zip(contributions, descriptors, strict=True):
            if kind not in desc.extras:
                raise ResolveError(
                    f"strategy {strategy.name} needs a {kind} extra input, but contribution "
                    f"{cname!r} ({cid[:12]}) has none; add it again with 'git crdt "
                    f"add-contribution PATH --{kind} FILE.safetensors'"
                )
    plan = Plan(
        manifest.merkle_root(),
        strategy,
        params,
        dict(strategy_value["params"]),
        contributions,
        descriptors,
        base_id,
        base,
        specs,
        files,
        stand_ins,
        layered.layer_count(s.name for s in specs),
    )
    if strategy.extra_inputs:
        count = len(descriptors) + (base is not None)
        for spec in specs:
            if any(list(plan.entry(i, spec.name).shape) != spec.shape for i in range(count)):
                raise ResolveError(
                    f"strategy {strategy.name} reads extra inputs, which a resized tensor "
                    f"({spec.name!r}) cannot have: merge it with a strategy without them"
                )
    return plan
