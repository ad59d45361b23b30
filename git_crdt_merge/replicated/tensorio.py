"""safetensors dtype names <-> torch dtypes (imports torch: Layer 1 uses it only to load a
pickled checkpoint, on request)."""

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
