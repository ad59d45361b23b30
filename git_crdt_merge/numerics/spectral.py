"""Reproducible partial spectral decompositions: Gram eigenvalues, a counter-based randomized
range finder, and the projections onto leading singular subspaces built from them.

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules.  Everything runs on the
float64, one-thread kernels of :mod:`.linalg` in MKL's reproducible branch (``matmul``,
``matmul_symmetric``, ``eigh``, QR), and
the random test matrices come from a blake3 stream with a fixed key addressed by (key, block), so
every result is a function of the input bits alone.

Conventions: ``w`` is a *wide* float64 matrix (m <= n; callers transpose tall ones), its Gram
is ``G = w w^T`` (m x m), ``G``'s eigenvalues are the squared singular values of ``w``.  A Gram
eigenvalue has an absolute error of about ``m * eps * s_1^2`` (``eps = 2^-52``), so a singular
value taken from it has an absolute error of about ``m * eps * s_1^2 / s_i``: relative precision
for the leading values, none below ``sqrt(m * eps) * s_1``.
"""

from __future__ import annotations

import math

import blake3
import torch

from .linalg import linalg_threads, matmul
from .reductions import fold_sum
from .stream import RandomStream

__all__ = [
    "POWER_ITERATIONS",
    "block_size",
    "eigvalsh",
    "gram_spectrum",
    "orthonormal",
    "project",
    "range_finder",
    "sketch",
]

POWER_ITERATIONS = 2
"""Power iterations of every range finder (a fixed number: part of the result's definition)."""

_SKETCH = RandomStream(blake3.blake3(b"git-crdt-merge/spectral-sketch/v1").digest())


def eigvalsh(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a symmetric matrix, float64, one thread (no vectors: about a
    third of :func:`.linalg.eigh`'s time)."""
    with linalg_threads():
        return torch.linalg.eigvalsh(x.to(torch.float64))


def gram_spectrum(values: torch.Tensor) -> list[float]:
    """Gram eigenvalues (ascending, as LAPACK returns them) as squared singular values in
    descending order, negative rounding noise clamped to 0."""
    return [max(v, 0.0) for v in reversed(values.tolist())]


def block_size(m: int) -> int:
    """Columns added per step of the adaptive range finder of an m x n (m <= n) matrix."""
    return max(16, m // 32)


def sketch(
    key: str, block: int, rows: int, cols: int, device: torch.device | None = None
) -> torch.Tensor:
    """A rows x cols matrix of independent +-1 entries (float64), word i of the blake3 stream of
    (key, block) giving entry i (row-major) by its lowest bit.  Fixed key: the same test matrix
    on every machine, independent of the Merkle root."""
    words = _SKETCH.bits(key, f"block {block}", rows * cols)
    return ((words & 1) * 2 - 1).to(device=device, dtype=torch.float64).reshape(rows, cols)


def orthonormal(y: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """An orthonormal basis of the columns of ``y`` made orthogonal to the orthonormal columns
    of ``q``: block Gram-Schmidt then Householder QR, done twice (twice is enough: Kahan), so
    the result stays orthogonal to ``q`` even when ``y`` lies almost in its span."""
    with linalg_threads():
        for _ in range(2):
            if q is not None and q.shape[1]:
                y = y - torch.matmul(q, torch.matmul(q.T, y))
            y = torch.linalg.qr(y).Q
    return y


def project(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``Z Z^T w`` for the orthonormalized columns of ``z``: the orthogonal projection of ``w``
    onto their span (re-orthonormalized first, so it is a projection up to rounding)."""
    z = orthonormal(z)
    return matmul(z, matmul(z.T, w))


def range_finder(
    w: torch.Tensor, key: str, columns: int, block: int, q: torch.Tensor | None
) -> torch.Tensor:
    """``columns`` new orthonormal columns approximating the leading left singular subspace of
    ``w`` beyond ``q``: Y = w Omega (Omega = :func:`sketch` (key, block), n x columns), then
    :data:`POWER_ITERATIONS` times Y = w (w^T Y), re-orthonormalized (against ``q`` as well)
    after every product."""
    y = orthonormal(matmul(w, sketch(key, block, w.shape[1], columns, w.device)), q)
    for _ in range(POWER_ITERATIONS):
        y = orthonormal(matmul(w, matmul(w.T, y)), q)
    return y


def energy(t: torch.Tensor) -> float:
    """``||t||_F^2`` of a float64 matrix, reproducibly: each square rounded once, summed by
    :func:`.reductions.fold_sum` (several times faster than the exact sum on float64 squares,
    whose bits spread over many levels); relative error below :func:`energy_error`."""
    t = t.to(torch.float64)
    return fold_sum(t * t)


def energy_error(n: int) -> float:
    """A bound on :func:`energy`'s relative error for ``n`` elements: the fold's
    ``(n / 2^16 + 16) * 2^-53`` plus one rounding per square, doubled for margin."""
    return (n / 65536 + 18) * 2.0**-52


def holds_energy(t: torch.Tensor, target: float) -> bool:
    """Whether the exact ``||t||_F^2`` of the float64 values ``t`` is at least ``target``,
    decided from :func:`energy` with its error bound as margin (so never wrongly true)."""
    return energy(t) >= target * (1.0 + energy_error(t.numel()))


def prefix_rank(values: list[float], target: float) -> int | None:
    """The smallest r with fsum(values[:r]) >= target (values descending, >= 0), or None."""
    if target <= 0:
        return 0
    if math.fsum(values) < target:
        return None
    lo, hi = 1, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if math.fsum(values[:mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo
