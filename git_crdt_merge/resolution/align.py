"""Inputs that differ in dtype, vocabulary size or head tying, brought to one merge per name.

Part of the engine (:mod:`.engine`), split out by concern.  Which differences are absorbed is
decided by :mod:`..replicated.alignment` (the same rules the add-time checks use); this module
applies them.  The rules (also in ``docs/strategies.md``, "Casting and mismatches"):

- **Casting.** Every input is converted on load to the compute dtype (float32, or float64 with
  ``--compute-dtype float64``).  F16, BF16 and F32 into float32 or float64, and F64 into
  float64, are exact; F64 into float32 rounds once, to nearest even.  The merged tensor is cast
  once (round to nearest, ties to even) to the output dtype: the ``output_dtype`` register when
  set, else the source's dtype (the base's when the strategy uses a base, else the first
  contribution's in canonical order).  So a BF16 fine-tune on an F32 base resolves to exactly
  the bytes of the same fine-tune pre-cast to F32.
- **Resized vocabulary.** A vocabulary tensor (embedding or head) may have a different row
  count in each input; the output has the largest.  With a base: a contribution lacking rows
  the base has takes the base's rows there (it did not change those tokens), and rows
  ``[0, V_base)`` are merged by the strategy; rows the base lacks are the mean of the
  contributions that have them, weighted by their weights (normalised to sum 1; equal when the
  strategy takes no weights).  Without a base: rows every contribution has are merged by the
  strategy, the others as said.  A row that one contribution alone has is copied exactly.
- **Tied heads.** The output has ``lm_head.weight`` exactly when the source has it.  A
  contribution without it is read as tied (its one token embedding stands in) unless its
  ``config.json`` says ``"tie_word_embeddings": false``; a contribution with its own head where
  the source is tied is refused (its trained head would be dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import numerics
from ..bounded import loads_json
from ..errors import ResolveError
from ..numerics import from_compute, to_compute
from ..replicated import alignment
from ..replicated.descriptor import Descriptor
from ..replicated.store import ObjectStore

MAX_CONFIG_BYTES = 4 << 20  # a config.json is a few KB; read no more of a pulled one


def unties_head(store: ObjectStore, desc: Descriptor) -> bool:
    """Whether the model's ``config.json`` says its head is not tied to its embedding (a model
    with no config is read as tied, transformers' default)."""
    oid = desc.files.get("config.json")
    if oid is None:
        return False
    config = loads_json(
        store.get(oid, verify=True, max_size=MAX_CONFIG_BYTES), "config.json", ResolveError
    )
    return isinstance(config, dict) and config.get("tie_word_embeddings") is False


def stand_in(store: ObjectStore, desc: Descriptor, name: str, what: str) -> str:
    """The tensor of ``desc`` read as tensor ``name`` of the output: ``name`` itself, or for a
    tied head, the model's embedding.  Refuses what no rule absorbs, naming the tensor."""
    if name in desc.tensors:
        return name
    if name != alignment.HEAD:
        raise ResolveError(f"{what} lacks tensor {name!r}: all inputs must have the same tensors")
    embedding = alignment.embedding_of(set(desc.tensors))
    if embedding is None:
        raise ResolveError(
            f"{what} lacks tensor {name!r} and has no single token embedding to tie it to"
        )
    if unties_head(store, desc):
        raise ResolveError(
            f"{what} lacks tensor {name!r} but its config.json says tie_word_embeddings: false"
        )
    return embedding


def refuse_extra_head(desc: Descriptor, source_names: set[str], what: str, source: str) -> None:
    """A contribution with tensors the source lacks: only a head over a tied source is
    absorbed by no rule in that direction, so every such tensor is refused."""
    extra = sorted(set(desc.tensors) - source_names)
    if not extra:
        return
    if extra[0] == alignment.HEAD:
        raise ResolveError(
            f"{what} has its own {alignment.HEAD!r} but {source} ties the head to the "
            "embedding (no lm_head.weight): the output follows the source, so the trained "
            "head would be dropped; save it tied, or use a base with an untied head"
        )
    raise ResolveError(
        f"{what} has extra tensor {extra[0]!r}: all inputs must have the same tensors"
    )


def output_shape(shapes: Sequence[Sequence[int]]) -> list[int]:
    """The output shape over the inputs' shapes (the source's first, checked by
    ``alignment.difference``): their common shape, or for a resized vocabulary the largest row
    count."""
    first = list(shapes[0])
    if all(list(s) == first for s in shapes):
        return first
    return [max(int(s[0]) for s in shapes), *first[1:]]


def rows_shared(base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> int:
    """Rows merged by the strategy: the base's, else those every contribution has."""
    return int(base.shape[0]) if base is not None else min(int(t.shape[0]) for t in tensors)


def split_rows(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    out_rows: int,
    compute: torch.dtype,
    storage: torch.dtype,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A resized vocabulary: (the contributions' shared rows in compute dtype, each padded with
    the base's rows it lacks; the other rows, merged by the weighted mean, in ``storage``
    dtype, or None when there are none).  The tail is computed first: the strategy may
    overwrite the shared rows in place."""
    shared = rows_shared(base, tensors)
    pieces: list[torch.Tensor] = []
    sizes = sorted({int(t.shape[0]) for t in tensors if t.shape[0] > shared} | {shared})
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        members = [i for i, t in enumerate(tensors) if t.shape[0] >= hi]
        total = sum(weights[i] for i in members)
        if total <= 0:
            raise ResolveError("the weights of the contributions with new rows sum to 0 or less")
        rows = [to_compute(tensors[i][lo:hi], compute) for i in members]
        merged = numerics.weighted_sum(rows, [weights[i] / total for i in members])
        pieces.append(from_compute(merged, storage))
    if pieces and sizes[-1] != out_rows:  # pragma: no cover - the plan sized out_rows so
        raise ResolveError(f"resized vocabulary: {sizes[-1]} rows, expected {out_rows}")
    heads: list[torch.Tensor] = []
    for t in tensors:
        head = to_compute(t[:shared], compute)
        if head.shape[0] < shared:
            assert base is not None
            head = torch.cat([head, to_compute(base[head.shape[0] : shared], compute)])
        heads.append(head)
    return heads, (torch.cat(pieces) if pieces else None)
