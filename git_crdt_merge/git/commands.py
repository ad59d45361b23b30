"""Every interaction with git: the ``git`` command, pygit2 reads, and direct loose-object writes.

Tensor data is written as loose objects by this module itself (``blob <size>\\0`` + data,
SHA-1 named, zlib *stored* blocks, atomic rename): git and libgit2 read them like any other
object, and it runs near disk speed where ``git add`` or libgit2 deflate at 16-33 MB/s
(measurements in ../docs/performance.md).  Objects are read back, in whatever form git left
them, by :mod:`.gitobjects`.  No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .. import atomic, faults
from ..errors import GitError, LockError, ManifestError, NotARepositoryError, NotFoundError

# The largest manifest blob read from git (the work-tree file has the same bound: manifest.py).
MAX_BLOB_READ = 64 * 1024**2


def run(
    args: Sequence[str],
    cwd: Path | str,
    *,
    input: bytes | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    own_group: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``git ARGS`` in ``cwd``; raise GitError with git's first stderr line on failure.

    ``own_group``: git runs in a process group of its own, killed whole if this process is
    interrupted while it waits, so no hook git started outlives the caller (the demo)."""
    if own_group:
        proc = _run_in_own_group(["git", *args], cwd, input, env)
    else:
        proc = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, env=env)
    if check and proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        first = msg[0] if msg else f"exit {proc.returncode}"
        raise GitError(f"git {args[0]} failed: {first}")
    return proc


