"""Input buffers: one reusable slot per input, filled straight from the object store.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..replicated.descriptor import TensorEntry
from ..replicated.encoding import read_tensor_into
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH

if TYPE_CHECKING:  # plan.py imports lowrank.py, which imports this module
    from .lowrank import DeltaSlots
    from .plan import Plan, TensorSpec


class InputSlots:
    """One reusable buffer per input (each contribution, and the base), sized for the largest
    tensor: every tensor name is read into the same memory, so resolution allocates its inputs
    once instead of once per tensor (which fragments the heap and inflates RSS).

    XOR-encoded inputs are decoded against the bytes of their base reference: those of a
    loaded slot with that content (the base's, normally), else the scratch buffer, decoded
    once per content and reused by every contribution that names it."""

    def __init__(self, count: int, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: list[bytearray | None] = [None] * count
        self._scratch: bytearray | None = None
        self._scratch_holds: str | None = None  # content hash of the scratch's bytes
        self._holds: dict[str, memoryview] = {}  # content hash -> loaded slot, this tensor

    def scratch(self) -> memoryview:
        self._scratch_holds = None  # about to be overwritten
        if self._scratch is None:
            self._scratch = bytearray(self.capacity)
        return memoryview(self._scratch)

    def _known(self, content: str) -> memoryview | None:
        if content in self._holds:
            return self._holds[content]
        if self._scratch is not None and self._scratch_holds == content:
            return memoryview(self._scratch)
        return None

    def new_tensor(self) -> None:
        """Forget which slot holds what: the next tensor name overwrites them."""
        self._holds.clear()

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
        """The tensor ``info`` read (decoded) from its chunks into buffer ``slot``."""
        nbytes = info.nbytes
        shape = list(info.shape)
        dtype = NAME_TO_TORCH[info.dtype]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = self._buffers[slot]
        if buf is None:
            buf = self._buffers[slot] = bytearray(self.capacity)
        view = memoryview(buf)[:nbytes]
        self._holds = {h: v for h, v in self._holds.items() if v.obj is not buf}
        read_tensor_into(store, info, view, known=self._known, scratch=self.scratch)
        enc = info.encoding
        if enc is not None and enc.base is not None and self._known(enc.base.blake3) is None:
            self._scratch_holds = enc.base.blake3  # decoded and verified there just now
        if info.blake3 is not None:
            self._holds[info.blake3] = view
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

    The base comes first: contributions XOR-encoded against it are decoded with its bytes.  A
    LoRA adapter's input is the model it stands for, ``base + delta``, made in ``deltas``
    (:mod:`.lowrank`); the base is read for it even where the strategy ignores the base."""
    slots.new_tensor()
    lowrank = plan.lowrank
    base_desc = plan.base if plan.base is not None else (lowrank.base if lowrank else None)
    base = None
    at = len(plan.descriptors)  # the base's slot, after the contributions'
    if base_desc is not None:
        entry = plan.entry(at, spec.name) if plan.base is not None else base_desc.tensors[spec.name]
        base = slots.load(at, store, entry)
    tensors = []
    for i in range(len(plan.descriptors)):
        if lowrank is not None and lowrank.modules[i] is not None:
            assert deltas is not None and base is not None
            tensors.append(deltas.model_of(i, store, base, spec.name).to(device))
        else:
            tensors.append(slots.load(i, store, plan.entry(i, spec.name)).to(device))
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
