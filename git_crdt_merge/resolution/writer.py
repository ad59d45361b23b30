"""The output files: safetensors shards written tensor by tensor, and side files.

Part of the engine (:mod:`.engine`), split out by concern."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import ResolveError
from ..replicated.tensorio import TORCH_TO_NAME
from .plan import TensorSpec


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


def tensor_bytes(out: torch.Tensor, spec: TensorSpec) -> memoryview:
    """The bytes of the merged tensor ``out`` (no copy where it is contiguous), checked
    against the shape and size its header entry promises."""
    if list(out.shape) != spec.shape:
        raise ResolveError(
            f"strategy returned shape {list(out.shape)} for {spec.name!r}, expected {spec.shape}"
        )
    flat = out.detach().contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes != spec.nbytes:
        raise ResolveError(f"tensor {spec.name!r}: {nbytes} bytes, expected {spec.nbytes}")
    if not nbytes:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy().data)


def write_tensor(fh: BinaryIO, out: torch.Tensor, spec: TensorSpec) -> None:
    data = tensor_bytes(out, spec)
    if len(data):
        fh.write(data)


def shard_offsets(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> list[int]:
    """Where each tensor of a shard starts in its file (header included): the header depends
    only on the names, dtypes and shapes, so every tensor's place is known before any is
    computed (parallel resolution writes them there in any order)."""
    offset = len(safetensors_header(specs, metadata))
    starts = []
    for spec in specs:
        starts.append(offset)
        offset += spec.nbytes
    return starts


def create_shard(path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str]) -> None:
    """A shard file of its final size: the header, then room for every tensor (a sparse
    hole until written with :func:`write_tensor_at`)."""
    header = safetensors_header(specs, metadata)
    with open(path, "xb") as fh:
        fh.write(header)
        fh.truncate(len(header) + sum(spec.nbytes for spec in specs))


def write_tensor_at(fd: int, offset: int, out: torch.Tensor, spec: TensorSpec) -> None:
    """Write the merged tensor ``out`` at ``offset`` of the open file ``fd`` (``os.pwrite``:
    no shared file position, so workers write their tensors side by side)."""
    data = tensor_bytes(out, spec)
    done = 0
    while done < len(data):  # pwrite may write less than asked (above 2 GiB on Linux)
        done += os.pwrite(fd, data[done:], offset + done)


class SidePart:
    """One process's share of a side file: side tensors appended to a hidden data file as they
    arrive, so memory holds one of them at a time.  :meth:`take` hands over the entries added
    since it was last called, each a (spec, offset in the data file), once they are flushed
    (a worker process sends them to the caller, whose :class:`SideFile` assembles the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: BinaryIO = open(path, "xb")  # noqa: SIM115 - closed by close()
        self._pending: list[tuple[TensorSpec, int]] = []
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in TORCH_TO_NAME:
            raise ResolveError(f"side tensor {name!r} has unsupported dtype {tensor.dtype}")
        spec = TensorSpec(name, TORCH_TO_NAME[tensor.dtype], list(tensor.shape))
        write_tensor(self._data, tensor, spec)
        self._pending.append((spec, self._size))
        self._size += spec.nbytes

    def take(self) -> list[tuple[TensorSpec, int]]:
        self._data.flush()
        taken, self._pending = self._pending, []
        return taken

    def close(self) -> None:
        self._data.close()


class SideFile:
    """The safetensors file of a strategy's side tensors (``Strategy.side_output``), written
    beside the model in the same work folder, so it is published (or dropped) with it.

    Side tensors arrive tensor name by tensor name during the streamed pass, from this process
    (:meth:`add`) or from resolve workers, each appending to its own :class:`SidePart` data file
    (:meth:`part_path`; the caller records the entries a worker reports with :meth:`adopt`).
    :meth:`finish` writes the header and copies the data in side-tensor name order (the layout
    the model files use), in bounded pieces, then deletes the data files: the same file
    whichever process computed which tensor, and in whatever order."""

    _COPY = 16 << 20  # bytes per read while assembling

    def __init__(self, path: Path) -> None:
        self.path = path
        self._own: SidePart | None = None
        self._parts: list[Path] = []
        self._entries: dict[str, tuple[TensorSpec, Path, int]] = {}  # name -> (spec, file, offset)
        self._size = 0

    def part_path(self, tag: str) -> Path:
        """The hidden data file of one process's side tensors, beside the side file."""
        return self.path.with_name(f".{self.path.name}.data.{tag}")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ResolveError(f"side tensor {name!r} of {self.path.name} given twice")
        if self._own is None:
            self._own = SidePart(self.part_path("main"))
        self._own.add(name, tensor)
        self.adopt(self._own.path, self._own.take())

    def adopt(self, part: Path, entries: Sequence[tuple[TensorSpec, int]]) -> None:
        """Record side tensors written to the data file ``part`` (by this process or a worker)."""
        if part not in self._parts:
            self._parts.append(part)
        for spec, offset in entries:
            if spec.name in self._entries:
                raise ResolveError(f"side tensor {spec.name!r} of {self.path.name} given twice")
            self._entries[spec.name] = (spec, part, offset)
            self._size += spec.nbytes

    def finish(self, metadata: dict[str, str]) -> dict[str, Any]:
        """Write the file; returns its summary for ``resolution.json``."""
        if self._own is not None:
            self._own.close()
        names = sorted(self._entries)
        specs = [self._entries[n][0] for n in names]
        sources: dict[Path, BinaryIO] = {}
        try:
            with open(self.path, "wb") as fh:
                fh.write(safetensors_header(specs, metadata))
                for name in names:
                    spec, part, offset = self._entries[name]
                    src = sources.get(part)
                    if src is None:
                        src = sources[part] = open(part, "rb")  # noqa: SIM115 - closed below
                    src.seek(offset)
                    left = spec.nbytes
                    while left:
                        piece = src.read(min(left, self._COPY))
                        if not piece:  # pragma: no cover - the data files are ours
                            raise ResolveError(f"side tensor {name!r}: data file truncated")
                        fh.write(piece)
                        left -= len(piece)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            for src in sources.values():
                src.close()
        for part in self._parts:
            part.unlink(missing_ok=True)
        return {"file": self.path.name, "tensors": len(specs), "bytes": self._size}
