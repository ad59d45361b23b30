"""The result cache (``.git/crdt/cache/<key>/``) and the work-tree output folder.

A resolved model is written once into the cache, under a temporary name renamed into place
when complete, and made read-only.  The output folder (the ``output`` register, default
``merged/``) holds hard links to the cached files (copies across file systems), so a checkout
that returns to a known set costs a few file operations; this module imports no torch.

Nothing in the work tree or the cache is trusted by name or size (docs/security.md):

- **Content records.**  When a cache entry is committed, the blake3 of each of its files is
  recorded under ``.git/crdt/verified/<key>.json`` with the file's identity (inode, size,
  mtime and ctime: every write changes the ctime, and no program can set it).  A hit whose
  files no longer have the recorded identity is re-hashed; an entry that does not match its
  record is dropped and computed again.  So an edit through a hard link in ``merged/``
  (which edits the shared file) can never change what a later resolve serves.  Our own link
  and unlink calls change a ctime too: the record is refreshed right after them, when the
  file was verified unchanged just before.
- **Publication markers.**  Publishing records, under ``.git/crdt/published/``, the output
  folder's path and identity (device, inode) and each published file's blake3 and identity.
  An output folder is *ours* only if that marker names it: a ``resolution.json`` planted by a
  commit, or a folder git tracks, is never replaced.  An output is *current* only if its
  files have the recorded identity or, failing that, the recorded blake3.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from .. import bounded, faults
from ..errors import CrdtError, ResolveError
from ..git import commands as gitops
from ..replicated.manifest import Manifest
from ..replicated.repo import Repo, atomic_write, pid_alive
from ..sizes import parse_size
from ..vocabulary import STRATEGY_REVISIONS

RESOLUTION_FILE = "resolution.json"
DEFAULT_MAX_SHARD = 5 * 1000**3
MARKER_LIMIT = 1024**2  # bytes of one content record or publication marker
RESOLUTION_LIMIT = 64 * 1024**2  # bytes of an entry's resolution.json (one line per input)
_HASH_PIECE = 1 << 20


def seed_of(root: str) -> bytes:
    """The seed of all randomness in a resolution: the first 8 bytes of the Merkle root."""
    return bytes.fromhex(root)[:8]


@dataclass(frozen=True)
class Settings:
    """How a set is resolved, beside what it is: the device, compute dtype and shard size name
    the result (:func:`cache_key`); ``workers`` (processes, None: the default of
    ``pool.choose_workers``) never does, since any number gives the same bytes."""

    device: str = "cpu"
    compute_dtype: str = "float32"
    max_shard: int = DEFAULT_MAX_SHARD
    workers: int | None = None

    def key(self, root: str, revision: int = 1) -> str:
        return cache_key(root, self.compute_dtype, self.device, self.max_shard, revision)


def cache_key(root: str, compute_dtype: str, device: str, max_shard: int, revision: int = 1) -> str:
    """The Merkle root names the default result; other numerics, shard sizes or a strategy's
    later algorithm get their own entry (``<root>.float64.cpu``, ``<root>.shard1000000``,
    ``<root>.r2``: revision 2 of the strategy, :func:`strategy_revision`)."""
    key = root
    if (compute_dtype, device) != ("float32", "cpu"):
        key += f".{compute_dtype}.{device}"
    if max_shard != DEFAULT_MAX_SHARD:
        key += f".shard{max_shard}"
    if revision != 1:
        key += f".r{revision}"
    return key


def strategy_revision(manifest: Manifest) -> int:
    """The revision of the manifest's strategy (``Strategy.revision``, from the torch-free
    mirror :data:`vocabulary.STRATEGY_REVISIONS`)."""
    name = manifest.strategy().get("name")
    return STRATEGY_REVISIONS.get(name, 1) if isinstance(name, str) else 1


_KEY_RE = re.compile(r"[0-9a-f]{64}(?:\.[a-z0-9]+)*\Z")


def cache_root(repo: Repo) -> Path:
    return repo.state_dir / "cache"


def _records_dir(repo: Repo) -> Path:
    return repo.state_dir / "verified"


def _markers_dir(repo: Repo) -> Path:
    return repo.state_dir / "published"


# -- file identity and content ---------------------------------------------------------------
def identity(st: os.stat_result) -> list[int]:
    """What says "the same file, unchanged" cheaply: inode, device, size, mtime and ctime
    (ns).  Any write changes the ctime, and user programs cannot set it back."""
    return [st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def hash_file(path: Path) -> str:
    """blake3 of a regular file (never through a symbolic link), read in bounded pieces."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        buf = bytearray(_HASH_PIECE)  # one small reused buffer: resolution's RSS budget
        view = memoryview(buf)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    return h.hexdigest()
                h.update(view[:n])
    finally:
        os.close(fd)


