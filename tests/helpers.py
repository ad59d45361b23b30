"""Test helpers: real git and ``git crdt`` in temporary repositories, models of random bytes.

Imported by the test modules (``from helpers import git, crdt``); the fixtures that use them
are in ``conftest.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BIN = str(Path(sys.executable).parent)


def isolate_git(home: Path, mp: pytest.MonkeyPatch) -> None:
    """Point git at an empty global config in ``home`` and put this venv's ``git-crdt`` on
    PATH (also for module-scoped fixtures, through ``pytest.MonkeyPatch.context()``)."""
    gconf = home / ".gitconfig"
    gconf.write_text(
        "[user]\n\tname = Test User\n\temail = test@example.com\n"
        "[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n"
    )
    mp.setenv("HOME", str(home))
    mp.setenv("GIT_CONFIG_GLOBAL", str(gconf))
    mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
    mp.setenv("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
    mp.setenv("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
    mp.setenv("PATH", BIN + os.pathsep + os.environ.get("PATH", ""))
    mp.delenv("GIT_DIR", raising=False)
    mp.delenv("GIT_WORK_TREE", raising=False)


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"git {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def crdt(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``git crdt ARGS`` exactly as a user would."""
    proc = subprocess.run(["git", "crdt", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"git crdt {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def make_model(
    path: Path,
    seed: int,
    shapes: dict[str, tuple[int, ...]] | None = None,
    dtype: str = "float32",
    shared: dict[str, object] | None = None,
) -> Path:
    """Write a small safetensors model with deterministic values (independent of torch RNG)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    shapes = shapes or {"layer.0.weight": (8, 16), "layer.0.bias": (8,), "head.weight": (4, 8)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        arr = rng.standard_normal(shape).astype(np.float32)
        tensors[name] = torch.from_numpy(arr).to(getattr(torch, dtype))
    for name, value in (shared or {}).items():
        tensors[name] = value  # type: ignore[assignment]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def new_repo(path: Path, *, init_crdt: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    if init_crdt:
        crdt(path, "init", "-q")
        git(path, "commit", "-q", "-m", "init crdt")
    return path


_ORIGINS: dict[str, Path] = {}


def origin_copy(
    name: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    prepare: Callable[[Path, Path], None] | None = None,
) -> Path:
    """A private copy of a bare origin whose history is ``git crdt init`` (plus ``prepare(seed,
    scratch)``), built once per test session under ``name`` (inside the isolated git
    environment of the first test that asks for it)."""
    if name not in _ORIGINS:
        tmp = tmp_path_factory.mktemp(f"origin-{name}")
        seed = new_repo(tmp / "seed")
        if prepare is not None:
            prepare(seed, tmp)
        git(tmp, "clone", "-q", "--bare", str(seed), str(tmp / "origin.git"))
        _ORIGINS[name] = tmp / "origin.git"
    return Path(shutil.copytree(_ORIGINS[name], tmp_path / "origin.git", symlinks=True))


def descriptor_address(repo: Path, cid: str) -> str:
    """Where contribution (or base) ``cid``'s descriptor is stored: format-2 records name it
    (``desc``); for format 1 it is the id itself."""
    from git_crdt_merge.replicated.repo import Repo

    return Repo.open(repo).read_manifest().descriptor_address(cid)


def fresh_repo(path: Path) -> Path:
    """A repository with git-crdt set up and the resolving hooks off."""
    repo = new_repo(path)
    git(repo, "config", "crdt.autoResolve", "false")
    return repo


def set_base(repo: Path, path: Path) -> str:
    return json.loads(crdt(repo, "set-base", str(path), "--json").stdout)["id"]


def choose(repo: Path, strategy: str, **params: object) -> None:
    """What ``git crdt strategy`` writes, without paying for its torch import."""
    from git_crdt_merge.replicated.contributions import set_register
    from git_crdt_merge.replicated.repo import Repo

    set_register(Repo.open(repo), "strategy", {"name": strategy, "params": params})


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def random_model(path: Path, seed: int, shared: bytes | None = None) -> Path:
    """Random finite float32 bit patterns (no NaN or Inf): two tensors, several chunks each;
    ``shared`` (bytes) becomes a third tensor that several models hold."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, n in (("a.weight", 60_000), ("b.weight", 20_000)):
        bits = rng.integers(0, 1 << 32, n, dtype=np.uint32) & np.uint32(0xBFFFFFFF)
        tensors[name] = torch.from_numpy(bits.view(np.float32).copy())
    if shared is not None:
        arr = np.frombuffer(shared, dtype=np.uint32) & np.uint32(0xBFFFFFFF)
        tensors["frozen.weight"] = torch.from_numpy(arr.view(np.float32).copy())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
