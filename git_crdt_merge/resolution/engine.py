"""Layer 2 engine: compute one merged model from the visible set, streamed tensor by tensor.

For every tensor name, in sorted order, the tensors of all visible contributions (canonical
order: by contribution id) and of the base are read from the object store, merged by the
strategy in the manifest, cast back to the contributions' dtype and appended to the output.
Only one tensor name is in memory at a time, so peak memory is about (K + 2) x the largest
tensor, whatever the model size.  A strategy may also emit side tensors (``Strategy.side_output``,
e.g. representation_surgery's per-task modules): they are streamed to a second safetensors
file of the same folder (:class:`SideFile`).  The result is written into the cache under the
Merkle root and published to the output folder (``cache``).  ``resolve`` drives it; this
module is the only one on that path that imports torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .. import FORMAT_VERSION, __version__
from ..errors import ResolveError
from ..numerics import RandomStream
from ..replicated import checks
from ..replicated.contributions import read_descriptor
from ..replicated.formats import MAX_AUX_BYTES
from ..replicated.manifest import Manifest
from ..replicated.store import ObjectStore
from ..replicated.tensorio import NAME_TO_TORCH, TORCH_TO_NAME
from ..strategies import registry
from . import cache
from .cache import cache_key, seed_of

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    descriptors: list[dict[str, Any]]
    base_id: str | None
    base: dict[str, Any] | None  # None when there is no base or the strategy ignores it
    specs: list[TensorSpec]
    files: dict[str, str]  # config and tokenizer files to copy: the base's, else the first's

    @property
    def weights(self) -> list[float]:
        return [float(d.get("weight", 1.0)) for d in self.descriptors]

    def extra_infos(self, name: str) -> dict[str, list[dict[str, Any] | None]]:
        """Per extra-input kind the strategy reads: each contribution's table entry for tensor
        ``name`` (None where it has none)."""
        return {
            kind: [
                d.get("extras", {}).get(kind, {}).get("tensors", {}).get(name)
                for d in self.descriptors
            ]
            for kind in self.strategy.extra_inputs
        }

    def largest_extra(self) -> int:
        return max(
            (
                int(info["bytes"])
                for d in self.descriptors
                for kind in self.strategy.extra_inputs
                for info in d.get("extras", {}).get(kind, {}).get("tensors", {}).values()
            ),
            default=0,
        )


def _check_compatible(specs: dict[str, TensorSpec], desc: dict[str, Any], what: str) -> None:
    tensors = desc["tensors"]
    if set(tensors) != set(specs):
        missing = sorted(set(specs) - set(tensors))
        extra = sorted(set(tensors) - set(specs))
        detail = f"lacks {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
        raise ResolveError(
            f"{what} {detail}: all contributions and the base must have the same tensor names"
        )
    for name, spec in specs.items():
        t = tensors[name]
        if list(t["shape"]) != spec.shape:
            raise ResolveError(
                f"{what}: tensor {name!r} has shape {t['shape']}, expected {spec.shape}"
            )
        if t["dtype"] != spec.dtype:
            raise ResolveError(
                f"{what}: tensor {name!r} has dtype {t['dtype']}, expected {spec.dtype}"
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
    files = dict((base_desc or descriptors[0]).get("files", {}))
    base = None if strategy.base == "ignored" else base_desc
    first = base if base is not None else descriptors[0]
    specs = {
        name: TensorSpec(name, t["dtype"], list(t["shape"])) for name, t in first["tensors"].items()
    }
    for (cid, name), desc in zip(contributions, descriptors, strict=True):
        _check_compatible(specs, desc, f"contribution {name} ({cid[:12]})")
    registry.check_weights(
        strategy, [float(d.get("weight", 1.0)) for d in descriptors], contributions
    )
    kinds = {d.get("kind", "full") for d in descriptors}
    if len(kinds) > 1:
        raise ResolveError(f"contributions mix kinds {sorted(kinds)}; merge like with like")
    for kind in strategy.needed_extras(params):
        for (cid, cname), desc in zip(contributions, descriptors, strict=True):
            if kind not in desc.get("extras", {}):
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
    )


def shard_layout(specs: Sequence[TensorSpec], max_shard: int) -> list[list[TensorSpec]]:
    """Greedy packing in name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The safetensors header for tensors written back to back in ``specs`` order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": spec.shape,
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class InputSlots:
    """One reusable buffer per input (each contribution, and the base), sized for the largest
    tensor: every tensor name is read into the same memory, so resolution allocates its inputs
    once instead of once per tensor (which fragments the heap and inflates RSS)."""

    def __init__(self, count: int, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: list[bytearray | None] = [None] * count

    def load(self, slot: int, store: ObjectStore, info: dict[str, Any]) -> torch.Tensor:
        """The tensor ``info`` read straight from its chunks into buffer ``slot``."""
        nbytes = int(info["bytes"])
        shape = list(info["shape"])
        dtype = NAME_TO_TORCH[info["dtype"]]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = self._buffers[slot]
        if buf is None:
            buf = self._buffers[slot] = bytearray(self.capacity)
        view = memoryview(buf)[:nbytes]
        store.read_into(info["chunks"], view)
        return torch.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)


