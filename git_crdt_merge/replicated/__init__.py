"""Layer 1, the replicated set: manifest, descriptors, object store, repository, writers.

Nothing here imports Layer 2 (``resolution/``, ``strategies/``, ``numerics``) or torch at
import time; ``tests/test_architecture.py`` checks it.
"""
