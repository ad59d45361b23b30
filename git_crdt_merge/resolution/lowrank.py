"""LoRA contributions in resolution: each adapter is the model it stands for, ``base + delta``.

For every tensor name, an adapter's input to the strategy is ``W + scaling * B @ A``
(transposed for ``fan_in_fan_out`` layers and embeddings, :mod:`replicated.adapters`),
computed in float64 (``numerics.matmul``: one thread, exact products) while the tensor
streams, then rounded once to the compute dtype.  So every strategy merges the adapters'
deltas as task vectors over the base, never their factors; a tensor that no adapter changes
is the base's (all task vectors are zero there).  The product's buffers (one float64 tensor,
one compute-dtype input per adapter, the factors) are counted by :func:`extra_bytes`.

DoRA modules (:func:`dora_`): ``V = W + scaling * B @ A`` in float64, in the adapter's
orientation; each row's norm is ``sqrt`` of its exact dot product with itself
(``numerics.dot_rows``: float64 products, one correctly rounded sum, so the norm does not
depend on threads or SIMD width); then ``V * (m / norm)`` row by row, every step one
correctly rounded float64 operation, and one rounding to the compute dtype.  PEFT's
``merge_and_unload`` computes the same weight in the adapter's dtype.

Output as an adapter (the ``adapter_rank`` register): the merged delta of each target,
``merged - W`` in float64, is re-factorised by a truncated SVD (``numerics.svd``: float64,
one thread, signs fixed), ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) Vh_k``, zero-padded to the
chosen rank, with ``lora_alpha = r`` (scaling 1) in the written ``adapter_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import numerics
from ..replicated.adapters import LoraModule
from ..replicated.descriptor import Descriptor, TensorEntry
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH
from .buffers import InputSlots


@dataclass
class LowRank:
    """The adapters of a plan: per contribution its modules (None: full weights), read
    against ``base``; ``rank``: write the result as an adapter of that rank."""

    base: Descriptor
    descriptors: list[Descriptor]  # the contributions, canonical order
    modules: list[dict[str, LoraModule] | None]
    adapter_config: Mapping[str, Any]  # the first adapter's config, for the adapter output
    rank: int | None = None

    @property
    def targets(self) -> list[str]:
        found: set[str] = set()
        for mods in self.modules:
            found |= set(mods or {})
        return sorted(found)

    @property
    def only_adapters(self) -> bool:
        return all(m is not None for m in self.modules)

    def untouched(self, name: str) -> bool:
        """Every contribution is an adapter and none changes ``name``: the result is the
        base's tensor."""
        return self.only_adapters and not any(name in (m or {}) for m in self.modules)

    def largest_factor(self) -> int:
        return max(
            (
                max(self._entry(i, m.a).nbytes, self._entry(i, m.b).nbytes)
                for i, mods in enumerate(self.modules)
                for m in (mods or {}).values()
            ),
            default=0,
        )

    def largest_magnitude(self) -> int:
        """Bytes of the largest DoRA magnitude vector (0: no DoRA module)."""
        return max(
            (
                self._entry(i, m.magnitude).nbytes
                for i, mods in enumerate(self.modules)
                for m in (mods or {}).values()
                if m.magnitude is not None
            ),
            default=0,
        )

    def dora_adapters(self) -> int:
        """How many contributions have DoRA modules."""
        return sum(
            any(m.magnitude is not None for m in mods.values())
            for mods in self.modules
            if mods is not None
        )

    def _entry(self, i: int, name: str) -> TensorEntry:
        return self.descriptors[i].tensors[name]


# dot_rows' working set (a chunk of float64 products and its exact sum's copy), at most
DOT_ROWS_SCRATCH = 2 * 8 * (1 << 18)


def extra_bytes(lowrank: LowRank | None, largest: int, compute: torch.dtype) -> int:
    """Memory the deltas add beside the engine's slots, for the largest base tensor of
    ``largest`` elements: one float64 product, one compute-dtype input per adapter, two
    factor buffers per adapter (and, for the adapter output, the SVD's float64 factors);
    with DoRA, a magnitude buffer per DoRA adapter, the float64 row norms and factors, and
    ``dot_rows``' bounded scratch."""
    if lowrank is None:
        return 0
    adapters = sum(m is not None for m in lowrank.modules)
    size = torch.empty((), dtype=compute).element_size()
    svd = 3 * 8 * largest if lowrank.rank is not None else 0
    dora = 0
    if lowrank.dora_adapters():
        mag = lowrank.largest_magnitude()
        # the float64 norms and factors: 16 bytes a row, at most 8x the magnitude's bytes
        dora = lowrank.dora_adapters() * mag + 8 * mag + DOT_ROWS_SCRATCH
    return 8 * largest + adapters * (size * largest + 2 * lowrank.largest_factor()) + svd + dora