def _load_inputs(
    plan: Plan,
    spec: TensorSpec,
    store: ObjectStore,
    device: str,
    slots: InputSlots,
    extra_slots: InputSlots,
) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, list[torch.Tensor | None]]]:
    """Read every input of one tensor name into ``slots``: (base, contributions, extras)."""
    tensors = [
        slots.load(i, store, d["tensors"][spec.name]).to(device)
        for i, d in enumerate(plan.descriptors)
    ]
    base = None
    if plan.base is not None:
        base = slots.load(len(tensors), store, plan.base["tensors"][spec.name]).to(device)
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
    side: SideFile | None = None,
) -> torch.Tensor:
    """Read every input of one tensor name and merge it; returns the storage dtype on CPU.

    The inputs live in ``slots`` and are overwritten by the next call: the result is written
    out before that (a strategy may return a view of an input, e.g. integer pass-through).
    Side tensors the strategy computed for this name are appended to ``side``."""
    extra_slots = extra_slots or InputSlots(0, 0)
    base, tensors, extras = _load_inputs(plan, spec, store, device, slots, extra_slots)
    side_tensors: dict[str, torch.Tensor] | None = {} if side is not None else None
    out = registry.run_strategy(
        plan.strategy,
        spec.name,
        base,
        tensors,
        [cid for cid, _ in plan.contributions],
        plan.weights,
        plan.params,
        rng,
        compute,
        owned=True,
        extras=extras,
        model=model,
        side=side_tensors,
    )
    if side is not None and side_tensors:
        for key, tensor in side_tensors.items():
            side.add(key, tensor.to("cpu"))
    return out.to("cpu")


def statistics_pass(
    plan: Plan,
    store: ObjectStore,
    rng: RandomStream,
    compute: torch.dtype,
    device: str,
    slots: InputSlots,
    extra_slots: InputSlots,
) -> registry.ModelValues:
    """The strategy's whole-model pass: one tensor name at a time through the same slots as
    the merge (memory stays a few tensors), each reduced to a small summary at once."""
    summaries: dict[str, Any] = {}
    numels: dict[str, int] = {}
    ids = [cid for cid, _ in plan.contributions]
    for spec in plan.specs:
        base, tensors, extras = _load_inputs(plan, spec, store, device, slots, extra_slots)
        summaries[spec.name] = registry.collect_statistics(
            plan.strategy,
            spec.name,
            base,
            tensors,
            ids,
            plan.weights,
            plan.params,
            rng,
            compute,
            owned=True,
            extras=extras,
        )
        numels[spec.name] = math.prod(spec.shape)
        del base, tensors, extras
    by_name = {spec.name: spec for spec in plan.specs}

    def read(name: str) -> registry.TensorInputs:
        """One tensor name's inputs, copied out of the slots (for objective plugins)."""
        if name not in by_name:
            raise ResolveError(f"strategy {plan.strategy.name}: no tensor named {name!r}")
        base, tensors, extras = _load_inputs(plan, by_name[name], store, device, slots, extra_slots)
        inputs = registry.prepare_inputs(
            plan.strategy, name, base, tensors, ids, plan.weights, rng, compute, extras
        )
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
        "cache_key": cache_key(plan.root, compute_dtype, device, max_shard),
        "compute_dtype": compute_dtype,
        "device": device,
        "merkle_root": plan.root,
        "seed": seed_of(plan.root).hex(),
        "strategy": plan.strategy.name,
        "params": plan.raw_params,
        "base": plan.base_id,
        "contributions": [
            {"id": cid, "weight": w}
            for (cid, _), w in zip(plan.contributions, plan.weights, strict=True)
        ],
        "tool": f"git-crdt-merge {__version__}",
    }
    if statistics is not None:  # what the whole-model pass found (e.g. coefficients)
        record["statistics"] = statistics
    if side_output is not None:  # the strategy's second file of side tensors
        record["side_output"] = side_output
    return record


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameters
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit


