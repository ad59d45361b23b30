"""Compute dtypes and ordered, exactly reproducible weighted sums.

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..vocabulary import COMPUTE_DTYPE_NAMES

COMPUTE_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in COMPUTE_DTYPE_NAMES}
FLOAT_COMPUTE_DTYPES: tuple[torch.dtype, ...] = tuple(COMPUTE_DTYPES.values())


def to_compute(tensor: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` converted to ``compute_dtype`` (float32 or float64); the conversion is exact
    from fp16/bf16/fp32 storage."""
    if compute_dtype not in FLOAT_COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be float32 or float64, not {compute_dtype}")
    return tensor.to(compute_dtype)


def from_compute(tensor: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """Cast a merged tensor back to its storage dtype (round to nearest even, one rounding)."""
    return tensor.to(storage_dtype).contiguous()


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` rounded once to ``like``'s dtype, as a 0-d tensor.

    Multiplying by this is one correctly rounded operation with a coefficient whose value does not
    depend on how a kernel would convert a Python float."""
    return torch.tensor(value, dtype=like.dtype)


def ordered_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise ``((t0 + t1) + t2) + ...`` in the given (canonical) order."""
    if not tensors:
        raise ValueError("ordered_sum of no tensors")
    if len(tensors) == 1:
        return tensors[0].clone()
    acc = tensors[0] + tensors[1]
    for t in tensors[2:]:
        acc.add_(t)  # the same single rounding as acc + t, without a new tensor per term
    return acc


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Elementwise ``((t0*w0 + t1*w1) + t2*w2) + ...``: each product and each add rounded once,
    never fused, in the given (canonical) order."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("weighted_sum needs one weight per tensor and at least one tensor")
    acc = tensors[0] * scalar(weights[0], tensors[0])
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        acc.add_(t * scalar(w, t))  # product rounded, then the add rounded: never fused
    return acc


FLOAT_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def keep_where_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x[i]`` where ``keep[i]`` else ``+0.0``, in place: exactly ``torch.where(keep, x, 0.0)``
    (nan and -0.0 included), computed as a bitwise AND of the float's bits with an all-ones or
    all-zeros integer.  ``where`` and ``masked_fill`` with a bool mask run about 15x slower here
    (measured: 55-70 us against 3-6 us per 64K float32)."""
    bits = x.view(FLOAT_BITS[x.dtype])
    if bits.numel() <= _KEEP_BLOCK or not (bits.is_contiguous() and keep.is_contiguous()):
        bits.bitwise_and_(keep.to(device=x.device, dtype=bits.dtype).neg_())
        return x
    # in blocks: the integer copy of the mask is 4x its size, never a whole-tensor temporary
    flat_bits, flat_keep = bits.view(-1), keep.reshape(-1)
    for lo in range(0, flat_bits.numel(), _KEEP_BLOCK):
        part = flat_keep[lo : lo + _KEEP_BLOCK].to(device=x.device, dtype=bits.dtype).neg_()
        flat_bits[lo : lo + _KEEP_BLOCK].bitwise_and_(part)
    return x


_KEEP_BLOCK = 1 << 18


def weighted_sum_(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """:func:`weighted_sum` computed in place: overwrites ``tensors`` and returns the first.
    The same roundings in the same order, without allocating."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("weighted_sum_ needs one weight per tensor and at least one tensor")
    acc = tensors[0]
    if weights[0] != 1.0:  # x * 1 is x exactly
        acc.mul_(scalar(weights[0], acc))
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        if w != 1.0:
            t.mul_(scalar(w, t))
        acc.add_(t)
    return acc