def _run_in_own_group(
    argv: list[str], cwd: Path | str, input: bytes | None, env: dict[str, str] | None
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if input is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(input)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def out(args: Sequence[str], cwd: Path | str, **kw: object) -> str:
    return run(args, cwd, **kw).stdout.decode().strip()  # type: ignore[arg-type]


def toplevel(cwd: Path | str = ".") -> Path:
    """The work tree root containing ``cwd``."""
    proc = run(["rev-parse", "--show-toplevel"], cwd, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise NotARepositoryError(f"{Path(cwd).resolve()} is not inside a git work tree")
    return Path(proc.stdout.decode().strip())


def git_dir(root: Path) -> Path:
    return Path(out(["rev-parse", "--absolute-git-dir"], root))


def common_dir(root: Path) -> Path:
    """The directory holding objects and shared config (differs from git_dir in worktrees)."""
    path = Path(out(["rev-parse", "--git-common-dir"], root))
    return path if path.is_absolute() else (root / path).resolve()


def hooks_dir(root: Path) -> Path:
    """Where git looks for hooks, honouring ``core.hooksPath``."""
    path = Path(out(["rev-parse", "--git-path", "hooks"], root))
    return path if path.is_absolute() else (root / path).resolve()


def config_get(root: Path | str, key: str, *, scope: str | None = None) -> str | None:
    args = ["config"] + ([f"--{scope}"] if scope else []) + ["--get", key]
    proc = run(args, root, check=False)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def config_set(root: Path | str, key: str, value: str, *, scope: str = "local") -> None:
    run(["config", f"--{scope}", key, value], root)


def config_unset(root: Path | str, key: str, *, scope: str = "local") -> None:
    run(["config", f"--{scope}", "--unset-all", key], root, check=False)


def config_remove_section(root: Path | str, section: str, *, scope: str = "local") -> None:
    run(["config", f"--{scope}", "--remove-section", section], root, check=False)


def config_get_int(root: Path | str, key: str) -> int | None:
    """The effective value of an integer key (git's k/m/g suffixes applied); None if unset."""
    proc = run(["config", "--type=int", "--get", key], root, check=False)
    if proc.returncode != 0:
        return None
    try:
        return int(proc.stdout.decode().strip())
    except ValueError:
        return None


# -- repositories, bare or not ---------------------------------------------------------------
def is_bare(cwd: Path | str) -> bool | None:
    """True in a bare repository, False in a work tree, None outside any repository."""
    proc = run(["rev-parse", "--is-bare-repository"], cwd, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.decode().strip() == "true"


def check_attr(cwd: Path | str, attr: str, path: str) -> str:
    """The value of attribute ``attr`` for ``path`` (``set``, ``unset``, ``unspecified`` or a
    value); in a bare repository only ``$GIT_DIR/info/attributes`` and the global files apply."""
    text = out(["check-attr", attr, "--", path], cwd)
    return text.rsplit(": ", 1)[-1] if text else "unspecified"


def remote_url(cwd: Path | str, name: str) -> str | None:
    proc = run(["remote", "get-url", name], cwd, check=False)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def stored_forms(cwd: Path | str, shas: Iterable[str]) -> dict[str, tuple[int, int, bool]]:
    """SHA-1 -> (size, bytes on disk, stored as a delta) for each object that exists."""
    shas = sorted(set(shas))
    if not shas:
        return {}
    fmt = "--batch-check=%(objectname) %(objectsize) %(objectsize:disk) %(deltabase)"
    text = run(["cat-file", fmt], cwd, input="".join(f"{s}\n" for s in shas).encode())
    forms: dict[str, tuple[int, int, bool]] = {}
    for line in text.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1].isdigit():
            forms[parts[0]] = (int(parts[1]), int(parts[2]), parts[3].strip("0") != "")
    return forms


def clone(args: Sequence[str], cwd: Path | str, *, show_progress: bool) -> None:
    """``git clone ARGS``; with ``show_progress`` git's own progress and messages reach the
    user's terminal (stderr is inherited), otherwise they are captured."""
    if not show_progress:
        run(["clone", *args], cwd)
        return
    code = subprocess.run(["git", "clone", *args], cwd=cwd).returncode
    if code != 0:
        raise GitError(f"git clone failed (exit {code}; git's message is above)")


# -- objects ---------------------------------------------------------------------------------
def _loose_path(objects_dir: Path, sha: str) -> Path:
    return objects_dir / sha[:2] / sha[2:]


def blob_sha1(data: bytes | memoryview) -> str:
    h = hashlib.sha1(b"blob %d\x00" % len(data))
    h.update(data)
    return h.hexdigest()


try:  # ISA-L's adler32 runs at ~14 GB/s where zlib's runs at ~4 GB/s
    from isal.isal_zlib import adler32 as _adler32
except ImportError:  # pragma: no cover - isal has wheels for the common platforms
    from zlib import adler32 as _adler32

_STORED_MAX = 0xFFFF
_FULL_BLOCK = b"\x00" + struct.pack("<HH", _STORED_MAX, _STORED_MAX ^ 0xFFFF)
_IOV_BATCH = 1000


def _stored_zlib_pieces(header: bytes, data: memoryview) -> list[bytes | memoryview]:
    """A zlib stream of ``header + data`` made of stored (uncompressed) deflate blocks.

    This is what ``zlib.compress(level=0)`` produces, built around views of ``data`` so
    the tensor bytes are never copied in user space (zlib's own level 0 copies them through
    its window at ~1 GB/s).
    """
    pieces: list[bytes | memoryview] = [b"\x78\x01"]
    total = len(header) + len(data)
    first = min(_STORED_MAX - len(header), len(data))
    payload0 = header + bytes(data[:first])
    pos = first
    blocks: list[bytes | memoryview] = [payload0]
    while pos < len(data):
        blocks.append(data[pos : pos + _STORED_MAX])
        pos += _STORED_MAX
    for i, block in enumerate(blocks):
        final = i == len(blocks) - 1
        if not final and len(block) == _STORED_MAX:
            pieces.append(_FULL_BLOCK)
        else:
            n = len(block)
            pieces.append(bytes([1 if final else 0]) + struct.pack("<HH", n, n ^ 0xFFFF))
        pieces.append(block)
    checksum = _adler32(data, _adler32(header)) if total else _adler32(header)
    pieces.append(struct.pack(">I", checksum & 0xFFFFFFFF))
    return pieces


def write_loose_blob(objects_dir: Path, data: bytes | memoryview, sha: str | None = None) -> str:
    """Write ``data`` as a loose blob with stored (level 0) zlib blocks; return its SHA-1.

    The object is written to a temporary file in the fan-out directory and renamed into
    place, so a crash leaves either nothing or a complete object.  An existing object is kept.
    """
    view = memoryview(data).cast("B")
    if sha is None:
        sha = blob_sha1(view)
    path = _loose_path(objects_dir, sha)
    if path.exists():
        return sha
    path.parent.mkdir(parents=True, exist_ok=True)
    pieces = _stored_zlib_pieces(b"blob %d\x00" % len(view), view)
    with atomic.readonly_file(path, path.parent, "tmp_obj_", "object:tmp-written") as fd:
        for i in range(0, len(pieces), _IOV_BATCH):
            batch = pieces[i : i + _IOV_BATCH]
            want = sum(len(p) for p in batch)
            done = os.writev(fd, batch)
            if done != want:  # short write: finish this batch piece by piece
                rest = b"".join(bytes(p) for p in batch)[done:]
                while rest:
                    rest = rest[os.write(fd, rest) :]
    return sha


def promisor_remote(root: Path) -> str | None:
    """The remote a partial clone fetches its missing objects from (None: not partial)."""
    proc = run(["config", "--get-regexp", r"^remote\..*\.promisor$"], root, check=False)
    for line in proc.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lower() in ("true", "yes", "on", "1"):
            return key[len("remote.") : -len(".promisor")]
    return config_get(root, "extensions.partialClone")


def fetch_objects(root: Path, remote: str, shas: Sequence[str]) -> None:
    """Fetch the named objects from ``remote`` in one process, as git's own lazy fetch of a
    partial clone does for one object at a time (no tags, no refs updated, no negotiation)."""
    if not shas:
        return
    args = [
        "-c",
        "fetch.negotiationAlgorithm=noop",
        "fetch",
        "--quiet",
        "--no-tags",
        "--no-write-fetch-head",
        "--recurse-submodules=no",
        "--filter=blob:none",
        "--stdin",
        remote,
    ]
    run(args, root, input="".join(f"{s}\n" for s in shas).encode())


# -- index -----------------------------------------------------------------------------------
def index_entries(root: Path, prefix: str) -> dict[str, str]:
    """path -> blob SHA-1 of the stage-0 index entries under ``prefix``."""
    text = run(["ls-files", "-s", "-z", "--", prefix], root).stdout.decode()
    entries: dict[str, str] = {}
    for item in text.split("\0"):
        if not item:
            continue
        meta, path = item.split("\t", 1)
        _mode, sha, stage = meta.split()
        if stage == "0":
            entries[path] = sha
    return entries


def stage_blobs(
    root: Path,
    entries: Iterable[tuple[str, str]],
    *,
    skip_worktree: bool,
    also_skip: Iterable[str] = (),
    env: dict[str, str] | None = None,
) -> None:
    """Add (path, sha) blobs to the index without touching the work tree; ``also_skip``:
    paths already staged that must carry skip-worktree too (a re-run repairs them)."""
    entries = list(entries)
    if entries:
        info = "".join(f"100644 {sha}\t{path}\n" for path, sha in entries)
        run(["update-index", "--add", "--index-info"], root, input=info.encode(), env=env)
    if skip_worktree:
        paths = sorted({path for path, _ in entries} | set(also_skip))
        if paths:
            text = "".join(f"{path}\n" for path in paths)
            run(["update-index", "--skip-worktree", "--stdin"], root, input=text.encode(), env=env)


def stage_file(root: Path, path: str, env: dict[str, str] | None = None) -> None:
    run(["add", "--", path], root, env=env)


INDEX_LOCK_TIMEOUT_S = 30.0


@contextmanager
def index_transaction(
    root: Path, timeout: float = INDEX_LOCK_TIMEOUT_S
) -> Iterator[dict[str, str]]:
    """Hold git's own ``index.lock`` while the caller stages, so that no ``git pull``,
    ``git commit`` or ``git merge`` writes the index meanwhile (each of them takes that lock;
    they fail at once while we hold it, and we wait for them).

    Yields the environment for git commands: they work on a private copy of the index
    (``GIT_INDEX_FILE``), which replaces the index, through the lock file, when the block ends
    without an error: git's own protocol (write ``index.lock``, rename it onto ``index``).  On
    an error the index is left as it was.  Read the manifest *inside* the block: that is the
    state the commit will see.
    """
    index = Path(out(["rev-parse", "--git-path", "index"], root))
    if not index.is_absolute():
        index = (root / index).resolve()
    lock = index.with_name(index.name + ".lock")

    def create_lock() -> int | None:
        while True:
            try:
                return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _remove_our_stale_lock(lock):
                    return None

    fd = wait_for(
        create_lock,
        timeout,
        f"{lock} exists: another git process is running (if none is, remove it)",
    )
    # git never reads another process's lock file: ours names us, so that a git-crdt that
    # was killed while holding it (SIGKILL, power loss) does not block the clone for good
    os.write(fd, f"{_LOCK_OWNER} {os.getpid()}\n".encode())
    os.close(fd)
    for stale in index.parent.glob(f"{index.name}.crdt-*"):
        remove_orphan(stale, stale.name.rsplit("-", 1)[-1].removesuffix(".lock"))
    tmp = index.with_name(f"{index.name}.crdt-{os.getpid()}")
    try:
        if index.exists():
            shutil.copy2(index, tmp)
        env = {**os.environ, "GIT_INDEX_FILE": str(tmp)}
        yield env
        faults.point("index:staged")
        if tmp.exists():
            os.replace(tmp, lock)
            os.replace(lock, index)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".lock").unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


_LOCK_OWNER = "git-crdt"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_orphan(path: Path, pid: str) -> None:
    """Remove ``path``, a temporary file named by the ``pid`` of its writer, if that process is
    gone."""
    if pid.isdigit() and not pid_alive(int(pid)):
        path.unlink(missing_ok=True)


_T = TypeVar("_T")
_POLL_S = 0.05


def wait_for(attempt: Callable[[], _T | None], timeout: float, busy: str) -> _T:
    """Call ``attempt`` until it returns something other than None, every 50 ms; a
    :class:`LockError` with message ``busy`` once ``timeout`` seconds have passed.  The wait of
    the index lock and of the repository lock."""
    deadline = time.monotonic() + timeout
    while True:
        got = attempt()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise LockError(busy)
        time.sleep(_POLL_S)


def _remove_our_stale_lock(lock: Path) -> bool:
    """Remove ``lock`` if a git-crdt process that is gone left it; True if removed."""
    try:
        head = lock.read_bytes()[:64].split()
    except OSError:
        return False
    if len(head) != 2 or head[0] != _LOCK_OWNER.encode() or not head[1].isdigit():
        return False
    if pid_alive(int(head[1])):
        return False
    lock.unlink(missing_ok=True)
    return True


def rev_parse(root: Path, spec: str) -> str | None:
    """The object name of ``spec`` (e.g. ``HEAD``, ``MERGE_HEAD``, ``abc^{commit}``), or None."""
    proc = run(["rev-parse", "--verify", "-q", spec], root, check=False)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def commit_of(root: Path, rev: str) -> str | None:
    """The commit ``rev`` names (a tag is peeled), or None when it names none."""
    return rev_parse(root, f"{rev}^{{commit}}")


def head_is_unborn(root: Path) -> bool:
    """HEAD points to a branch that has no commit yet."""
    return (
        rev_parse(root, "HEAD") is None
        and run(["symbolic-ref", "-q", "HEAD"], root, check=False).returncode == 0
    )


def ref_commits(root: Path) -> set[str]:
    """The commits every ref (branches, tags peeled, remotes) and HEAD point to."""
    listing = run(
        ["for-each-ref", "--format=%(objectname) %(objecttype) %(*objectname)"], root, check=False
    ).stdout.decode()
    commits = set()
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "commit":
            commits.add(parts[0])
        elif len(parts) == 3 and parts[1] == "tag":
            commits.add(parts[2])
    head = rev_parse(root, "HEAD")
    if head is not None:
        commits.add(head)
    return commits


def tracked_under(root: Path, rel: str) -> list[str]:
    """Paths git tracks at or under ``rel`` (the index), or [] when git cannot say."""
    proc = run(["ls-files", "-z", "--", rel], root, check=False)
    if proc.returncode != 0:
        return []
    return [p for p in proc.stdout.decode(errors="replace").split("\0") if p]


def is_ignored(root: Path, rel: str) -> bool:
    """Whether git's ignore rules (.gitignore, info/exclude, core.excludesFile) cover ``rel``."""
    return run(["check-ignore", "-q", "--", rel], root, check=False).returncode == 0


def checkout_head(root: Path, *config: str) -> None:
    """Populate the work tree and index from HEAD (after a ``--no-checkout`` clone)."""
    args: list[str] = []
    for item in config:
        args += ["-c", item]
    run([*args, "checkout", "-q"], root)


def commit_subject(root: Path, rev: str) -> str:
    """The first line of ``rev``'s commit message."""
    return out(["log", "-1", "--format=%s", rev], root)


def commit_author(root: Path, rev: str) -> tuple[str, str]:
    """(``name <email>``, ISO 8601 author date) of ``rev``'s commit."""
    who, when = out(["log", "-1", "--format=%an <%ae>%x00%aI", rev], root).split("\0")
    return who, when


def commit_paths(root: Path, message: str, paths: Sequence[str]) -> None:
    """Commit only ``paths`` with ``message`` (read from stdin, so any text is safe)."""
    run(["commit", "-q", "-F", "-", "--", *paths], root, input=message.encode())


def commit_parents(root: Path, rev: str) -> list[str]:
    text = out(["rev-list", "--parents", "-n", "1", rev], root)
    return text.split()[1:]


def read_blobs(root: Path, specs: Sequence[str]) -> dict[str, bytes | None]:
    """``REV:PATH`` (or any blob spec) -> contents, None where it does not exist; two git
    processes for all of them.  Bounded like :func:`show_blob`: a blob over
    ``MAX_BLOB_READ`` is a ManifestError, never read."""
    specs = list(dict.fromkeys(specs))
    if not specs:
        return {}
    fmt = "--batch-check=%(objecttype) %(objectsize)"
    check = run(["cat-file", fmt], root, input="".join(f"{s}\n" for s in specs).encode())
    for spec, line in zip(specs, check.stdout.decode(errors="replace").splitlines(), strict=True):
        parts = line.split()
        if len(parts) == 2 and parts[0] == "blob" and int(parts[1]) > MAX_BLOB_READ:
            raise ManifestError(f"{spec} is larger than the limit of {MAX_BLOB_READ} bytes")
    proc = run(["cat-file", "--batch"], root, input="".join(f"{s}\n" for s in specs).encode())
    data = proc.stdout
    found: dict[str, bytes | None] = {}
    pos = 0
    for spec in specs:
        nl = data.index(b"\n", pos)
        header = data[pos:nl].split()
        pos = nl + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            found[spec] = data[pos : pos + size]
            pos += size + 1
        elif len(header) == 3:  # not a blob: skip its contents
            pos += int(header[2]) + 1
            found[spec] = None
        else:
            found[spec] = None
    return found


def git_path(root: Path, name: str) -> Path:
    """``$GIT_DIR/NAME`` (per-worktree, e.g. MERGE_HEAD)."""
    path = Path(out(["rev-parse", "--git-path", name], root))
    return path if path.is_absolute() else (root / path).resolve()


def tree_entries(root: Path, rev: str, prefix: str) -> dict[str, str]:
    """path -> SHA-1 of the blobs under ``prefix`` in revision ``rev``."""
    text = run(["ls-tree", "-r", "-z", rev, "--", prefix], root).stdout.decode()
    entries: dict[str, str] = {}
    for item in text.split("\0"):
        if item:
            meta, path = item.split("\t", 1)
            entries[path] = meta.split()[2]
    return entries


def show_blob(root: Path, spec: str, limit: int = MAX_BLOB_READ) -> bytes | None:
    """Contents of ``REV:PATH`` or ``:PATH`` (index), or None if it does not exist.

    Bounded: a blob larger than ``limit`` (or a tree, or a symbolic link, which git stores as
    a blob of mode 120000) is a ManifestError, never read."""
    fmt = "--batch-check=%(objecttype) %(objectsize)"
    check = run(["cat-file", fmt], root, input=f"{spec}\n".encode(), check=False)
    parts = check.stdout.decode(errors="replace").split()
    if check.returncode != 0 or len(parts) != 2 or parts[1] == "missing":
        return None
    if parts[0] != "blob":
        raise ManifestError(f"{spec} is a {parts[0]}, not a file")
    if int(parts[1]) > limit:
        raise ManifestError(f"{spec} is larger than the limit of {limit} bytes")
    if ":" in spec and _is_symlink_entry(root, spec):
        raise ManifestError(f"{spec} is a symbolic link; refusing to read it as a file")
    proc = run(["cat-file", "blob", spec], root, check=False)
    return proc.stdout if proc.returncode == 0 else None


def _is_symlink_entry(root: Path, spec: str) -> bool:
    """Whether ``REV:PATH`` or ``:PATH`` has mode 120000 (a symbolic link)."""
    rev, path = spec.split(":", 1)
    if rev == "" or rev.isdigit():  # the index (":PATH", ":2:PATH")
        stage_path = path.split(":", 1)[-1] if rev.isdigit() else path
        out = run(["ls-files", "-s", "--", stage_path], root, check=False).stdout
    else:
        out = run(["ls-tree", rev, "--", path], root, check=False).stdout
    return out.startswith(b"120000 ")


def manifest_history(
    root: Path, path: str, rev: str = "HEAD"
) -> list[tuple[str, str, list[str], bytes | None]]:
    """(commit, subject, parent commits, manifest bytes or None) for every commit reachable
    from ``rev``, parents before children.

    A partial clone lacks the manifests of older commits: they are fetched in one batch first,
    and a manifest that still cannot be read is an error, never taken for an empty one (which
    would credit its records to a later commit)."""
    import pygit2

    from .objects import ObjectDB

    repo = pygit2.Repository(str(root))
    if rev == "HEAD" and repo.head_is_unborn:
        return []  # no commit yet
    try:
        head = repo.revparse_single(rev).peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.InvalidSpecError):
        raise NotFoundError(f"no commit {rev!r}") from None
    walker = repo.walk(head.id, pygit2.enums.SortMode.TOPOLOGICAL | pygit2.enums.SortMode.REVERSE)
    commits: list[tuple[str, str, list[str], str | None]] = []
    for commit in walker:
        try:
            entry = commit.tree[path]
            regular = entry.type_str == "blob" and entry.filemode != pygit2.enums.FileMode.LINK
            blob_id: str | None = str(entry.id) if regular else None
        except KeyError:
            blob_id = None
        subject = commit.message.splitlines()[0] if commit.message else ""
        commits.append((str(commit.id), subject, [str(p) for p in commit.parent_ids], blob_id))
    db = ObjectDB(common_dir(root) / "objects", root=root)
    absent = db.missing(b for *_, b in commits if b is not None)
    remote = promisor_remote(root) if absent else None
    if remote is not None:
        fetch_objects(root, remote, absent)
    out: list[tuple[str, str, list[str], bytes | None]] = []
    for commit_id, subject, parents, blob_id in commits:
        data = None
        if blob_id is not None:
            try:
                size = db.blob_size(blob_id)
                if size is not None and size <= MAX_BLOB_READ:  # larger: not a manifest
                    data = db.read(blob_id, max_size=MAX_BLOB_READ)
                elif size is None:
                    raise GitError(f"git object {blob_id} is missing")
            except GitError as exc:
                raise GitError(f"the manifest of commit {commit_id[:10]}: {exc}") from None
        out.append((commit_id, subject, parents, data))
    return out


