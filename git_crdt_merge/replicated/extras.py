"""Extra inputs of a contribution: Fisher diagonals, RegMean Gram matrices.

Some merge methods need more than the weights: Fisher merging needs each model's diagonal
Fisher information, RegMean the Gram matrix ``X^T X`` of each linear layer's inputs.  Such a
file is given at ``add-contribution --fisher F.safetensors`` / ``--gram G.safetensors`` (or
``--extra KIND=FILE``), checked here against the model, and stored like the model's tensors
(chunk objects referenced from the descriptor), so it is part of the contribution's content
and id.  This module reads values with numpy only: no torch on the ingest path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import InputError, did_you_mean
from ..vocabulary import EXTRA_INPUT_KINDS
from . import formats

__all__ = ["KINDS", "load_extra", "parse_extra"]

KINDS = tuple(EXTRA_INPUT_KINDS)
"""Extra-input kinds a contribution may carry (the registry says which strategy reads which)."""

_FLOAT = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
_GRAM_SYMMETRY_RTOL = 1e-6


def parse_extra(text: str) -> tuple[str, Path]:
    """``KIND=PATH`` of ``--extra``."""
    kind, sep, path = text.partition("=")
    kind = kind.strip()
    if not sep or not kind or not path:
        raise InputError(f"--extra {text!r} must be KIND=PATH (kinds: {', '.join(KINDS)})")
    if kind not in KINDS:
        raise InputError(
            f"--extra: unknown kind {kind!r}{did_you_mean(kind, KINDS)} (kinds: {', '.join(KINDS)})"
        )
    return kind, Path(path)


def _values(tensor: formats.TensorData, where: str) -> np.ndarray:
    """The tensor's values as float32/float64 numpy (bf16 widened exactly)."""
    if tensor.dtype == "BF16":
        raw = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(tensor.shape)
    if tensor.dtype not in _FLOAT:
        raise InputError(f"{where}: dtype {tensor.dtype} is not a float type (F64 F32 F16 BF16)")
    dt = np.dtype(_FLOAT[tensor.dtype]).newbyteorder("<")
    return np.frombuffer(tensor.data, dtype=dt).reshape(tensor.shape)


def _check_fisher(tensor: formats.TensorData, model: Mapping[str, list[int]], where: str) -> None:
    if tensor.name not in model:
        raise InputError(f"{where}: the model has no tensor {tensor.name!r}")
    if list(tensor.shape) != list(model[tensor.name]):
        raise InputError(
            f"{where}: shape {tensor.shape} differs from the model's {model[tensor.name]}"
        )
    values = _values(tensor, where)
    if not bool(np.isfinite(values).all()):
        raise InputError(f"{where}: has non-finite values")
    if bool((values < 0).any()):
        raise InputError(f"{where}: has negative values (a Fisher diagonal is >= 0)")


def _check_gram(tensor: formats.TensorData, model: Mapping[str, list[int]], where: str) -> None:
    shape = model.get(tensor.name)
    if shape is None:
        raise InputError(f"{where}: the model has no tensor {tensor.name!r}")
    if len(shape) != 2:
        raise InputError(f"{where}: a Gram matrix belongs to a 2-D weight, {shape} is not")
    inner = shape[1]
    if list(tensor.shape) != [inner, inner]:
        raise InputError(
            f"{where}: shape {tensor.shape}, expected [{inner}, {inner}] for a weight {shape}"
        )
    values = _values(tensor, where).astype(np.float64)
    if not bool(np.isfinite(values).all()):
        raise InputError(f"{where}: has non-finite values")
    scale = float(np.abs(values).max()) if values.size else 0.0
    if float(np.abs(values - values.T).max(initial=0.0)) > _GRAM_SYMMETRY_RTOL * scale:
        raise InputError(f"{where}: is not symmetric")


def load_extra(
    kind: str, path: Path, model: Mapping[str, list[int]]
) -> Iterable[formats.TensorData]:
    """The tensors of extra input ``kind`` at ``path``, each checked against ``model``
    (tensor name -> shape).  Raises a one-line :class:`InputError` on the first problem."""
    if kind not in KINDS:
        raise InputError(
            f"unknown extra-input kind {kind!r}{did_you_mean(kind, KINDS)} "
            f"(kinds: {', '.join(KINDS)})"
        )
    if path.suffix != ".safetensors" or not path.is_file():
        raise InputError(f"--{kind} {path}: must be an existing .safetensors file")
    tensors = list(formats.iter_safetensors(path))
    if not tensors:
        raise InputError(f"--{kind} {path}: has no tensors")
    check = _check_fisher if kind == "fisher" else _check_gram
    for tensor in tensors:
        formats.check_tensor_name(tensor.name)
        check(tensor, model, f"--{kind} {path.name}: tensor {tensor.name!r}")
    return tensors