def bound_heap(largest_tensor: int) -> None:
    """Fix glibc's mmap threshold just above the largest tensor of this resolution.

    Tensors up to that size (the inputs' temporaries, which repeat tensor after tensor) are
    then reused from the heap without page faults, larger blocks get their own mmap, and
    setting the threshold also stops glibc's dynamic adjustment, which otherwise raises the
    trim threshold with it and keeps freed blocks around: measured on the 100M-parameter
    benchmark, ties resolved in 3.0 s at 381 MB peak RSS, against 4.1 s at 360 MB with a
    4 MiB threshold and 5.0 s at 500 MB with glibc's defaults.  A no-op where the C library
    is not glibc.

    One arena for every thread: strategies run contributions side by side on worker threads,
    and per-thread arenas would each keep their own freed tensors (measured: +15-40 MB of peak
    RSS on that benchmark)."""
    threshold = int(os.environ.get("CRDT_MMAP_THRESHOLD", 0)) or min(
        largest_tensor + (1 << 20), _MMAP_THRESHOLD_MAX
    )
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        libc.mallopt(_M_ARENA_MAX, 1)


def release_free_heap() -> None:
    """Give the pages of freed heap blocks back to the system (glibc ``malloc_trim``), between
    tensors: temporaries of many sizes leave holes that would otherwise stay resident
    (measured: 6 MiB less peak RSS for ties on the 100M-parameter benchmark, under 1 ms)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """glibc, for ``mallopt`` and ``malloc_trim``; None where the C library is another."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def compute(
    plan: Plan,
    store: ObjectStore,
    work: Path,
    *,
    device: str = "cpu",
    compute_dtype: str = "float32",
    max_shard: int = cache.DEFAULT_MAX_SHARD,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the merged model for ``plan`` into the empty folder ``work``."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ResolveError(f"compute dtype must be float32 or float64, not {compute_dtype!r}")
    compute = COMPUTE_DTYPES[compute_dtype]
    bound_heap(max((spec.nbytes for spec in plan.specs), default=0))
    rng = RandomStream.from_seed(seed_of(plan.root))
    layout = shard_layout(plan.specs, max_shard)
    names = shard_names(len(layout))
    metadata = {"format": "pt", "merkle_root": plan.root}
    slots = InputSlots(len(plan.descriptors) + 1, max((s.nbytes for s in plan.specs), default=0))
    extra_slots = InputSlots(
        len(plan.descriptors) * len(plan.strategy.extra_inputs), plan.largest_extra()
    )
    model = None
    if plan.strategy.model_pass is not None:
        model = statistics_pass(plan, store, rng, compute, device, slots, extra_slots)
    side = None
    if plan.strategy.side_output is not None:
        side = SideFile(work / plan.strategy.side_output)
    for fname, specs in zip(names, layout, strict=True):
        with open(work / fname, "wb") as fh:
            fh.write(safetensors_header(specs, metadata))
            for spec in specs:
                out = merge_tensor(
                    plan, spec, store, rng, compute, device, slots, extra_slots, model, side
                )
                _check_finite(plan, spec, out, store, device, slots, extra_slots)
                _write_tensor(fh, out, spec)
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
    side_record = None if side is None else side.finish(metadata)
    for fname, oid in sorted(plan.files.items()):
        if fname == "adapter_config.json":
            continue
        why = checks.file_name_problem(fname)
        if why is not None:  # the output's namespace is fixed: never a contribution's name
            raise ResolveError(f"the model's file {fname!r} {why}")
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
                fh.write(store.get(oid, verify=True))
        except FileExistsError:
            raise ResolveError(f"the model's file {fname!r} is given twice") from None
    (work / cache.RESOLUTION_FILE).write_text(
        json.dumps(
            resolution_record(
                plan,
                compute_dtype,
                device,
                max_shard,
                None if model is None else model.report,
                side_record,
            ),
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )


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
    extra_slots: InputSlots,
) -> None:
    """A merged tensor of finite inputs must be finite: a weight or parameter inside its
    declared range can still overflow float32 for some values (weight x value > 3.4e38), and
    that must be an error, not a model full of Inf or NaN.  The inputs are read again only
    when the result is not finite (inputs with NaN, admitted by --allow-nonfinite, may give
    NaN)."""
    if not out.is_floating_point() or _all_finite(out):
        return
    base, tensors, _ = _load_inputs(plan, spec, store, device, slots, extra_slots)
    inputs = [t for t in (base, *tensors) if t is not None and t.is_floating_point()]
    if all(bool(torch.isfinite(t).all()) for t in inputs):
        bad = int(out.numel() - torch.isfinite(out).sum())
        raise ResolveError(
            f"strategy {plan.strategy.name} gives {bad} non-finite values in tensor "
            f"{spec.name!r} from finite inputs: a weight or parameter is too large for "
            f"{spec.dtype} (weights {', '.join(f'{w:g}' for w in plan.weights[:4])})"
        )


