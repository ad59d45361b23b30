"""One repository as git-crdt sees it: paths, the manifest file, the lock, the replica id."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import faults, gitops
from .errors import LockError, NotARepositoryError
from .gitops import pid_alive
from .manifest import MANIFEST_PATH, Manifest

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
        return (self.root / ".crdt").is_dir()

    def require_initialized(self) -> None:
        if not self.is_initialized():
            raise NotARepositoryError(
                f"{self.root} has no .crdt/ directory: run 'git crdt init' first"
            )

    def read_manifest(self) -> Manifest:
        try:
            data = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return Manifest({})
        return Manifest.parse(data, MANIFEST_PATH)

    def write_manifest(self, manifest: Manifest, env: dict[str, str] | None = None) -> None:
        """Write the manifest atomically and stage it (``git add``).  Call it inside
        :meth:`transaction` with the manifest read there, and pass its ``env``."""
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
        for where in (self.root / ".crdt", self.state_dir):
            for tmp in where.glob(".manifest.*.tmp"):
                tmp.unlink(missing_ok=True)
        for tmp in self.state_dir.glob("merge-driver-*.tmp"):
            pid = tmp.name[len("merge-driver-") : -len(".tmp")]
            if pid.isdigit() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)

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
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise LockError(
                            f"another git-crdt process holds {self.state_dir / 'lock'}"
                        ) from None
                    time.sleep(0.05)
            self._remove_stale_temporaries()
            yield
        finally:
            os.close(fd)


def new_tag() -> str:
    return secrets.token_hex(16)
