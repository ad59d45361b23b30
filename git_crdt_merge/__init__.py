"""git-crdt-merge: order-free git merges of fine-tuned models.

Layer 1 (``manifest``, ``store``, ``driver``) keeps the set of contributions as a CRDT in the
repository; Layer 2 (``resolve``, ``strategies``, ``numerics``) turns that set into one merged
model with a deterministic function.  See ``docs/`` for the formats and guarantees.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 1
