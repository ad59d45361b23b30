"""The resolution plan: the strategy, parameters, descriptors and tensor table of a set.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ResolveError
from ..replicated import adapters, formats
from ..replicated.descriptor import Descriptor, TensorEntry
from ..replicated.manifest import Manifest
from ..replicated.reader import read_descriptor
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH
from ..strategies import registry
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
    first_desc = (
        base_desc if lowrank is not None else (base if base is not None else descriptors[0])
    )
    assert first_desc is not None
    specs = {
        name: TensorSpec(name, t.dtype, list(t.shape)) for name, t in first_desc.tensors.items()
    }
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
        left_out,
        lowrank,
        manifest.config_from(),
    )
