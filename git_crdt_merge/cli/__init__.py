"""The ``git crdt`` command line: parse, call the core, render; its docs are generated from it."""
