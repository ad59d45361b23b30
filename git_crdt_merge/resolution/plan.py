"""The resolution plan: the strategy, parameters, descriptors and tensor table of a set.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ResolveError
from ..replicated.descriptor import Descriptor, TensorEntry
from ..replicated.manifest import Manifest
from ..replicated.reader import read_descriptor
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH
from ..strategies import layered, registry


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


def _check_compatible(specs: dict[str, TensorSpec], desc: Descriptor, what: str) -> None:
    tensors = desc.tensors
    if set(tensors) != set(specs):
        missing = sorted(set(specs) - set(tensors))
        extra = sorted(set(tensors) - set(specs))
        detail = f"lacks {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
        raise ResolveError(
            f"{what} {detail}: all contributions and the base must have the same tensor names"
        )
    for name, spec in specs.items():
        t = tensors[name]
        if list(t.shape) != spec.shape:
            raise ResolveError(
                f"{what}: tensor {name!r} has shape {list(t.shape)}, expected {spec.shape}"
            )
        if t.dtype != spec.dtype:
            raise ResolveError(
                f"{what}: tensor {name!r} has dtype {t.dtype}, expected {spec.dtype}"
            )


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
    first = base if base is not None else descriptors[0]
    specs = {name: TensorSpec(name, t.dtype, list(t.shape)) for name, t in first.tensors.items()}
    for (cid, name), desc in zip(contributions, descriptors, strict=True):
        _check_compatible(specs, desc, f"contribution {name} ({cid[:12]})")
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
    return Plan(
        manifest.merkle_root(),
        strategy,
        params,
        dict(strategy_value["params"]),
        contributions,
        descriptors,
        base_id,
        base,
        [specs[n] for n in sorted(specs)],
        files,
        layered.layer_count(specs),
    )
