"""Tensor bytes <-> torch tensors (Layer 2 side; Layer 1 never imports this)."""

from __future__ import annotations

import torch

NAME_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_NAME: dict[torch.dtype, str] = {v: k for k, v in NAME_TO_TORCH.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16")


def from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor over a copy-free view of little-endian bytes (read-only buffers are copied)."""
    tdtype = NAME_TO_TORCH[dtype]
    if len(data) == 0:
        return torch.empty(shape, dtype=tdtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=tdtype).reshape(shape)


def to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()
