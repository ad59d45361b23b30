"""git-crdt-merge: order-free git merges of fine-tuned models.

Layer 1 (``manifest``, ``store``, ``driver``) keeps the set of contributions as a CRDT in the
repository; Layer 2 (``resolve``, ``strategies``, ``numerics``) turns that set into one merged
model with a deterministic function.  See ``docs/`` for the formats and guarantees.
"""

import os as _os

# Intel MKL (torch's BLAS/LAPACK on x86) picks a code path per CPU, and an SVD computed on an
# AVX-512 machine differs in its last bits from one on an AVX2 machine.  Its "compatible"
# conditional-numerical-reproducibility branch gives the same bits on every x86 CPU.  MKL reads
# this variable at its first call, so it is set here, before any submodule can use torch; see
# numerics.linalg_threads for the thread half of the rule.
_os.environ["MKL_CBWR"] = "COMPATIBLE"

__version__ = "0.1.0"
FORMAT_VERSION = 1
