"""Input buffers: one reusable slot per input, filled straight from the object store.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

import torch

from ..replicated.descriptor import TensorEntry
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH
from .plan import Plan, TensorSpec


class InputSlots:
    """One reusable buffer per input (each contribution, and the base), sized for the largest
    tensor: every tensor name is read into the same memory, so resolution allocates its inputs
    once instead of once per tensor (which fragments the heap and inflates RSS)."""

    def __init__(self, count: int, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: list[bytearray | None] = [None] * count

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
) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, list[torch.Tensor | None]]]:
    """Read every input of one tensor name into ``slots``: (base, contributions, extras)."""
    tensors = [
        slots.load(i, store, plan.entry(i, spec.name)).to(device)
        for i in range(len(plan.descriptors))
    ]
    base = None
    if plan.base is not None:
        base = slots.load(len(tensors), store, plan.entry(len(tensors), spec.name)).to(device)
    extras: dict[str, list[torch.Tensor | None]] = {}
    slot = 0
    for kind, infos in plan.extra_infos(spec.name).items():
        extras[kind] = []
        for info in infos:
            extras[kind].append(
                None if info is None else extra_slots.load(slot, store, info).to(device)
            )
            slot += 1
    return base, tensors, extras
