"""Counter-based randomness: a blake3 stream keyed by the Merkle root, tensor and contribution.

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import blake3
import numpy as np
import torch

from .dtypes import FLOAT_BITS

_STREAM_DOMAIN = b"git-crdt-merge/random-stream/v1"
_TWO32 = 2**32


def _encode_field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def stream_message(tensor_name: str, contribution_id: str) -> bytes:
    """The canonical bytes hashed for one stream: length-prefixed (u64 little endian) UTF-8 of a
    domain tag, the tensor name and the contribution id."""
    return b"".join(
        _encode_field(part)
        for part in (_STREAM_DOMAIN, tensor_name.encode("utf-8"), contribution_id.encode("utf-8"))
    )


def threshold_u32(p: float) -> int:
    """``floor(clamp(p, 0, 1) * 2**32)``: the integer a 32-bit draw must stay below to be kept.

    The keep probability is exactly ``threshold / 2**32``; p >= 1 keeps everything."""
    if math.isnan(p):
        raise ValueError("probability is nan")
    return int(math.floor(min(max(p, 0.0), 1.0) * _TWO32))


_WORD_BLOCK = 1 << 20  # words drawn per blake3 call by bernoulli_mask
_KEEP_WORDS = 1 << 18  # and by keep_bernoulli_, whose blocks are applied at once


class RandomStream:
    """Counter-based random bits keyed by the Merkle root.

    The stream of (tensor name, contribution id) is the blake3 extendable output of
    :func:`stream_message` hashed in keyed mode with ``key = root``, read as little-endian
    uint32 words.  Word ``i`` of a stream depends only on (root, name, id, i): streams can be read
    in slices, on any platform, and changing one contribution never moves another's mask."""

    def __init__(self, root: bytes) -> None:
        if not isinstance(root, bytes) or len(root) != 32:
            raise ValueError("RandomStream needs a 32-byte root")
        self.root = root

    @classmethod
    def from_seed(cls, seed: bytes) -> RandomStream:
        """The stream of a resolution: ``seed`` is the first 8 bytes of the Merkle root, and the
        stream key is ``blake3("git-crdt-merge/seed/v1" || seed)``."""
        if not isinstance(seed, bytes) or len(seed) != 8:
            raise ValueError("RandomStream.from_seed needs 8 bytes")
        return cls(blake3.blake3(b"git-crdt-merge/seed/v1" + seed).digest())

    def __repr__(self) -> str:
        return f"RandomStream({self.root.hex()[:16]}...)"

    def bits(self, tensor_name: str, contribution_id: str, n: int, offset: int = 0) -> torch.Tensor:
        """Words ``offset .. offset+n-1`` of the stream as an int64 tensor of values in
        [0, 2**32)."""
        if n < 0 or offset < 0:
            raise ValueError("bits: n and offset must be >= 0")
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        hasher = blake3.blake3(stream_message(tensor_name, contribution_id), key=self.root)
        raw = hasher.digest(length=4 * n, seek=4 * offset)
        words = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        return torch.from_numpy(words)

    def words(self, tensor_name: str, contribution_id: str, n: int, offset: int = 0) -> np.ndarray:
        """Words ``offset .. offset+n-1`` of the stream as a numpy uint32 array (the values of
        :meth:`bits`, 4 bytes each)."""
        if n < 0 or offset < 0:
            raise ValueError("words: n and offset must be >= 0")
        hasher = blake3.blake3(stream_message(tensor_name, contribution_id), key=self.root)
        return np.frombuffer(hasher.digest(length=4 * n, seek=4 * offset), dtype="<u4")

    def uniform(
        self, tensor_name: str, contribution_id: str, n: int, offset: int = 0
    ) -> torch.Tensor:
        """``bits / 2**32`` as float64 in [0, 1): exact (32-bit integers, power-of-two scale)."""
        words = self.bits(tensor_name, contribution_id, n, offset)
        return words.to(torch.float64) * (1.0 / _TWO32)

    def bernoulli_mask(
        self, tensor_name: str, contribution_id: str, shape: Sequence[int], p: float
    ) -> torch.Tensor:
        """Bool mask of ``shape``: element ``i`` (row-major) is kept iff
        ``bits[i] < threshold_u32(p)``, i.e. with probability ``floor(p * 2**32) / 2**32``."""
        size = torch.Size(shape)
        threshold = threshold_u32(p)
        if threshold >= _TWO32:
            return torch.ones(size, dtype=torch.bool)
        if size.numel() == 0 or threshold <= 0:
            return torch.zeros(size, dtype=torch.bool)
        # compared as uint32 in numpy: the same integer test as ``bits() < threshold``, without
        # widening 4 bytes per element to 8; the words are drawn a block at a time (the stream
        # can be read at any offset), so no 4-bytes-per-element buffer exists at once
        n = size.numel()
        mask = np.empty(n, dtype=bool)
        hasher = blake3.blake3(stream_message(tensor_name, contribution_id), key=self.root)
        limit = np.uint32(threshold)
        for lo in range(0, n, _WORD_BLOCK):
            count = min(_WORD_BLOCK, n - lo)
            raw = hasher.digest(length=4 * count, seek=4 * lo)
            np.less(np.frombuffer(raw, dtype="<u4"), limit, out=mask[lo : lo + count])
        return torch.from_numpy(mask).reshape(size)

    def keep_bernoulli_(
        self, x: torch.Tensor, tensor_name: str, contribution_id: str, p: float
    ) -> torch.Tensor:
        """``keep_where_(x, self.bernoulli_mask(tensor_name, contribution_id, x.shape, p))`` in
        place, without the mask: the words are drawn and applied a block at a time (dropped
        entries become +0.0: their bits times 0).  ``x`` must be a contiguous CPU tensor."""
        threshold = threshold_u32(p)
        if threshold >= _TWO32 or x.numel() == 0:
            return x
        bits = x.detach().view(-1).view(FLOAT_BITS[x.dtype]).numpy()
        if threshold <= 0:
            bits[:] = 0
            return x
        n = bits.size
        hasher = blake3.blake3(stream_message(tensor_name, contribution_id), key=self.root)
        limit = np.uint32(threshold)
        keep = np.empty(min(n, _KEEP_WORDS), dtype=bool)
        for lo in range(0, n, _KEEP_WORDS):
            count = min(_KEEP_WORDS, n - lo)
            raw = hasher.digest(length=4 * count, seek=4 * lo)
            np.less(np.frombuffer(raw, dtype="<u4"), limit, out=keep[:count])
            part = bits[lo : lo + count]
            np.multiply(part, keep[:count], out=part)
        return x

    def bernoulli_mask_per_element(
        self, tensor_name: str, contribution_id: str, p: torch.Tensor
    ) -> torch.Tensor:
        """Bool mask shaped like ``p``: element ``i`` is kept iff ``bits[i] < floor(c_i * 2**32)``
        with ``c_i = clamp(float64(p_i), 0, 1)`` (nan counts as 0).  Every step is exact: the
        conversion to float64, the clamp, the power-of-two scale, the floor and the integer
        compare; so the same ``p`` draws the same mask everywhere."""
        return self.bernoulli_mask_below(tensor_name, contribution_id, thresholds_u32(p))

    def bernoulli_mask_below(
        self, tensor_name: str, contribution_id: str, thresholds: torch.Tensor
    ) -> torch.Tensor:
        """Bool mask shaped like ``thresholds`` (int64, in [0, 2**32]): element ``i`` is kept
        iff ``bits[i] < thresholds[i]``; the words are compared as unsigned 32-bit integers,
        never widened to a tensor of their own."""
        n = thresholds.numel()
        if n == 0:
            return torch.zeros(thresholds.shape, dtype=torch.bool)
        hasher = blake3.blake3(stream_message(tensor_name, contribution_id), key=self.root)
        words = np.frombuffer(hasher.digest(length=4 * n), dtype="<u4")
        limits = thresholds.detach().to(device="cpu", dtype=torch.int64).reshape(-1).numpy()
        return torch.from_numpy(np.less(words, limits)).reshape(thresholds.shape)


def thresholds_u32(p: torch.Tensor) -> torch.Tensor:
    """``floor(c * 2**32)`` (int64) with ``c = clamp(float64(p), 0, 1)`` (nan counts as 0): per
    element, what :func:`threshold_u32` is for one probability.  Every step is exact."""
    c = torch.nan_to_num(p.to(device="cpu", dtype=torch.float64), nan=0.0).clamp(0.0, 1.0)
    return torch.floor(c * float(_TWO32)).to(torch.int64)