def unmerged_paths(root: Path, path: str) -> bool:
    """True if ``path`` has unmerged (conflict) entries in the index."""
    return bool(run(["ls-files", "-u", "--", path], root).stdout.strip())


# -- named operations of the integration layer and the history invariants ---------------------
def index_matches(root: Path | str, rev: str = "HEAD", paths: Sequence[str] = ()) -> bool:
    """Whether the index equals ``rev``'s tree (under ``paths``): ``diff-index --cached``."""
    args = ["diff-index", "--quiet", "--cached", rev, "--", *paths]
    return run(args, root, check=False).returncode == 0


def merge_tree(root: Path | str, ours: str, theirs: str) -> tuple[str | None, list[str], str]:
    """``merge-tree --write-tree`` (ort, merge drivers included) of two commits: (tree, or
    None on a conflict or an error; the conflicted paths; git's first error line)."""
    proc = run(
        ["merge-tree", "--write-tree", "--name-only", "--no-messages", ours, theirs],
        root,
        check=False,
    )
    lines = proc.stdout.decode(errors="replace").splitlines()
    if proc.returncode == 0 and lines:
        return lines[0], [], ""
    errors = proc.stderr.decode(errors="replace").strip().splitlines()
    conflicted = [p for p in lines[1:] if p] if proc.returncode == 1 else []
    return None, conflicted, errors[0] if errors else f"git merge-tree exited {proc.returncode}"


