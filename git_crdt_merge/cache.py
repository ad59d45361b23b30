"""The result cache (``.git/crdt/cache/<merkle root>/``) and the work-tree output folder.

A resolved model is written once into the cache, under a temporary name renamed into place
when complete, and made read-only.  The output folder (the ``output`` register, default
``merged/``) holds hard links to the cached files (copies across file systems).  This module
imports no torch, so a checkout that returns to a known set costs a few file operations.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import faults, gitops
from .errors import ResolveError
from .repo import Repo

RESOLUTION_FILE = "resolution.json"
DEFAULT_MAX_SHARD = 5 * 1000**3


def seed_of(root: str) -> bytes:
    """The seed of all randomness in a resolution: the first 8 bytes of the Merkle root."""
    return bytes.fromhex(root)[:8]


def cache_key(root: str, compute_dtype: str, device: str, max_shard: int) -> str:
    """The Merkle root names the default result; other numerics or shard sizes get their own
    entry (``<root>.float64.cpu``, ``<root>.shard1000000``)."""
    key = root
    if (compute_dtype, device) != ("float32", "cpu"):
        key += f".{compute_dtype}.{device}"
    if max_shard != DEFAULT_MAX_SHARD:
        key += f".shard{max_shard}"
    return key


def cache_root(repo: Repo) -> Path:
    return repo.state_dir / "cache"


def cached(repo: Repo, key: str) -> Path | None:
    """The cache folder of ``key`` if a complete result is there."""
    path = cache_root(repo) / key
    return path if (path / RESOLUTION_FILE).is_file() else None


def output_key(out_dir: Path) -> str | None:
    """The cache key recorded in an output folder's resolution.json."""
    try:
        return str(json.loads((out_dir / RESOLUTION_FILE).read_text())["cache_key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def output_is_current(out_dir: Path, key: str, cache_dir: Path) -> bool:
    """True if ``out_dir`` already holds exactly the cached files of ``key``."""
    if output_key(out_dir) != key:
        return False
    want = sorted(p.name for p in cache_dir.iterdir())
    try:
        have = sorted(p.name for p in out_dir.iterdir())
    except OSError:
        return False
    if want != have:
        return False
    for name in want:
        a, b = (cache_dir / name).stat(), (out_dir / name).stat()
        if (a.st_ino, a.st_dev) != (b.st_ino, b.st_dev) and a.st_size != b.st_size:
            return False
    return True


def publish(cache_dir: Path, out_dir: Path) -> None:
    """Make ``out_dir`` a set of links to ``cache_dir``'s files, replacing it whole.

    The new folder is assembled beside the old one and swapped in by rename, so a reader sees
    the old model or the new one, never a mixture of files.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(out_dir)
    _remove_stale_siblings(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for f in sorted(cache_dir.iterdir()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    faults.point("publish:assembled")
    if out_dir.exists() or out_dir.is_symlink():
        os.replace(out_dir, old)
        faults.point("publish:old-moved")
    os.replace(tmp, out_dir)
    if old.exists() or old.is_symlink():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _check_replaceable(out_dir: Path) -> None:
    """Only an earlier output (or nothing) may be replaced: a manifest from an untrusted pull
    could point the ``output`` register at a folder of the user's, and publishing swaps the
    folder out whole."""
    if out_dir.is_symlink() or not out_dir.exists():
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and output_key(out_dir) is None):
        raise ResolveError(
            f"output folder {out_dir} exists and is not a merged model written by git-crdt; "
            "refusing to replace it (move it away, or choose another with 'git crdt output')"
        )


def _remove_stale_siblings(out_dir: Path) -> None:
    """Drop the temporary folders of a publish that was killed (its process is gone)."""
    for sibling in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        parts = sibling.name[len(out_dir.name) + 2 :].split("-")
        if parts[0] not in ("tmp", "old") or not parts[1:] or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)


def try_publish(repo: Repo, key: str, out_dir: Path) -> bool:
    """On a cache hit, make ``out_dir`` the cached result (if it is not already); else False."""
    hit = cached(repo, key)
    if hit is None:
        return False
    if not output_is_current(out_dir, key, hit):
        publish(hit, out_dir)
        keep_out_of_git(repo, out_dir)
    return True


def keep_out_of_git(repo: Repo, out_dir: Path) -> None:
    """Make sure git ignores the output folder (``/merged/`` is in .gitignore from init; another
    ``output`` register value is added to .git/info/exclude)."""
    try:
        rel = out_dir.resolve().relative_to(repo.root.resolve())
    except ValueError:
        return  # outside the work tree
    proc = gitops.run(["check-ignore", "-q", "--", f"{rel.as_posix()}/"], repo.root, check=False)
    if proc.returncode == 0:
        return
    exclude = gitops.git_dir(repo.root) / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a", encoding="utf-8") as fh:
        fh.write(f"/{rel.as_posix()}/\n")


def commit_to_cache(repo: Repo, key: str, tmp_dir: Path) -> Path:
    """Move a finished result folder into the cache (atomic rename); return its path."""
    final = cache_root(repo) / key
    for f in tmp_dir.iterdir():
        f.chmod(0o444)
    try:
        os.replace(tmp_dir, final)
    except OSError:
        # Another process finished the same root first: its result is identical.
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


def new_work_dir(repo: Repo, key: str) -> Path:
    base = cache_root(repo)
    base.mkdir(parents=True, exist_ok=True)
    path = base / f".tmp-{key[:16]}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    return path
