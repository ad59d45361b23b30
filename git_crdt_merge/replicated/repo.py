"""One repository as git-crdt sees it: paths, the manifest file, the lock, the replica id."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import bounded, faults
from ..errors import ManifestError, NotARepositoryError, NotFoundError
from ..git import commands as gitops
from ..git.commands import pid_alive  # noqa: F401 (re-exported for the cache)
from .manifest import MANIFEST_PATH, MAX_MANIFEST_BYTES, Manifest

LOCK_TIMEOUT_S = 120.0


def atomic_write(
    path: Path, data: bytes, *, mode: int = 0o644, tmp_dir: Path | None = None
) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: readers see old or new.

    ``tmp_dir`` (on the same file system) keeps the temporary file out of sight, e.g. out of
    the work tree, if the process is killed before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    where = tmp_dir if tmp_dir is not None else path.parent
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=where)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        faults.point(f"write:{path.name}")
        try:
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV or tmp_dir is None:
                raise
            Path(tmp).unlink(missing_ok=True)
            atomic_write(path, data, mode=mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Repo:
    root: Path
    git_dir: Path

    @classmethod
    def open(cls, cwd: Path | str = ".") -> Repo:
        root = gitops.toplevel(cwd)
        return cls(root, gitops.git_dir(root))

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_PATH

    @property
    def state_dir(self) -> Path:
        """Private per-clone state: lock, result cache."""
        return gitops.common_dir(self.root) / "crdt"

    def is_initialized(self) -> bool:
        """Whether the work tree has a ``.crdt`` entry (a symbolic link counts, so that
        :meth:`require_initialized` refuses it loudly instead of the repository looking
        uninitialised)."""
        return os.path.lexists(self.root / ".crdt")

    def require_initialized(self) -> None:
        if not self.is_initialized():
            raise NotARepositoryError(
                f"{self.root} has no .crdt/ directory: run 'git crdt init' first"
            )
        self.check_crdt_dir()

    def check_crdt_dir(self) -> None:
        """``.crdt`` must be a real directory and ``.crdt/manifest`` (if any) a regular file:
        a commit can make either a symbolic link, and then every read or write of the
        manifest would go wherever it points (outside the repository, ``/dev/zero``)."""
        crdt = self.root / ".crdt"
        st = crdt.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise ManifestError(
                ".crdt is a symbolic link (committed by someone?); refusing to read or write "
                "through it: 'git rm .crdt' and restore the directory from a good commit"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise ManifestError(".crdt is not a directory")
        try:
            mst = self.manifest_path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mst.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(mst.st_mode) else "not a regular file"
            raise ManifestError(f"{MANIFEST_PATH} is {kind}; refusing to read or write through it")

    def read_manifest_bytes(self) -> bytes:
        """The work-tree manifest's bytes (empty if absent): a bounded read of a regular
        file inside a real ``.crdt`` directory."""
        self.check_crdt_dir()
        try:
            return bounded.read_regular(self.manifest_path, MAX_MANIFEST_BYTES, MANIFEST_PATH)
        except FileNotFoundError:
            return b""

    def read_manifest(self) -> Manifest:
        return Manifest.parse(self.read_manifest_bytes(), MANIFEST_PATH)

    def manifest_bytes_at(self, rev: str | None) -> tuple[bytes, str]:
        """(bytes, source label) of the manifest of a state: the work tree (``rev`` None), the
        index (``":"``, or a stage of it: ``":2"``) or a revision; a state without a manifest
        gives empty bytes."""
        if rev is None:
            return self.read_manifest_bytes(), MANIFEST_PATH
        spec = f":{MANIFEST_PATH}" if rev == ":" else f"{rev}:{MANIFEST_PATH}"
        return gitops.show_blob(self.root, spec) or b"", spec

    def manifest_at(self, rev: str | None, *, known: bool = False) -> Manifest:
        """The one state reader: the manifest of the work tree (``rev`` None), the index
        (``":"``) or a revision.  A state without a manifest is the empty set.  With
        ``known``, a revision must name a commit (else :class:`NotFoundError`), except ``HEAD``
        before the first commit, which is the empty set."""
        if known and rev not in (None, ":") and gitops.commit_of(self.root, rev) is None:
            if rev == "HEAD" and gitops.head_is_unborn(self.root):
                return Manifest.parse(b"", rev)
            raise NotFoundError(f"unknown revision {rev!r}")
        return Manifest.parse(*self.manifest_bytes_at(rev))

    def write_manifest(self, manifest: Manifest, env: dict[str, str] | None = None) -> None:
        """Write the manifest atomically and stage it (``git add``).  Call it inside
        :meth:`transaction` with the manifest read there, and pass its ``env``."""
        self.check_crdt_dir()
        atomic_write(self.manifest_path, manifest.serialize(), tmp_dir=self.state_dir)
        faults.point("manifest:written")
        gitops.stage_file(self.root, MANIFEST_PATH, env=env)

    @contextmanager
    def transaction(self) -> Iterator[dict[str, str]]:
        """git's index lock (take :meth:`lock` first): inside it, read the manifest, change
        it, stage.  A writer that read the manifest earlier (before a long ingest) must read
        it again here: a ``git pull`` or ``git commit`` may have changed it meanwhile, and
        staging a stale copy would drop what they brought."""
        with gitops.index_transaction(self.root) as env:
            yield env

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a writer that was killed (we hold the lock, so none is live):
        the manifest's, and the merge driver's (named by a pid that is gone)."""
        crdt = self.root / ".crdt"
        places = [self.state_dir] + ([] if crdt.is_symlink() else [crdt])
        for where in places:
            for tmp in where.glob(".manifest.*.tmp"):
                tmp.unlink(missing_ok=True)
        for tmp in self.state_dir.glob("merge-driver-*.tmp"):
            gitops.remove_orphan(tmp, tmp.name[len("merge-driver-") : -len(".tmp")])

    def replica_id(self) -> str:
        """This clone's replica id, kept in its local git config (created on first use)."""
        rid = gitops.config_get(self.root, "crdt.replica", scope="local")
        if rid is None:
            rid = secrets.token_hex(8)
            gitops.config_set(self.root, "crdt.replica", rid)
        return rid

    @contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Exclusive lock for writers of the manifest and objects (waits up to ``timeout``)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)

        def take() -> bool | None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return None

        try:
            gitops.wait_for(
                take, timeout, f"another git-crdt process holds {self.state_dir / 'lock'}"
            )
            self._remove_stale_temporaries()
            yield
        finally:
            os.close(fd)


def new_tag() -> str:
    return secrets.token_hex(16)