def _write_tensor(fh: BinaryIO, out: torch.Tensor, spec: TensorSpec) -> None:
    if list(out.shape) != spec.shape:
        raise ResolveError(
            f"strategy returned shape {list(out.shape)} for {spec.name!r}, expected {spec.shape}"
        )
    flat = out.detach().contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes != spec.nbytes:
        raise ResolveError(f"tensor {spec.name!r}: {nbytes} bytes, expected {spec.nbytes}")
    if nbytes:
        fh.write(flat.view(torch.uint8).numpy().data)  # no copy of the tensor


class SideFile:
    """The safetensors file of a strategy's side tensors (``Strategy.side_output``), written
    beside the model in the same work folder, so it is published (or dropped) with it.

    Side tensors arrive tensor name by tensor name during the streamed pass; each is appended
    to a hidden data file at once, so memory holds one of them at a time.  :meth:`finish` writes
    the header and copies the data in side-tensor name order (the layout the model files use),
    in bounded pieces, then deletes the data file."""

    _COPY = 16 << 20  # bytes per read while assembling

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data_path = path.with_name(f".{path.name}.data")
        self._data: BinaryIO = open(self._data_path, "wb")  # noqa: SIM115 - closed in finish
        self._entries: dict[str, tuple[TensorSpec, int]] = {}  # name -> (spec, data offset)
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ResolveError(f"side tensor {name!r} of {self.path.name} given twice")
        if tensor.dtype not in TORCH_TO_NAME:
            raise ResolveError(f"side tensor {name!r} has unsupported dtype {tensor.dtype}")
        spec = TensorSpec(name, TORCH_TO_NAME[tensor.dtype], list(tensor.shape))
        self._entries[name] = (spec, self._size)
        _write_tensor(self._data, tensor, spec)
        self._size += spec.nbytes

    def finish(self, metadata: dict[str, str]) -> dict[str, Any]:
        """Write the file; returns its summary for ``resolution.json``."""
        self._data.close()
        specs = [self._entries[n][0] for n in sorted(self._entries)]
        with open(self._data_path, "rb") as src, open(self.path, "wb") as fh:
            fh.write(safetensors_header(specs, metadata))
            for spec in specs:
                src.seek(self._entries[spec.name][1])
                left = spec.nbytes
                while left:
                    piece = src.read(min(left, self._COPY))
                    if not piece:  # pragma: no cover - the data file is ours
                        raise ResolveError(f"side tensor {spec.name!r}: data file truncated")
                    fh.write(piece)
                    left -= len(piece)
            fh.flush()
            os.fsync(fh.fileno())
        self._data_path.unlink()
        return {"file": self.path.name, "tensors": len(specs), "bytes": self._size}