def commit_tree(root: Path | str, tree: str, parents: Sequence[str], message: bytes) -> str:
    """A commit object for ``tree`` (no ref moves)."""
    args = ["commit-tree", tree]
    for p in parents:
        args += ["-p", p]
    return out(args, root, input=message)


def read_tree_update(root: Path | str, old: str, new: str) -> None:
    """Move index and work tree from ``old``'s tree to ``new``'s (``read-tree -u -m``), keeping
    the sparse checkout; fails rather than overwrite local changes."""
    run(["read-tree", "-u", "-m", old, new], root)


def remote_tracking_tips(root: Path | str, remote: str) -> list[str]:
    """The commits of every ``refs/remotes/REMOTE/*`` ref."""
    return out(["for-each-ref", "--format=%(objectname)", f"refs/remotes/{remote}/"], root).split()


def rev_list(root: Path | str, tip: str, exclude: Sequence[str], limit: int) -> list[str]:
    """Commits reachable from ``tip`` and from none of ``exclude``, newest first, at most
    ``limit``."""
    args = ["rev-list", f"--max-count={limit}", tip, *[f"^{e}" for e in exclude], "--"]
    return out(args, root).split()


def attr_in_state(root: Path | str, attr: str, path: str, rev: str | None) -> str | None:
    """``attr`` of ``path`` as the state ``rev`` sets it: None the work tree, ":" the index, a
    revision its tree (``--source`` needs git 2.40: None then, unless ``rev`` is the work tree
    or the index)."""
    args = ["check-attr", attr]
    if rev == ":":
        args.append("--cached")
    elif rev is not None:
        args.append(f"--source={rev}")
    proc = run([*args, "--", path], root, check=False)
    if proc.returncode != 0:
        return None
    text = proc.stdout.decode().strip()
    return text.rsplit(": ", 1)[-1] if text else "unspecified"


