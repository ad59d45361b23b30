"""The result cache (``.git/crdt/cache/<merkle root>/``) and the work-tree output folder.

A resolved model is written once into the cache, under a temporary name renamed into place
when complete, and made read-only.  The output folder (the ``output`` register, default
``merged/``) holds hard links to the cached files (copies across file systems).  This module
imports no torch, so a checkout that returns to a known set costs a few file operations.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from . import faults, gitops
from .errors import ResolveError
from .repo import Repo, atomic_write, pid_alive

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

    The new folder is assembled inside the cache (so an interrupted publish leaves nothing in
    the work tree) and swapped with the old one in one atomic exchange (``renameat2``
    ``RENAME_EXCHANGE``; two renames where the kernel lacks it), so a reader sees the old model
    or the new one, never a mixture of files and never a half-written folder.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(out_dir)
    remove_stale_work(cache_dir.parent)
    _remove_stale_siblings(out_dir)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = cache_dir.parent / f".publish-{stamp}"
    try:
        _assemble(cache_dir, tmp)
        faults.point("publish:assembled")
        _swap_in(tmp, out_dir, cache_dir.parent / f".old-{stamp}")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno != errno.EXDEV:
            raise
        # the output lies on another file system than the cache: assemble beside it
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{stamp}")
        _assemble(cache_dir, tmp)
        _swap_in(tmp, out_dir, out_dir.with_name(f".{out_dir.name}.old-{stamp}"))


def _assemble(cache_dir: Path, tmp: Path) -> None:
    tmp.mkdir()
    for f in sorted(cache_dir.iterdir()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, out_dir: Path, old: Path) -> None:
    """Put the assembled folder ``tmp`` at ``out_dir``; the previous folder is deleted."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and _exchange(tmp, out_dir):
        faults.point("publish:old-moved")  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(out_dir, old)
    faults.point("publish:old-moved")
    os.replace(tmp, out_dir)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


_STALE = re.compile(r"\.(?:tmp-[0-9a-f]+|publish|old)-(\d+)-\d+\Z")


def remove_stale_work(base: Path) -> None:
    """Drop the folders a killed resolve or publish left in the cache (their process is gone)."""
    for path in base.glob(".*-*-*"):
        m = _STALE.match(path.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def check_replaceable(out_dir: Path) -> None:
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
    """Drop the folders a publish across file systems left beside the output when killed."""
    for sibling in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        m = re.match(r"(?:tmp|old)-(\d+)-\d+\Z", sibling.name[len(out_dir.name) + 2 :])
        if m and not pid_alive(int(m.group(1))) and sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)


def try_publish(repo: Repo, key: str, out_dir: Path) -> bool:
    """On a cache hit, make ``out_dir`` the cached result (if it is not already); else False."""
    hit = cached(repo, key)
    if hit is None:
        return False
    remove_stale_work(hit.parent)
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
    text = exclude.read_text("utf-8") if exclude.exists() else ""
    sep = "" if not text or text.endswith("\n") else "\n"
    atomic_write(exclude, f"{text}{sep}/{rel.as_posix()}/\n".encode())


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
    remove_stale_work(base)
    path = base / f".tmp-{key[:16]}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    return path
