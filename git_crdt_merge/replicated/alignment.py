"""Which differences between two models' tensor tables a merge absorbs (no torch).

The rules are data, read by the add-time and verify checks (Layer 1, here) and by the
resolution plan (Layer 2, ``resolution/align.py``), so the three agree:

- **float dtypes**: a tensor stored as F16, BF16, F32 or F64 in one model and as another of
  these in the other merges (each input is cast on load to the compute dtype; see
  ``docs/strategies.md``, "Casting and mismatches").  Other dtypes (integers, bool, float8) must
  be equal.
- **resized vocabulary**: a vocabulary tensor (:data:`VOCAB_SUFFIXES`: token embeddings and
  ``lm_head.weight``) whose shapes differ only in the first dimension (the rows, one per
  token) merges; the output has the largest row count.
- **tied heads**: :data:`HEAD` present in one model and absent from the other merges; the
  plan then reads the model without it as tied (its embedding, :data:`EMBED_SUFFIXES`, is its
  head) when its ``config.json`` does not say ``"tie_word_embeddings": false``.

Anything else (another missing tensor, another shape) is refused, naming the tensor and both
shapes.
"""

from __future__ import annotations

FLOAT_DTYPES: frozenset[str] = frozenset({"F16", "BF16", "F32", "F64"})
"""Storage dtypes (safetensors names) that are cast to one another on load."""

HEAD = "lm_head.weight"
"""The output head that a tied model does not store."""

EMBED_SUFFIXES: tuple[str, ...] = (
    "embed_tokens.weight",  # Llama, Mistral, Qwen, OPT, BART decoders
    "wte.weight",  # GPT-2, GPT-J
    "word_embeddings.weight",  # BLOOM, BERT, Falcon
    "embed_in.weight",  # GPT-NeoX, Pythia
)
"""Name endings of token-embedding tensors (one row per token)."""

VOCAB_SUFFIXES: tuple[str, ...] = (*EMBED_SUFFIXES, HEAD)
"""Name endings of tensors with one row per token: their row count may differ (resized
vocabulary)."""


def is_vocab_tensor(name: str) -> bool:
    """A tensor with one row per token (an embedding or the head)."""
    return name == HEAD or any(name == s or name.endswith("." + s) for s in EMBED_SUFFIXES)


def embedding_of(names: set[str] | frozenset[str] | dict[str, object]) -> str | None:
    """The one token-embedding tensor among ``names`` (None: none, or more than one)."""
    found = [n for n in names if n != HEAD and is_vocab_tensor(n)]
    return found[0] if len(found) == 1 else None


def difference(
    name: str,
    a: tuple[str, tuple[int, ...]],
    b: tuple[str, tuple[int, ...]],
    what_a: str,
    what_b: str,
) -> str | None:
    """Why tensor ``name`` as (dtype, shape) ``a`` and ``b`` cannot merge (None: it can)."""
    (da, sa), (db, sb) = a, b
    if sa != sb and not (is_vocab_tensor(name) and len(sa) == len(sb) >= 1 and sa[1:] == sb[1:]):
        return f"tensor {name!r} has shape {list(sa)} in {what_a}, {list(sb)} in {what_b}"
    if da != db and not (da in FLOAT_DTYPES and db in FLOAT_DTYPES):
        return f"tensor {name!r} has dtype {da} in {what_a}, {db} in {what_b}"
    return None


def missing_is_allowed(name: str) -> bool:
    """A tensor one model may have and the other lack (a tied head)."""
    return name == HEAD
