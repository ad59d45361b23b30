"""Shared fixtures: real git in temporary repositories, never the user's global config.

The helpers they use, and that tests import, are in ``helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import isolate_git, new_repo


@pytest.fixture(autouse=True)
def isolated_git(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Point git at an empty global config and put this venv's ``git-crdt`` on PATH."""
    isolate_git(tmp_path_factory.mktemp("home"), monkeypatch)
    yield


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return new_repo(tmp_path / "repo")
