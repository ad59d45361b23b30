"""The ``git crdt`` command line: parse, call the core, render; its docs are generated from it."""

from __future__ import annotations

import importlib

# The command groups, in the order 'git crdt -h' (and docs/cli.md) lists their commands:
# importing a group registers its commands on the app.
COMMAND_GROUPS = (
    "wiring",
    "writing",
    "resolving",
    "recipes",
    "reading",
    "repairing",
    "checking",
    "tools",
)

for _group in COMMAND_GROUPS:
    importlib.import_module(f"{__name__}.{_group}")
