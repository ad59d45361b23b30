"""What every benchmark that starts `git crdt` processes shares: the package as pip installs it.

pip compiles an installed package's modules to bytecode; an editable install (this checkout)
compiles them on first import and caches the result, unless ``PYTHONDONTWRITEBYTECODE`` is
set, as it is in some sandboxes: then every process compiles ~45 modules from source again,
about 0.15 s of start-up (0.49 s against 0.34 s for ``git crdt add-contribution --help``
here).  Compiling once, as an install does, measures the tool rather than that setting."""

from __future__ import annotations

import compileall
from pathlib import Path

import git_crdt_merge


def compile_package() -> None:
    """Write the bytecode of every module of git_crdt_merge (as ``pip install`` does)."""
    compileall.compile_dir(Path(git_crdt_merge.__file__).parent, quiet=1)
