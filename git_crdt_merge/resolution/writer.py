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
        write_tensor(self._data, tensor, spec)
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
