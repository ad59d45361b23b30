"""LoRA adapters (PEFT): which base tensor each factor pair changes, by how much (no torch).

A PEFT LoRA adapter is a folder with ``adapter_model.safetensors`` (the factors) and
``adapter_config.json`` (rank ``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``,
``target_modules``, ``base_model_name_or_path``).  For every target module the adapter holds
``A`` (r, in) and ``B`` (out, r), saved as ``base_model.model.<module>.lora_A.weight`` and
``...lora_B.weight`` (embeddings: ``lora_embedding_A`` (r, rows) and ``lora_embedding_B``
(cols, r)).  The fine-tuned model it stands for is ``W + delta`` with::

    delta = scaling * B @ A            (transposed for fan_in_fan_out layers and embeddings)
    scaling = lora_alpha / r           (use_rslora: lora_alpha / sqrt(r))

This module reads that description and checks it against the base's tensor table and
against the other adapters of a set; Layer 2 (``resolution/lowrank.py``) computes the
deltas.

DoRA (``use_dora``) adapters also hold a magnitude vector ``m`` per module
(``<module>.lora_magnitude_vector``, one value per row of ``B``); the model they stand for is
PEFT's merged weight: with ``V = W + delta`` taken in the adapter's orientation (rows are
``B``'s rows: a linear layer's outputs, an embedding's dimensions)::

    W' = (m / ||V||_row) * V           (the L2 norm of each row of V, over A's columns)

What cannot be merged exactly is refused in one line: other PEFT methods, biases,
``modules_to_save``, per-module ``alpha_pattern``, a magnitude vector without ``use_dora``
(or the reverse) and DoRA on layers whose factors are not matrices (convolutions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CrdtError, InputError
from .checks import TensorTable, table_differences
from .descriptor import Descriptor
from .store import ObjectStore

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
PEFT_PREFIX = "base_model.model."
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# factor key suffix -> (factor, is an embedding)
_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA: one vector per module
KIND_FULL = "full"
KIND_LORA = "lora"


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide the deltas."""

    rank: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: bool  # per-module ranks (then each module's rank is its A's row count)
    base_model: str | None
    raw: Mapping[str, Any]
    dora: bool = False  # use_dora: every module has a magnitude vector

    def scaling(self, rank: int) -> float:
        """PEFT's scaling of ``B @ A`` for a module of rank ``rank`` (the same Python float
        arithmetic as PEFT: one correctly rounded division, and sqrt)."""
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank


@dataclass(frozen=True)
class LoraModule:
    """One target module of an adapter: ``delta(target) = scaling * B @ A`` (transposed when
    ``transpose``), of shape ``shape``."""

    target: str
    module: str  # the module path in the adapter (without PEFT's prefix)
    a: str
    b: str
    rank: int
    scaling: float
    transpose: bool
    shape: tuple[int, int]
    magnitude: str | None = None  # DoRA: the magnitude vector's tensor (len = B's rows)