def _hash_or_none(path: Path) -> str | None:
    try:
        return hash_file(path)
    except OSError:
        return None


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = bounded.read_regular(path, MARKER_LIMIT, "record")
        value = bounded.loads_json(data, "record")
    except (OSError, CrdtError):  # missing, or damaged: not ours
        return None
    return value if isinstance(value, dict) else None


def _write_record(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(value, sort_keys=True, indent=1) + "\n").encode())


def _folder_files(folder: Path) -> dict[str, os.stat_result] | None:
    """name -> lstat of every entry of ``folder``; None if one is not a regular file."""
    out = {}
    try:
        for entry in os.scandir(folder):
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                return None
            out[entry.name] = st
    except OSError:
        return None
    return out


# -- cache entries -----------------------------------------------------------------------------
def record_content(repo: Repo, key: str, folder: Path) -> dict[str, Any]:
    """Hash every file of a cache entry and record it (``verified/<key>.json``)."""
    files = {}
    for f in sorted(folder.iterdir()):
        files[f.name] = {"blake3": hash_file(f), "id": identity(f.lstat())}
    record = {"key": key, "files": files}
    _write_record(_records_dir(repo) / f"{key}.json", record)
    return record


def _entry_matches(folder: Path, record: dict[str, Any]) -> tuple[bool, bool]:
    """(the entry's files are the recorded ones: same names, and each with the recorded
    identity or (re-hashed) the recorded blake3; whether an identity was refreshed)."""
    files = record.get("files")
    have = _folder_files(folder)
    if not isinstance(files, dict) or have is None or set(have) != set(files):
        return False, False
    refreshed = False
    for name, st in have.items():
        info = files[name]
        if not isinstance(info, dict):
            return False, False
        if info.get("id") == identity(st):
            continue
        try:
            if hash_file(folder / name) != info.get("blake3"):
                return False, False
        except OSError:
            return False, False
        info["id"] = identity(st)  # same content: remember the new identity
        refreshed = True
    return True, refreshed


def _refresh_identities(repo: Repo, key: str) -> None:
    """After our own link or unlink of an entry's files (verified unchanged just before):
    record their new identities (only the ctime moved)."""
    path = _records_dir(repo) / f"{key}.json"
    record = _read_record(path)
    folder = cache_root(repo) / key
    if record is None or not isinstance(record.get("files"), dict):
        return
    for name, info in record["files"].items():
        with contextlib.suppress(OSError):
            info["id"] = identity((folder / name).lstat())
    _write_record(path, record)


def drop_entry(repo: Repo, key: str) -> None:
    """Remove one cache entry and its record (both are ours, under ``.git/crdt``)."""
    path = cache_root(repo) / key
    if path.is_dir() and not path.is_symlink():
        for f in path.iterdir():
            with contextlib.suppress(OSError):
                f.chmod(0o644)
        shutil.rmtree(path, ignore_errors=True)
    (_records_dir(repo) / f"{key}.json").unlink(missing_ok=True)