class DeltaSlots:
    """Buffers for the adapters' inputs: per contribution the two factors and the
    materialised ``base + delta`` in the compute dtype, allocated once, reused per tensor."""

    def __init__(self, lowrank: LowRank, capacity: int, compute: torch.dtype) -> None:
        count = len(lowrank.modules)
        self.lowrank = lowrank
        self.compute = compute
        self.factors = InputSlots(2 * count, lowrank.largest_factor())
        self.magnitudes = InputSlots(count, lowrank.largest_magnitude())  # filled if DoRA
        self.inputs = InputSlots(count, capacity * torch.empty((), dtype=compute).element_size())

    def model_of(self, i: int, store: ObjectStore, base: torch.Tensor, name: str) -> torch.Tensor:
        """Contribution ``i``'s tensor ``name``: ``base + scaling * B @ A`` (DoRA: rescaled
        row by row, :func:`dora_`) rounded once to the compute dtype (the base alone where
        this adapter does not change ``name``)."""
        mods = self.lowrank.modules[i]
        assert mods is not None
        out = self.inputs.view(i, list(base.shape), self.compute)
        mod = mods.get(name)
        if mod is None:
            out.copy_(base)
            return out
        desc = self.lowrank.descriptors[i]
        a = self.factors.load(2 * i, store, desc.tensors[mod.a])
        b = self.factors.load(2 * i + 1, store, desc.tensors[mod.b])
        if mod.magnitude is not None:
            m = self.magnitudes.load(i, store, desc.tensors[mod.magnitude])
            out.copy_(dora_(mod, a, b, m, base))  # one rounding to the compute dtype
            return out
        d = delta(mod, a, b)
        d.add_(base)  # float64: the base exactly, one rounded sum
        out.copy_(d)  # one rounding to the compute dtype
        return out


def delta(mod: LoraModule, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``scaling * B @ A`` in float64, in the orientation of the base tensor."""
    product = numerics.matmul(b, a)
    product.mul_(mod.scaling)
    return product.T if mod.transpose else product


def dora_(
    mod: LoraModule, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, base: torch.Tensor
) -> torch.Tensor:
    """A DoRA module's weight in float64, in the orientation of the base tensor:
    ``V = W + scaling * B @ A``, then each row of ``V`` (in the adapter's orientation, where
    ``m`` has one value per row) times ``m / ||row||_2``."""
    v = numerics.matmul(b, a)  # float64 (rows of B, columns of A), contiguous
    v.mul_(mod.scaling)
    v.add_(base.T if mod.transpose else base)  # the base exactly, one rounded sum
    norms = torch.sqrt(numerics.dot_rows(v, v))  # exact sums, one rounding each
    factor = m.to(torch.float64) / norms
    v.mul_(factor.unsqueeze(1))
    return v.T if mod.transpose else v


# -- the adapter output ---------------------------------------------------------------------
def adapter_layout(lowrank: LowRank) -> list[LoraModule]:
    """The output adapter's modules, in target order, named as the first adapter names its
    factors (every adapter of a set targets the same modules)."""
    mods = lowrank.modules[0]
    assert mods is not None
    return [mods[t] for t in lowrank.targets]


def factorise(
    merged: torch.Tensor, base: torch.Tensor, mod: LoraModule, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64 with ``B @ A`` the best rank-``rank`` approximation of the merged
    delta (in the adapter's orientation), zero-padded to ``rank``; signs from numerics.svd."""
    d = merged.to(torch.float64) - base.to(torch.float64)
    m = d.T if mod.transpose else d
    u, s, vh = numerics.svd(m.contiguous())
    k = min(rank, s.numel())
    root = torch.sqrt(s[:k])
    b = torch.zeros((m.shape[0], rank), dtype=torch.float64)
    a = torch.zeros((rank, m.shape[1]), dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root.unsqueeze(1) * vh[:k]
    return a, b


def adapter_config(lowrank: LowRank, rank: int) -> bytes:
    """The written adapter's ``adapter_config.json``: the first adapter's, with rank
    ``rank``, ``lora_alpha = rank`` (scaling 1) and no per-module patterns."""
    config = dict(lowrank.adapter_config)
    config.update(
        {
            "r": rank,
            "lora_alpha": rank,
            "use_rslora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
    )
    if config.get("use_dora"):
        config["use_dora"] = False  # the merged delta, factorised: no magnitude vectors
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def factor_dtype(lowrank: LowRank) -> torch.dtype:
    mods = lowrank.modules[0]
    assert mods is not None
    first = next(iter(mods.values()))
    return NAME_TO_TORCH[lowrank.descriptors[0].tensors[first.a].dtype]
