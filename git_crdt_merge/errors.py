"""The one error hierarchy of the package.

Core modules raise these; ``cli`` and ``driver`` turn them into a one-line message on stderr and
the exit code below.  The table in ``docs/errors.md`` lists the same codes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" (did you mean 'ties'?)"`` for the closest of ``known`` to a mistyped ``name``
    (difflib's ratio >= 0.6), else ``""``: appended to a "no such name" message."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CrdtError(Exception):
    """Base class: a failure the user can act on.  ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(CrdtError):
    """Wrong arguments or options."""

    exit_code = 2


class NotARepositoryError(CrdtError):
    """Not inside a git work tree, or the repository has no ``.crdt/`` (run ``git crdt init``)."""

    exit_code = 3


class InputError(CrdtError):
    """A model file, directory, name or value that cannot be accepted."""

    exit_code = 4


class ManifestError(CrdtError):
    """The manifest is malformed, non-canonical or inconsistent."""

    exit_code = 5


class StoreError(CrdtError):
    """An object is missing, truncated or does not match its hash."""

    exit_code = 6


class LockError(CrdtError):
    """Another git-crdt process holds the repository lock."""

    exit_code = 7


class NotFoundError(CrdtError):
    """A named contribution, revision or strategy does not exist."""

    exit_code = 8


class ResolveError(CrdtError):
    """The merged model cannot be computed (strategy contract, parameters, incompatible inputs)."""

    exit_code = 9


class CpuError(ResolveError):
    """This CPU cannot give the reproducible bits a computation needs: the float64 linear
    algebra (``numerics.matmul``/``svd``/``eigh``/``solve``) needs an x86-64 CPU with AVX2."""


class GitError(CrdtError):
    """A git command failed."""

    exit_code = 10