def parse_config(data: bytes, where: str) -> AdapterConfig:
    """The LoRA fields of an ``adapter_config.json``; anything that cannot be merged exactly
    is an :class:`InputError` naming it."""
    if len(data) > MAX_CONFIG_BYTES:
        raise InputError(f"{where}: {ADAPTER_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{where}: {ADAPTER_CONFIG} is not JSON") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(f"{where}: PEFT type {peft_type!r} is not supported (only LORA)")
    if raw.get("bias", "none") != "none":
        raise InputError(f"{where}: LoRA with bias={raw['bias']!r} is not supported (only none)")
    if raw.get("alpha_pattern"):
        raise InputError(f"{where}: per-module alpha_pattern is not supported")
    if raw.get("modules_to_save"):
        raise InputError(f"{where}: modules_to_save is not supported (only LoRA factors)")
    rank, alpha = raw.get("r"), raw.get("lora_alpha", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1 << 20:
        raise InputError(f"{where}: r must be a positive integer, got {rank!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or abs(alpha) > 1e9
    ):
        raise InputError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(raw.get(key, False), bool):
            raise InputError(f"{where}: {key} must be true or false")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(
        rank,
        float(alpha),
        bool(raw.get("use_rslora", False)),
        bool(raw.get("fan_in_fan_out", False)),
        bool(raw.get("rank_pattern")),
        base if isinstance(base, str) and base else None,
        raw,
        bool(raw.get("use_dora", False)),
    )


def _target(module: str, base_names: Collection[str] | None) -> str:
    """The base tensor a module changes: ``<module>.weight``; where the base names its
    tensors without the model's first component (GPT-2 checkpoints without ``transformer.``),
    that name."""
    name = f"{module}.weight"
    if base_names is None or name in base_names:
        return name
    short = name.split(".", 1)[-1]
    return short if short in base_names else name


def modules(
    config: AdapterConfig,
    table: TensorTable,
    where: str,
    base_names: Collection[str] | None = None,
) -> dict[str, LoraModule]:
    """target tensor name -> :class:`LoraModule` of an adapter whose tensors are ``table``."""
    pairs: dict[str, dict[str, tuple[str, bool]]] = {}
    magnitudes: dict[str, str] = {}
    for name in sorted(table):
        for suffix, (factor, embedding) in _SUFFIXES.items():
            if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
                module = name[len(PEFT_PREFIX) : -len(suffix)]
                pairs.setdefault(module, {})[factor] = (name, embedding)
                break
        else:
            if name.startswith(PEFT_PREFIX) and name.endswith(MAGNITUDE_SUFFIX):
                if not config.dora:
                    raise InputError(
                        f"{where}: tensor {name!r} is a DoRA magnitude vector, but "
                        f"{ADAPTER_CONFIG} does not set use_dora"
                    )
                magnitudes[name[len(PEFT_PREFIX) : -len(MAGNITUDE_SUFFIX)]] = name
                continue
            raise InputError(
                f"{where}: tensor {name!r} is not a LoRA factor (lora_A / lora_B); biases, "
                "modules_to_save and other PEFT methods are not supported"
            )
    out: dict[str, LoraModule] = {}
    for module, found in sorted(pairs.items()):
        if set(found) != {"a", "b"} or found["a"][1] != found["b"][1]:
            raise InputError(f"{where}: module {module!r} lacks its lora_A or lora_B factor")
        (a, embedding), (b, _) = found["a"], found["b"]
        (da, sa), (db, sb) = table[a], table[b]
        if da not in FLOAT_DTYPES or db not in FLOAT_DTYPES:
            raise InputError(f"{where}: module {module!r} has factors of dtype {da}/{db}")
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1] or sa[0] < 1:
            raise InputError(
                f"{where}: module {module!r}: A {list(sa)} and B {list(sb)} are not the "
                "factors of one rank"
            )
        rank = sa[0]
        if not config.rank_pattern and rank != config.rank:
            raise InputError(
                f"{where}: module {module!r} has rank {rank}, its {ADAPTER_CONFIG} says r="
                f"{config.rank}"
            )
        transpose = embedding or config.fan_in_fan_out
        shape = (sa[1], sb[0]) if transpose else (sb[0], sa[1])
        magnitude = _magnitude(config, magnitudes.pop(module, None), table, module, sb[0], where)
        target = _target(module, base_names)
        if target in out:
            raise InputError(f"{where}: two modules change base tensor {target!r}")
        scaling = config.scaling(rank)
        out[target] = LoraModule(target, module, a, b, rank, scaling, transpose, shape, magnitude)
    if magnitudes:
        raise InputError(
            f"{where}: DoRA magnitude vector {sorted(magnitudes.values())[0]!r} has no lora_A / "
            "lora_B factors beside it (DoRA on a layer type that is not supported?)"
        )
    if not out:
        raise InputError(f"{where}: holds no LoRA factors")
    return out


def _magnitude(
    config: AdapterConfig,
    name: str | None,
    table: TensorTable,
    module: str,
    rows: int,
    where: str,
) -> str | None:
    """A DoRA module's magnitude vector (checked: one float per row of ``B``)."""
    if not config.dora:
        return None
    if name is None:
        raise InputError(
            f"{where}: DoRA module {module!r} has no lora_magnitude_vector (use_dora is set)"
        )
    dtype, shape = table[name]
    if dtype not in FLOAT_DTYPES or tuple(shape) != (rows,):
        raise InputError(
            f"{where}: DoRA module {module!r}: magnitude vector is {dtype} {list(shape)}, "
            f"expected one float per row of lora_B ({rows})"
        )
    return name


def base_problems(mods: Mapping[str, LoraModule], base: TensorTable, where: str) -> list[str]:
    """How an adapter's target modules disagree with the base's tensors (empty: it fits)."""
    out = []
    for target, mod in sorted(mods.items()):
        if target not in base:
            out.append(
                f"{where}: target module {mod.module!r} has no tensor {target!r} in the base"
            )
        elif tuple(base[target][1]) != mod.shape:
            out.append(
                f"{where}: module {mod.module!r} changes a {list(mod.shape)} weight, the base's "
                f"{target!r} is {list(base[target][1])} (an adapter of another base model?)"
            )
        elif base[target][0] not in FLOAT_DTYPES:
            out.append(f"{where}: base tensor {target!r} is {base[target][0]}, not a float")
        if len(out) >= 10:
            break
    return out


