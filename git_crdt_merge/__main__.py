"""``python -m git_crdt_merge``: the same entry point as the ``git-crdt`` console script."""

from .entry import main

main()
