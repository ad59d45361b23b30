"""The numerics rules that make a resolution byte-identical on every machine.

Every strategy computes through this module; nothing else in the package may reduce a tensor,
draw a random number or call a transcendental function on a value that feeds a merged model.
The rules (measured with torch 2.13 on CPU under ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` and
1 or 2 threads, see ``docs/strategies.md``):

* **Elementwise**: only single, correctly rounded operations (``+ - * /``, ``where``, ``abs``,
  ``sqrt``, comparisons, casts).  Never ``add(alpha=)``, ``lerp``, ``addcmul``/``addcdiv``: they
  are fused multiply-adds on some CPUs and not on others.  Scalars enter an operation already
  rounded to the compute dtype (:func:`scalar`), so ``x * w`` means one rounding everywhere.
* **Reductions** (:func:`exact_sum`, :func:`dot`, :func:`l2_norm`, :func:`mean`,
  :func:`exact_sum_rows`, :func:`dot_rows`) return the *correctly rounded* float64 value of the
  exact sum of the float64-converted inputs.  That value is a mathematical function of the
  inputs, so summation order, SIMD width and thread split cannot change it.  Products of float32
  values are exact in float64, so :func:`dot` of float32 tensors is exact; products of float64
  values are rounded once each (deterministically), so there the guarantee is "reproducible",
  not "exact".  :func:`fold_sum` and :func:`l1_norm` (the DARE rescale's norm, two per
  contribution and tensor) are *reproducible* instead: a fixed-order float64 fold whose every
  step is one IEEE addition, so the bits depend only on the values and their count; about 5x
  faster than the exact sum, and within 1e-13 of it relative.
* **Sums over contributions** (elementwise, along the contribution axis) are a chain of two-operand
  adds in canonical order: :func:`ordered_sum`, :func:`weighted_sum`.
* **Transcendentals** (:func:`acos`, :func:`sin`, :func:`cos`) are evaluated with Python's
  :mod:`decimal` at 60 significant digits and rounded once to float64, so they never depend on the
  platform's libm.  They are meant for a few scalars per tensor (SLERP angles).
* **Linear algebra** (:func:`matmul`, :func:`matmul_symmetric`, :func:`svd`, :func:`eigh`,
  :func:`solve`, :func:`solve_spd`) runs in float64 on one thread with Intel MKL's AVX2
  reproducibility branch (``MKL_CBWR=AVX2``, set when the package is imported): measured here,
  the branch MKL picks for the CPU and the thread count both change SVD and solve results in the
  last bits; this pair does not.  The guarantee is MKL's: the same bits on every CPU with AVX2
  (x86-64 since Intel Haswell, 2013, and AMD Zen), same MKL version.  On a CPU without AVX2
  (Linux: no ``avx2`` in ``/proc/cpuinfo``'s flags, ARM included) these functions raise
  :class:`~git_crdt_merge.errors.CpuError` (exit code 9) instead of giving other bits; where
  the flags cannot be read they run.  These are for strategies whose source paper needs a
  decomposition (SVD, least squares), never for what a reduction above can do.
  :mod:`.spectral` builds partial decompositions on the same kernels (Gram eigenvalues,
  Householder QR, a randomized range finder whose test matrices come from a fixed-key blake3
  stream), for the spectral strategies.
* **Randomness** comes only from :class:`RandomStream`: a blake3 XOF keyed by the Merkle root and
  addressed by (tensor name, contribution id); integer operations only.
* **Selection** (:func:`topk_mask`, :func:`band_mask`, :func:`row_ranks`,
  :func:`keep_below_rank_table`, :func:`order_statistics`) has an exact tie rule (lowest flat
  index first), so the selected set is a function of the values alone.

How :func:`exact_sum` works (Demmel and Nguyen's pre-rounding, iterated until nothing is left):
for ``n`` values with ``max|x| <= 2**m`` pick ``E = m + bitlen(n) + 1`` and
``sigma = 1.5 * 2**E``.  ``hi = (x + sigma) - sigma`` rounds every value to a multiple of
``2**(E-52)``; all partial sums of the ``hi`` are multiples of that grid and smaller than
``2**(E+1)``, so they are exact in float64 whatever the order.  ``x - hi`` is exact too; the
remainders (at most ``2**(E-53)`` each) go through the same step on a finer grid until they are
all zero.  The level sums are then exact and ``math.fsum`` rounds their total once.  Three
levels cover typical float32 data; tiny values far below the maximum cost more levels, never a
different answer.
Measured here (torch 2.13, CPU, one thread): 4M float32 normal values: ``exact_sum`` ~13 ms,
``dot`` ~16 ms, ``l1_norm`` (the fold) ~2 ms (see ``docs/strategies.md``).
"""

from __future__ import annotations

from .dtypes import (
    COMPUTE_DTYPES,
    FLOAT_BITS,
    FLOAT_COMPUTE_DTYPES,
    from_compute,
    keep_where_,
    ordered_sum,
    scalar,
    to_compute,
    weighted_sum,
    weighted_sum_,
)
from .elementwise import exp, log
from .linalg import (
    eigh,
    linalg_threads,
    matmul,
    matmul_symmetric,
    on_device,
    run_side_by_side,
    solve,
    solve_spd,
    svd,
)
from .reductions import dot, dot_rows, exact_sum, exact_sum_rows, fold_sum, l1_norm, l2_norm, mean
from .scalars import acos, cos, sin, sqrt
from .selection import (
    band_mask,
    bottom_mask,
    keep_below_rank_table,
    keep_topk_magnitude_,
    kth_smallest,
    magnitude_row_ranks,
    order_statistics,
    row_ranks,
    topk_magnitude_mask,
    topk_mask,
)
from .stream import RandomStream, stream_message, threshold_u32, thresholds_u32

__all__ = [
    "COMPUTE_DTYPES",
    "FLOAT_COMPUTE_DTYPES",
    "eigh",
    "linalg_threads",
    "matmul",
    "matmul_symmetric",
    "run_side_by_side",
    "solve",
    "solve_spd",
    "svd",
    "RandomStream",
    "acos",
    "band_mask",
    "bottom_mask",
    "cos",
    "dot",
    "dot_rows",
    "exact_sum",
    "exact_sum_rows",
    "exp",
    "fold_sum",
    "keep_below_rank_table",
    "keep_topk_magnitude_",
    "from_compute",
    "l1_norm",
    "l2_norm",
    "log",
    "mean",
    "ordered_sum",
    "magnitude_row_ranks",
    "order_statistics",
    "row_ranks",
    "scalar",
    "sin",
    "sqrt",
    "to_compute",
    "topk_magnitude_mask",
    "topk_mask",
    "weighted_sum",
    "FLOAT_BITS",
    "keep_where_",
    "kth_smallest",
    "on_device",
    "stream_message",
    "threshold_u32",
    "thresholds_u32",
    "weighted_sum_",
]
