"""git-crdt-merge: order-free git merges of fine-tuned models.

Layer 1 (``manifest``, ``store``, ``driver``) keeps the set of contributions as a CRDT in the
repository; Layer 2 (``resolve``, ``strategies``, ``numerics``) turns that set into one merged
model with a deterministic function.  See ``docs/`` for the formats and guarantees.
"""

import os as _os

# Intel MKL (torch's BLAS/LAPACK on x86) picks a code path per CPU, and an SVD computed on an
# AVX-512 machine differs in its last bits from one on an AVX2 machine.  Its AVX2
# conditional-numerical-reproducibility branch gives the same bits on every CPU with AVX2 (x86-64
# since Intel Haswell and AMD Zen), at 4-5x the speed of the "compatible" branch that also runs
# on older CPUs; numerics.linalg refuses to run on a CPU without AVX2 rather than give other
# bits.  MKL reads this variable at its first call, so it is set here, before any submodule can
# use torch; see numerics.linalg_threads for the thread half of the rule.
_os.environ["MKL_CBWR"] = "AVX2"

__version__ = "0.1.0"
FORMAT_VERSION = 1
