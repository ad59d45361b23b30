"""Input buffers: one reusable slot per input, filled straight from the object store.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..replicated.descriptor import TensorEntry
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH

if TYPE_CHECKING:  # plan.py imports lowrank.py, which imports this module
    from .lowrank import DeltaSlots
    from .plan import Plan, TensorSpec


class InputSlots:
    """One reusable buffer per input (each contribution, and the base), sized for the largest
    tensor: every tensor name is read into the same memory, so resolution allocates its inputs
    once instead of once per tensor (which fragments the heap and inflates RSS)."""

    def __init__(self, count: int, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: list[bytearray | None] = [None] * count

    def view(self, slot: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Buffer ``slot`` as a tensor of ``shape`` and ``dtype`` (contents undefined)."""
        count = 1
        for d in shape:
            count *= d
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        buf = self._buffers[slot]
        if buf is None:
            buf = self._buffers[slot] = bytearray(self.capacity)
        return torch.frombuffer(buf, dtype=dtype, count=count).reshape(shape)

    def load(self, slot: int, store: ObjectStore, info: TensorEntry) -> torch.Tensor:
        """The tensor ``info`` read straight from its chunks into buffer ``slot``."""
        nbytes = info.nbytes
        shape = list(info.shape)
        dtype = NAME_TO_TORCH[info.dtype]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = self._buffers[slot]
        if buf is None:
            buf = self._buffers[slot] = bytearray(self.capacity)
        view = memoryview(buf)[:nbytes]
        store.read_into(info.chunks, view)
        return torch.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)


def load_inputs(
    plan: Plan,
    spec: TensorSpec,
    store: ObjectStore,
    device: str,
    slots: InputSlots,
    extra_slots: InputSlots,
    deltas: DeltaSlots | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, list[torch.Tensor | None]]]:
    """Read every input of one tensor name into ``slots``: (base, contributions, extras).

    A LoRA adapter's input is the model it stands for, ``base + delta``, made in ``deltas``
    (:mod:`.lowrank`); the base is read for it even where the strategy ignores the base."""
    lowrank = plan.lowrank
    base_desc = plan.base if plan.base is not None else (lowrank.base if lowrank else None)
    base = None
    if base_desc is not None:
        base = slots.load(len(plan.descriptors), store, base_desc.tensors[spec.name])
    tensors = []
    for i, d in enumerate(plan.descriptors):
        if lowrank is not None and lowrank.modules[i] is not None:
            assert deltas is not None and base is not None
            tensors.append(deltas.model_of(i, store, base, spec.name).to(device))
        else:
            tensors.append(slots.load(i, store, d.tensors[spec.name]).to(device))
    given_base = None if plan.base is None or base is None else base.to(device)
    extras: dict[str, list[torch.Tensor | None]] = {}
    slot = 0
    for kind, infos in plan.extra_infos(spec.name).items():
        extras[kind] = []
        for info in infos:
            extras[kind].append(
                None if info is None else extra_slots.load(slot, store, info).to(device)
            )
            slot += 1
    return given_base, tensors, extras