def tree_blob_shas(root: Path | str, rev: str, prefix: str) -> list[str] | None:
    """The blob ids under ``prefix`` in ``rev``'s tree (None if ``rev`` is not there)."""
    proc = run(["ls-tree", "-r", "-z", rev, "--", prefix], root, check=False)
    if proc.returncode != 0:
        return None
    return [item.split()[2] for item in proc.stdout.decode().split("\0") if item.strip()]


def add_paths(root: Path | str, paths: Sequence[str]) -> None:
    run(["add", "--", *paths], root)


def sparse_checkout(root: Path | str, *args: str) -> None:
    """``git sparse-checkout ARGS`` (set, add, reapply)."""
    run(["sparse-checkout", *args], root)


def lfs_update(root: Path | str) -> None:
    """Let git-lfs re-install its hooks (where it is set up); never fails."""
    run(["lfs", "update"], root, check=False)


# -- git-lfs ---------------------------------------------------------------------------------
# ``git lfs fetch --include`` takes one comma-separated argument; Linux allows 128 KiB per
# argument, so the paths go in groups well under that.
_LFS_INCLUDE_BYTES = 96 * 1024


def lfs_fetch_paths(root: Path | str, rev: str, paths: Sequence[str]) -> None:
    """Download the LFS objects of exactly ``paths`` as ``rev``'s tree has them, from the
    remote git-lfs would use (the branch's remote, else origin): one ``git lfs fetch`` per
    96 KiB of paths (about 1,800 chunks), ``--exclude=`` so that no ``lfs.fetchexclude``
    drops them."""
    remote = lfs_remote(root)
    groups: list[list[str]] = [[]]
    size = 0
    for p in paths:
        if size + len(p) + 1 > _LFS_INCLUDE_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += len(p) + 1
    for group in groups:
        if group:
            args = ["lfs", "fetch", f"--include={','.join(group)}", "--exclude=", remote, rev]
            _run_lfs(args, root)


