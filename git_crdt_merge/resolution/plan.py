"""The resolution plan: the strategy, parameters, descriptors and tensor table of a set.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ResolveError
from ..replicated import adapters, alignment, formats
from ..replicated.descriptor import Descriptor, TensorEntry
from ..replicated.manifest import Manifest
from ..replicated.reader import read_descriptor
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH
from ..strategies import layered, registry
from ..vocabulary import OUTPUT_DTYPES
from . import align
from .lowrank import LowRank

CARD = "README.md"  # the generated model card of the output


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
    files: dict[str, tuple[str, str]]  # file name -> (object id, where from): output_files
    left_out: list[str]  # the inputs' files the output does not get, one line each
    lowrank: LowRank | None = None  # the LoRA adapters of the set (None: full models only)
    config_from: str | None = None
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
        full = [  # a LoRA adapter's input is made in its own buffers (lowrank.DeltaSlots)
            i
            for i in range(len(inputs))
            if self.lowrank is None or i >= len(self.descriptors) or self.lowrank.modules[i] is None
        ]
        return max(
            [s.nbytes for s in self.specs]
            + [self.entry(i, s.name).nbytes for i in full for s in self.specs],
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


def output_files(
    base: tuple[str, Descriptor] | None,
    contributions: list[tuple[str, str, Descriptor]],
    config_from: str | None,
    adapter_output: bool,
    base_id: str | None = None,
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Which non-weight files the output gets: (file name -> (object id, where from), what
    is left out, one line each).  ``base``: (label, descriptor); ``contributions``: (id,
    label, descriptor) in canonical order.

    - the config (``config.json``, ``generation_config.json``) and the tokenizer files each
      come whole from one source: the contribution named by the ``config_from`` register, else
      the first of the base and the contributions (canonical order) that has any of them;
    - every other file of the base is copied (code files exist there only when the user
      passed ``--include-code`` to ``set-base``), except its ``README.md``, which the model
      card replaces, and ``adapter_config.json``;
    - an adapter output gets no config (PEFT reads its ``adapter_config.json``).

    Everything else the inputs hold is listed as left out."""
    if config_from is not None:
        chosen = [(lab, d) for cid, lab, d in contributions if cid == config_from]
        if not chosen and base is not None and config_from == base_id:
            chosen = [base]
        if not chosen:
            raise ResolveError(
                f"register config_from names {config_from[:12]}, which is not a visible "
                "contribution; set it again with 'git crdt output --config-from NAME'"
            )
        candidates = chosen
    else:
        candidates = ([base] if base is not None else []) + [
            (lab, d) for _, lab, d in contributions
        ]
    files: dict[str, tuple[str, str]] = {}
    groups = (
        [formats.TOKENIZER_FILES]
        if adapter_output
        else [formats.CONFIG_FILES, formats.TOKENIZER_FILES]
    )
    for group in groups:
        for label, desc in candidates:
            found = {n: oid for n, oid in desc.files.items() if n in group}
            if found:
                files.update({n: (oid, label) for n, oid in found.items()})
                break
    left_out: list[str] = []
    if base is not None:
        label, desc = base
        for name, oid in sorted(desc.files.items()):
            if name in files or name in formats.CONFIG_FILES or name in formats.TOKENIZER_FILES:
                continue
            if name.casefold() == CARD.casefold():
                left_out.append(f"{name} of {label} (the generated model card replaces it)")
            elif name == adapters.ADAPTER_CONFIG:
                continue
            else:
                files[name] = (oid, label)
    for label, desc in ([base] if base is not None else []) + [
        (lab, d) for _, lab, d in contributions
    ]:
        for name in sorted(desc.files):
            if files.get(name, ("", ""))[1] == label or name == adapters.ADAPTER_CONFIG:
                continue
            if base is not None and label == base[0] and name.casefold() == CARD.casefold():
                continue  # listed above
            left_out.append(f"{name} of {label}")
    return dict(sorted(files.items())), left_out


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
    labels = [f"contribution {name!r} ({cid[:12]})" for cid, name in contributions]
    members, problems = adapters.members(
        store, base_desc, list(zip(labels, descriptors, strict=True))
    )
    adapter_rank = manifest.adapter_rank()
    problems += adapters.set_problems(
        base_desc,
        members,
        base_used=strategy.base != "ignored",
        adapter_output=adapter_rank is not None,
    )
    if problems:
        raise ResolveError(problems[0])
    lowrank = None
    if any(m.adapter is not None for m in members):
        assert base_desc is not None  # set_problems: adapters need a base
        first = next(m.adapter for m in members if m.adapter is not None)
        lowrank = LowRank(
            base_desc,
            descriptors,
            [None if m.adapter is None else m.adapter[1] for m in members],
            first[0].raw,
            adapter_rank,
        )
    base = None if strategy.base == "ignored" else base_desc
    stand_ins: dict[tuple[int, str], str] = {}
    if lowrank is not None:  # the base's table: adapters.set_problems checked the adapters
        assert base_desc is not None
        output_dtype = manifest.output_dtype()
        specs = [
            TensorSpec(
                name,
                OUTPUT_DTYPES[output_dtype]
                if output_dtype and t.dtype in alignment.FLOAT_DTYPES
                else t.dtype,
                list(t.shape),
            )
            for name, t in sorted(base_desc.tensors.items())
        ]
    else:
        inputs = list(zip(descriptors, labels, strict=True))
        if base is not None:
            source, source_what = base, "the base"
        else:
            (source, source_what), inputs = inputs[0], inputs[1:]
        specs, stand_ins = _output_specs(
            store, source, source_what, inputs, manifest.output_dtype()
        )
        if base is None:  # the first contribution is the source: the others' indices shift
            stand_ins = {(i + 1, n): r for (i, n), r in stand_ins.items()}
    registry.check_weights(strategy, [d.weight for d in descriptors], contributions)
    for kind in strategy.needed_extras(params):
        for (cid, cname), desc in zip(contributions, descriptors, strict=True):
            if kind not in desc.extras:
                raise ResolveError(
                    f"strategy {strategy.name} needs a {kind} extra input, but contribution "
                    f"{cname!r} ({cid[:12]}) has none; add it again with 'git crdt "
                    f"add-contribution PATH --{kind} FILE.safetensors'"
                )
    base_label = f"the base ({base_id[:12]})" if base_id is not None else ""
    files, left_out = output_files(
        None if base_desc is None else (base_label, base_desc),
        [
            (cid, label, d)
            for (cid, _), label, d in zip(contributions, labels, descriptors, strict=True)
        ],
        manifest.config_from(),
        adapter_rank is not None,
        base_id,
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
        left_out,
        lowrank,
        manifest.config_from(),
        stand_ins,
        layered.layer_count(s.name for s in specs),
    )
    if strategy.extra_inputs and lowrank is None:
        count = len(descriptors) + (base is not None)
        for spec in specs:
            if any(list(plan.entry(i, spec.name).shape) != spec.shape for i in range(count)):
                raise ResolveError(
                    f"strategy {strategy.name} reads extra inputs, which a resized tensor "
                    f"({spec.name!r}) cannot have: merge it with a strategy without them"
                )
    return plan