def cached(repo: Repo, key: str) -> Path | None:
    """The cache folder of ``key`` if a complete result is there *and* its content matches
    the blake3 recorded when it was written.  A damaged entry is dropped (computed again)."""
    path = cache_root(repo) / key
    if not _KEY_RE.match(key) or path.is_symlink() or not path.is_dir():
        return None
    record = _read_record(_records_dir(repo) / f"{key}.json")
    ok, refreshed = (False, False) if record is None else _entry_matches(path, record)
    if record is None or record.get("key") != key or not ok:
        drop_entry(repo, key)
        return None
    if refreshed:
        _write_record(_records_dir(repo) / f"{key}.json", record)
    with contextlib.suppress(OSError):
        os.utime(path)  # last use, for the size budget of 'git crdt gc'
    return path


def commit_to_cache(repo: Repo, key: str, tmp_dir: Path) -> Path:
    """Record the blake3 of a finished result folder's files, then move it into the cache
    (atomic rename; a folder keeps its files' identities); return its path."""
    final = cache_root(repo) / key
    for f in tmp_dir.iterdir():
        f.chmod(0o444)
    if final.exists():
        cached(repo, key)  # drops a damaged or unrecorded entry of that name
    # recorded before the rename, so an entry is never visible without its record
    record_content(repo, key, tmp_dir)
    try:
        os.replace(tmp_dir, final)
    except OSError:
        # Another process finished the same root first: its result is identical (the record
        # names our files' identities, so its files are re-hashed once on the next hit).
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if cached(repo, key) is None:
            raise ResolveError(f"cache entry {key[:16]} could not be written") from None
    return final


def new_work_dir(repo: Repo, key: str) -> Path:
    base = cache_root(repo)
    base.mkdir(parents=True, exist_ok=True)
    remove_stale_work(base)
    path = base / f".tmp-{key[:16]}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    return path


_STALE = re.compile(r"\.(?:tmp-[0-9a-f]+|publish|old)-(\d+)-\d+\Z")


def remove_stale_work(base: Path) -> None:
    """Drop the folders a killed resolve or publish left in the cache (their process is gone).
    The cache lies under ``.git/crdt``, where no commit can put anything."""
    for path in base.glob(".*-*-*"):
        m = _STALE.match(path.name)
        if m and not pid_alive(int(m.group(1))) and not path.is_symlink():
            for f in path.glob("*"):
                with contextlib.suppress(OSError):
                    f.chmod(0o644)
            shutil.rmtree(path, ignore_errors=True)


# -- publication markers -----------------------------------------------------------------------
def _marker_path(repo: Repo, out_dir: Path) -> Path:
    name = blake3.blake3(os.fsencode(os.path.abspath(out_dir))).hexdigest()[:32]
    return _markers_dir(repo) / f"{name}.json"


def read_marker(repo: Repo, out_dir: Path) -> dict[str, Any] | None:
    marker = _read_record(_marker_path(repo, out_dir))
    if marker is None or marker.get("path") != os.path.abspath(out_dir):
        return None
    return marker


def _publication(repo: Repo, out_dir: Path) -> dict[str, Any] | None:
    """The publication the marker under ``.git/crdt`` records for the folder now at
    ``out_dir`` (matched by its identity), or None."""
    marker = read_marker(repo, out_dir)
    try:
        st = out_dir.lstat()
    except OSError:
        return None
    return None if marker is None or not stat.S_ISDIR(st.st_mode) else _published_as(marker, st)


def published_key(repo: Repo, out_dir: Path) -> str | None:
    """The cache key of the model we published at ``out_dir`` (None: nothing of ours there);
    the files' content is not checked here (``output_is_current`` does)."""
    pub = _publication(repo, out_dir)
    key = None if pub is None else pub.get("key")
    return key if isinstance(key, str) else None


def _published_as(marker: dict[str, Any], st: os.stat_result) -> dict[str, Any] | None:
    """The publication in ``marker`` whose folder has the identity of ``st``."""
    for pub in marker.get("folders", []):
        if isinstance(pub, dict) and pub.get("dir") == [st.st_ino, st.st_dev]:
            return pub
    return None


def _tracked_under(repo: Repo, out_dir: Path) -> str | None:
    """A path git tracks under ``out_dir`` (None: none, or the folder is outside the tree)."""
    try:
        rel = os.path.relpath(out_dir, repo.root)
    except ValueError:
        return None
    if rel == ".." or rel.startswith("../"):
        return None
    tracked = gitops.tracked_under(repo.root, rel)
    return tracked[0] if tracked else None