def _run_lfs(args: Sequence[str], root: Path | str) -> None:
    """``git lfs ...``; a failure is a GitError with git-lfs's last message line (its first
    lines are progress), and a missing git-lfs says so."""
    if shutil.which("git-lfs") is None:
        raise GitError("this repository keeps chunks in Git LFS, but 'git-lfs' is not installed")
    proc = run(args, root, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]
        raise GitError(f"git lfs {args[1]} failed: {lines[-1] if lines else proc.returncode}")


def lfs_remote(root: Path | str) -> str:
    """The remote git-lfs fetches from: ``lfs.remote.default``... as git-lfs picks it: the
    current branch's remote, else ``origin``."""
    configured = config_get(root, "lfs.remote.default")
    if configured:
        return configured
    branch = run(["symbolic-ref", "-q", "--short", "HEAD"], root, check=False)
    name = branch.stdout.decode().strip()
    if branch.returncode == 0 and name:
        remote = config_get(root, f"branch.{name}.remote")
        if remote and remote != ".":
            return remote
    return "origin"


def lfs_install_local(root: Path | str) -> None:
    """git-lfs's filters in this clone's config, without its hooks (``--skip-repo``): ours
    run ``git lfs HOOK`` where git-lfs is set up."""
    _run_lfs(["lfs", "install", "--local", "--skip-repo"], root)