def pair_problems(
    a: tuple[AdapterConfig, Mapping[str, LoraModule]],
    b: tuple[AdapterConfig, Mapping[str, LoraModule]],
    what_a: str,
    what_b: str,
) -> list[str]:
    """Two adapters of one set: the same base model (when both name one) and the same
    target modules."""
    (ca, ma), (cb, mb) = a, b
    out = []
    if ca.base_model and cb.base_model and ca.base_model != cb.base_model:
        out.append(
            f"{what_a} adapts base model {ca.base_model!r}, {what_b} adapts {cb.base_model!r}"
        )
    mods_a = {m.module for m in ma.values()}
    mods_b = {m.module for m in mb.values()}
    if mods_a != mods_b:
        only = sorted(mods_a - mods_b) or sorted(mods_b - mods_a)
        side = what_a if mods_a - mods_b else what_b
        out.append(
            f"{side} targets module {only[0]!r} that the other does not: adapters of one set "
            "must target the same modules"
        )
    return out


@dataclass(frozen=True)
class Member:
    """One input of a set, as the compatibility check sees it."""

    label: str
    desc: Descriptor
    adapter: tuple[AdapterConfig, dict[str, LoraModule]] | None = None


def set_problems(
    base: Descriptor | None,
    members: Sequence[Member],
    *,
    base_used: bool,
    adapter_output: bool = False,
    require_base: bool = True,
) -> list[str]:
    """Every reason the set ``members`` (canonical order, adapters already read with the
    base's names) over ``base`` cannot be resolved: the one rule that ``resolve`` (the plan)
    and ``verify`` both apply, so verify passes exactly the sets that resolve.

    Full models match the base's tensor table (or, when the strategy ignores the base and
    no adapter needs it, the first full model's); adapters need a full base, fit its tensors,
    and share the first adapter's base model and target modules.  ``adapter_output``: the
    result is written as an adapter, so every member must be one.  ``require_base=False``
    (at add time, before any base is set) skips the rule that adapters need a base."""
    out: list[str] = []
    fulls = [m for m in members if m.adapter is None]
    lora = [m for m in members if m.adapter is not None]
    if lora and base is None and require_base:
        return [
            f"{lora[0].label} is a LoRA adapter: set a full base model with 'git crdt set-base'"
        ]
    if base is not None and base.kind != KIND_FULL and (lora or base_used):
        return [f"the base is a {base.kind} model; a base must be full weights"]
    if adapter_output and fulls:
        return [f"{fulls[0].label} is full weights: the adapter output needs LoRA adapters only"]
    ref: tuple[TensorTable, str] | None = None
    if base is not None and (base_used or lora):
        ref = (_table(base), "the base")
    elif fulls:
        ref = (_table(fulls[0].desc), fulls[0].label)
        fulls = fulls[1:]
    if ref is not None:
        for m in fulls:
            out += table_differences(_table(m.desc), ref[0], m.label, ref[1])
    if base is not None and lora:
        table = _table(base)
        first = lora[0]
        for m in lora:
            assert m.adapter is not None and first.adapter is not None
            out += base_problems(m.adapter[1], table, m.label)
            if m is not first:
                out += pair_problems(m.adapter, first.adapter, m.label, first.label)
    return out


def _table(desc: Descriptor) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (t.dtype, t.shape) for n, t in desc.tensors.items()}


def read_adapter(
    store: ObjectStore, desc: Descriptor, where: str, base_names: Collection[str] | None
) -> tuple[AdapterConfig, dict[str, LoraModule]]:
    """The config (read from the store, bounded and checked) and modules of a LoRA
    contribution."""
    oid = desc.files.get(ADAPTER_CONFIG)
    if oid is None:
        raise InputError(f"{where}: a LoRA adapter without {ADAPTER_CONFIG}")
    config = parse_config(store.get(oid, verify=True, max_size=MAX_CONFIG_BYTES), where)
    return config, modules(config, _table(desc), where, base_names)


def members(
    store: ObjectStore, base: Descriptor | None, labelled: Sequence[tuple[str, Descriptor]]
) -> tuple[list[Member], list[str]]:
    """The members of a set (adapters read against the base's tensor names) and the problems
    met reading their adapter configs."""
    names = None if base is None else set(base.tensors)
    out: list[Member] = []
    problems: list[str] = []
    for label, desc in labelled:
        adapter = None
        if desc.kind == KIND_LORA:
            try:
                adapter = read_adapter(store, desc, label, names)
            except CrdtError as exc:
                problems.append(str(exc))
                continue
        out.append(Member(label, desc, adapter))
    return out, problems