def check_replaceable(repo: Repo, out_dir: Path) -> None:
    """Only a folder we published (or nothing, or an empty folder) may be replaced: a manifest
    from an untrusted pull could point the ``output`` register at a folder of the user's, and
    publishing swaps the folder out whole.  Ours means: named by a marker under ``.git/crdt``
    with this folder's inode, holding only files we published, none of them tracked by git."""
    try:
        st = out_dir.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ResolveError(f"output folder {out_dir}: {exc.strerror}") from None
    refuse = (
        f"output folder {out_dir} exists and is not a merged model written by git-crdt here; "
        "refusing to replace it (move it away, or choose another with 'git crdt output')"
    )
    if stat.S_ISLNK(st.st_mode):
        raise ResolveError(f"output folder {out_dir} is a symbolic link; refusing to replace it")
    if not stat.S_ISDIR(st.st_mode):
        raise ResolveError(refuse)
    have = _folder_files(out_dir)
    if have is None:
        raise ResolveError(refuse)
    if not have:
        return  # an empty folder: nothing to lose
    tracked = _tracked_under(repo, out_dir)
    if tracked is not None:
        raise ResolveError(f"{refuse}: git tracks {tracked}")
    marker = read_marker(repo, out_dir)
    pub = None if marker is None else _published_as(marker, st)
    if pub is None:
        raise ResolveError(refuse)
    extra = sorted(set(have) - set(pub.get("files", {})))
    if extra:
        raise ResolveError(
            f"output folder {out_dir} holds {extra[0]!r}, which git-crdt did not write; "
            "refusing to replace it (move the file away)"
        )


def output_is_current(repo: Repo, out_dir: Path, key: str, entry: dict[str, Any]) -> bool:
    """True if ``out_dir`` is the folder we published for ``key`` and its files still hold
    the recorded content: the recorded identity (no read), else the recorded blake3."""
    pub = _publication(repo, out_dir)
    if pub is None or pub.get("key") != key:
        return False
    files = pub.get("files", {})
    want = entry.get("files", {})
    have = _folder_files(out_dir)
    if have is None or set(have) != set(files) or set(files) != set(want):
        return False
    changed = False
    for name, fst in have.items():
        info = files[name]
        if info.get("blake3") != want[name].get("blake3"):
            return False
        if info.get("id") == identity(fst):
            continue
        try:
            if hash_file(out_dir / name) != info["blake3"]:
                return False
        except OSError:
            return False
        info["id"] = identity(fst)  # touched, not changed: remember the new identity
        changed = True
    if changed:
        _write_record(
            _marker_path(repo, out_dir), {"path": os.path.abspath(out_dir), "folders": [pub]}
        )
    return True


def verify_outputs(repo: Repo) -> list[str]:
    """``verify --full``: every cache entry and every published output against the blake3
    recorded when it was written (re-hashing every file).  One message per mismatch."""
    problems = []
    base = cache_root(repo)
    if base.is_dir():
        for path in sorted(base.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            record = _read_record(_records_dir(repo) / f"{path.name}.json")
            files = (record or {}).get("files")
            have = _folder_files(path)
            if not isinstance(files, dict) or have is None or set(have) != set(files):
                problems.append(f"cache entry {path.name[:16]}: files differ from its record")
                continue
            for name in sorted(have):
                if _hash_or_none(path / name) != files[name].get("blake3"):
                    problems.append(f"cache entry {path.name[:16]}: {name} was modified")
    mdir = _markers_dir(repo)
    for mpath in sorted(mdir.glob("*.json")) if mdir.is_dir() else []:
        marker = _read_record(mpath)
        if marker is None or not isinstance(marker.get("path"), str):
            continue
        out = Path(marker["path"])
        try:
            st = out.lstat()
        except OSError:
            continue  # deleted since: nothing is served from it
        pub = _published_as(marker, st)
        if pub is None:
            continue
        have = _folder_files(out) or {}
        for name, info in sorted(pub.get("files", {}).items()):
            if name not in have:
                problems.append(f"{out}: {name} is missing")
            elif _hash_or_none(out / name) != info.get("blake3"):
                problems.append(f"{out}: {name} was modified since it was published")
    return problems


# -- publishing --------------------------------------------------------------------------------
def _clone_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst``: a reflink (FICLONE) where the file system shares
    blocks, else ``copy_file_range`` (in-kernel), else a plain copy."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE
            return
        except OSError:
            pass
        size = os.fstat(fin.fileno()).st_size
        copy_range = getattr(os, "copy_file_range", None)
        done = 0
        if copy_range is not None:
            try:
                while done < size:
                    n = copy_range(fin.fileno(), fout.fileno(), size - done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                done = 0
                fout.seek(0)
                fout.truncate()
                fin.seek(0)
        if done < size:
            fout.seek(done)
            fin.seek(done)
            shutil.copyfileobj(fin, fout, _HASH_PIECE)
    os.chmod(dst, 0o644)


def _assemble(cache_dir: Path, tmp: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Link (or, across file systems, copy) the entry's files into the new folder ``tmp``;
    its publication record."""
    tmp.mkdir()
    files = {}
    for f in sorted(cache_dir.iterdir()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            _clone_file(f, tmp / f.name)
        files[f.name] = {
            "blake3": entry["files"][f.name]["blake3"],
            "id": identity((tmp / f.name).lstat()),
        }
    st = tmp.lstat()
    return {"dir": [st.st_ino, st.st_dev], "files": files}


@dataclass
class _Pending:
    marker: Path
    path: str
    keep: list[dict[str, Any]]


def publish(repo: Repo, key: str, cache_dir: Path, out_dir: Path, entry: dict[str, Any]) -> None:
    """Make ``out_dir`` a set of links to ``cache_dir``'s files, replacing it whole.

    The new folder is assembled inside the cache (so an interrupted publish leaves nothing in
    the work tree) and swapped with the old one in one atomic exchange (``renameat2``
    ``RENAME_EXCHANGE``; two renames where the kernel lacks it), so a reader sees the old model
    or the new one, never a mixture of files and never a half-written folder.  The marker names
    the new folder (its inode survives the rename) before the swap, and the old one until the
    swap is done, so a publish killed at any point leaves a folder we still recognise.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(repo, out_dir)
    remove_stale_work(cache_dir.parent)
    pending = _pending_siblings(repo, out_dir)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = cache_dir.parent / f".publish-{stamp}"
    try:
        pub = _assemble(cache_dir, tmp, entry)
        _swap_published(repo, key, tmp, out_dir, pub, cache_dir.parent / f".old-{stamp}", pending)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno != errno.EXDEV:
            raise
        # the output lies on another file system than the cache: assemble beside it, after
        # recording the names, so that only what we created is ever removed there
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{stamp}")
        old = out_dir.with_name(f".{out_dir.name}.old-{stamp}")
        _mark(repo, out_dir, pending.keep, siblings=[str(tmp), str(old)])
        pub = _assemble(cache_dir, tmp, entry)
        _swap_published(repo, key, tmp, out_dir, pub, old, pending)


def _mark(
    repo: Repo, out_dir: Path, folders: list[dict[str, Any]], siblings: Iterable[str] = ()
) -> None:
    value = {"path": os.path.abspath(out_dir), "folders": folders, "siblings": list(siblings)}
    _write_record(_marker_path(repo, out_dir), value)


def _pending_siblings(repo: Repo, out_dir: Path) -> _Pending:
    """Remove the folders a killed publish across file systems left beside the output (only
    those the marker says we created), and return what the marker keeps."""
    marker = read_marker(repo, out_dir) or {}
    keep = []
    try:
        st = out_dir.lstat()
        current = _published_as(marker, st)
        if current is not None:
            keep.append(current)
    except OSError:
        pass
    for sibling in marker.get("siblings", []):
        path = Path(str(sibling))
        m = re.search(r"\.(?:tmp|old)-(\d+)-\d+\Z", path.name)
        if m is None or pid_alive(int(m.group(1))) or path.parent != out_dir.parent:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    return _Pending(_marker_path(repo, out_dir), os.path.abspath(out_dir), keep)


def _swap_published(
    repo: Repo,
    key: str,
    tmp: Path,
    out_dir: Path,
    pub: dict[str, Any],
    old: Path,
    pending: _Pending,
) -> None:
    pub["key"] = key
    _refresh_identities(repo, key)  # the links changed the cache files' ctime, nothing else
    marker = read_marker(repo, out_dir) or {}
    siblings = marker.get("siblings", [])
    # the folder being replaced, if it is ours and untouched since we published it: its
    # files are (links to) its cache entry's, whose ctime the unlink below moves
    previous = pending.keep[0] if pending.keep else None
    clean = previous is not None and _unchanged(out_dir, previous)
    _mark(repo, out_dir, [*pending.keep, pub], siblings)
    faults.point("publish:assembled")
    _swap_in(tmp, out_dir, old)
    _mark(repo, out_dir, [pub])
    if clean and previous is not None and previous.get("key") not in (None, key):
        _refresh_identities(repo, str(previous["key"]))


def _unchanged(folder: Path, pub: dict[str, Any]) -> bool:
    """Every file of ``folder`` still has the identity recorded when it was published."""
    have = _folder_files(folder)
    files = pub.get("files", {})
    if have is None or set(have) != set(files):
        return False
    return all(files[n].get("id") == identity(st) for n, st in have.items())


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
    """Put the assembled folder ``tmp`` at ``out_dir``; the previous folder (checked by
    :func:`check_replaceable`: ours, or empty) is deleted."""
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


def try_publish(repo: Repo, key: str, out_dir: Path) -> bool:
    """On a (verified) cache hit, make ``out_dir`` the cached result if it is not already;
    else False."""
    hit = cached(repo, key)
    if hit is None:
        return False
    remove_stale_work(hit.parent)
    entry = _read_record(_records_dir(repo) / f"{key}.json") or {}
    if not output_is_current(repo, out_dir, key, entry):
        publish(repo, key, hit, out_dir, entry)
        keep_out_of_git(repo, out_dir)
    return True


def publish_entry(repo: Repo, key: str, out_dir: Path) -> None:
    """Publish the (just committed) cache entry ``key`` to ``out_dir``."""
    if not try_publish(repo, key, out_dir):
        raise ResolveError(f"cache entry {key[:16]} vanished while it was published")


_SAFE_EXCLUDE = re.compile(r"[A-Za-z0-9_.@+=,%-][A-Za-z0-9_.@+=,% /-]*\Z")


def keep_out_of_git(repo: Repo, out_dir: Path) -> None:
    """Make sure git ignores the output folder (``/merged/`` is in .gitignore from init; another
    ``output`` register value is added to .git/info/exclude, only when it is plain text that
    no exclude pattern syntax can read differently)."""
    try:
        rel = out_dir.resolve().relative_to(repo.root.resolve())
    except ValueError:
        return  # outside the work tree
    text_rel = rel.as_posix()
    if not _SAFE_EXCLUDE.match(text_rel) or text_rel != text_rel.strip():
        return
    if gitops.is_ignored(repo.root, f"{text_rel}/"):
        return
    exclude = gitops.git_dir(repo.root) / "info" / "exclude"
    text = exclude.read_text("utf-8") if exclude.exists() else ""
    sep = "" if not text or text.endswith("\n") else "\n"
    atomic_write(exclude, f"{text}{sep}/{text_rel}/\n".encode())


# -- pruning (git crdt gc) ---------------------------------------------------------------------
@dataclass
class PruneResult:
    kept: list[str]
    removed: list[str]
    bytes_kept: int
    bytes_removed: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def entry_bytes(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.iterdir() if f.is_file())


def cache_budget(repo: Repo) -> int | None:
    """The ``crdt.cacheMaxBytes`` setting (a size: ``10GB``, ``20g``; see :mod:`..sizes`)."""
    value = gitops.config_get(repo.root, "crdt.cacheMaxBytes")
    return None if value is None else parse_size(value, "crdt.cacheMaxBytes", ResolveError)


def max_shard_setting(repo: Repo) -> int:
    """The ``crdt.maxShardSize`` setting (a size: ``2GB``), else :data:`DEFAULT_MAX_SHARD`: the
    shard size of every resolution that names none (the hooks', a clone's)."""
    value = gitops.config_get(repo.root, "crdt.maxShardSize")
    if value is None:
        return DEFAULT_MAX_SHARD
    size = parse_size(value, "crdt.maxShardSize", ResolveError)
    if size < 1:
        raise ResolveError(f"crdt.maxShardSize must be at least 1 byte, not {value!r}")
    return size


def prune_to_budget(repo: Repo, keep: str) -> None:
    """After a new entry: keep the cache within ``crdt.cacheMaxBytes`` (if set), dropping the
    least recently used entries, never ``keep``."""
    budget = cache_budget(repo)
    if budget is not None:
        prune(repo, None, budget, keep=keep)


def prune(
    repo: Repo, reachable_roots: set[str] | None, max_bytes: int | None, keep: str | None = None
) -> PruneResult:
    """Drop cache entries whose Merkle root no ref reaches (``reachable_roots``; None: keep
    all) or that an earlier revision of their strategy computed (never served again:
    :func:`superseded`); then, while the rest is larger than ``max_bytes``, the least recently
    used (never ``keep``, and never the last one)."""
    base = cache_root(repo)
    entries: list[tuple[float, str, int]] = []
    removed: list[str] = []
    freed = 0
    if base.is_dir():
        remove_stale_work(base)
        for path in base.iterdir():
            if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
                continue
            size = entry_bytes(path)
            if reachable_roots is not None and (
                path.name[:64] not in reachable_roots or superseded(path)
            ):
                drop_entry(repo, path.name)
                removed.append(path.name)
                freed += size
            else:
                entries.append((path.stat().st_mtime, path.name, size))
    entries.sort(key=lambda e: (e[1] == keep, e[0]), reverse=True)  # keep, then most recent
    total = sum(size for _, _, size in entries)
    while max_bytes is not None and len(entries) > 1 and total > max_bytes:
        _, name, size = entries.pop()
        drop_entry(repo, name)
        removed.append(name)
        freed += size
        total -= size
    rdir = _records_dir(repo)
    live = {name for _, name, _ in entries}
    for rec in rdir.glob("*.json") if rdir.is_dir() else []:
        if rec.name[: -len(".json")] not in live:
            rec.unlink(missing_ok=True)
    return PruneResult(sorted(live), sorted(removed), total, freed)


def superseded(entry: Path) -> bool:
    """Whether a cache entry holds what an earlier revision of its strategy computed: the
    revision its key names (``.rK``, absent: 1) is not the strategy's current one.  An entry
    whose record does not say which strategy made it is not judged here."""
    revision = 1
    for part in entry.name.split(".")[1:]:
        if part[:1] == "r" and part[1:].isdigit():
            revision = int(part[1:])
    try:
        head = bounded.read_regular(entry / RESOLUTION_FILE, RESOLUTION_LIMIT, "record")
        record = bounded.loads_json(head, "record")
    except (OSError, CrdtError):  # missing, damaged or too long: not judged
        return False
    name = record.get("strategy") if isinstance(record, dict) else None
    return isinstance(name, str) and STRATEGY_REVISIONS.get(name, 1) != revision


def reachable_roots(repo: Repo) -> set[str]:
    """Merkle roots of the manifest at every ref (branches, tags, remotes, HEAD), of the index
    and of the work tree: the results a checkout may ask for again."""
    roots = set()
    for rev in [*sorted(gitops.ref_commits(repo.root)), ":", None]:
        try:
            roots.add(repo.manifest_at(rev).merkle_root())
        except CrdtError:
            continue  # an invalid state has no result to keep
    return roots
