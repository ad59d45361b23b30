"""``init``, ``install``, ``uninstall`` and ``doctor``: wiring a clone to git-crdt.

Like ``git lfs install``, install is idempotent and never clobbers a foreign hook: a hook that
is not ours is moved to ``HOOK.legacy`` and chained (it runs first, with the same arguments).
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import bounded, gitops
from .errors import InputError, NotARepositoryError
from .repo import Repo, atomic_write

HOOKS = (
    "post-checkout",
    "post-merge",
    "post-rewrite",
    "post-commit",
    "pre-commit",
    "pre-merge-commit",
    "pre-push",
)
HOOK_MARKER = "git-crdt-merge hook"
DRIVER_CMD = "git-crdt merge-driver %O %A %B %L %P"
DRIVER_NAME = "git-crdt-merge: CRDT join of contribution manifests"
ATTRIBUTES = (
    ".crdt/manifest merge=crdt text eol=lf",
    ".crdt/objects/** -delta -diff -merge -text",
)
SPARSE_EXCLUDE = "!/.crdt/objects/"
BIG_FILE_THRESHOLD = "1m"


def hook_script() -> str:
    return (resources.files("git_crdt_merge.hook_templates") / "git-crdt-hook.sh").read_text()


def _is_ours(path: Path) -> bool:
    try:
        return HOOK_MARKER in path.read_text(errors="replace")
    except OSError:
        return False


def install_hooks(root: Path) -> list[str]:
    """Place our hook in every hook slot; a foreign hook moves to ``.legacy``.  Returns notes."""
    hooks = gitops.hooks_dir(root)
    hooks.mkdir(parents=True, exist_ok=True)
    script = hook_script()
    notes = []
    for name in HOOKS:
        path = hooks / name
        if path.exists() and not _is_ours(path):
            legacy = hooks / f"{name}.legacy"
            if legacy.exists():
                notes.append(
                    f"{name}: kept existing {legacy.name}; replaced {name} (saved as "
                    f"{name}.legacy.bak)"
                )
                os.replace(path, hooks / f"{name}.legacy.bak")
            else:
                os.replace(path, legacy)
                notes.append(f"{name}: existing hook moved to {legacy.name} and chained")
        tmp = hooks / f".{name}.tmp"
        tmp.write_text(script)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, path)
    return notes


def uninstall_hooks(root: Path) -> None:
    hooks = gitops.hooks_dir(root)
    for name in HOOKS:
        path = hooks / name
        if path.exists() and _is_ours(path):
            path.unlink()
            legacy = hooks / f"{name}.legacy"
            if legacy.exists():
                os.replace(legacy, path)


def configure_driver(cwd: Path | str, scope: str) -> None:
    gitops.config_set(cwd, "merge.crdt.name", DRIVER_NAME, scope=scope)
    gitops.config_set(cwd, "merge.crdt.driver", DRIVER_CMD, scope=scope)


def configure_sparse(root: Path) -> None:
    """Keep ``.crdt/objects/`` out of the work tree, and drop what a plain clone wrote there."""
    enabled = gitops.config_get(root, "core.sparseCheckout") == "true"
    patterns_file = gitops.git_dir(root) / "info" / "sparse-checkout"
    if not enabled:
        gitops.run(["sparse-checkout", "set", "--no-cone", "/*", SPARSE_EXCLUDE], root)
        return
    lines = patterns_file.read_text().splitlines() if patterns_file.exists() else []
    if SPARSE_EXCLUDE not in lines:
        gitops.run(["sparse-checkout", "add", SPARSE_EXCLUDE], root)
    else:
        gitops.run(["sparse-checkout", "reapply"], root)


def _read_small(path: Path) -> str:
    """A repository text file we add lines to (``.gitattributes``, ``.gitignore``): a regular
    file of at most 1 MiB, never read through a symbolic link ("" if absent)."""
    try:
        data = bounded.read_regular(path, 1024**2, path.name, InputError)
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="replace")


def ensure_attributes(root: Path) -> bool:
    """Add our lines to ``.gitattributes``; return True if the file changed."""
    path = root / ".gitattributes"
    text = _read_small(path)
    lines = text.splitlines()
    missing = [line for line in ATTRIBUTES if line not in lines]
    if not missing:
        return False
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write(path, (text + "".join(f"{line}\n" for line in missing)).encode())
    return True


def install(cwd: Path | str = ".", *, global_: bool = False) -> list[str]:
    """Register the merge driver (and, in a repository, the hooks and sparse checkout)."""
    if global_:
        configure_driver(cwd, "global")
        return [
            "merge driver registered in the global git config; run 'git crdt install' in "
            "each clone to add the hooks"
        ]
    repo = Repo.open(cwd)
    configure_driver(repo.root, "local")
    gitops.config_set(repo.root, "core.bigFileThreshold", BIG_FILE_THRESHOLD)
    repo.replica_id()
    notes = install_hooks(repo.root)
    if repo.is_initialized() or gitops.show_blob(repo.root, "HEAD:.crdt/manifest") is not None:
        configure_sparse(repo.root)
    return notes


def uninstall(cwd: Path | str = ".", *, global_: bool = False) -> None:
    if global_:
        gitops.config_remove_section(cwd, "merge.crdt", scope="global")
        return
    repo = Repo.open(cwd)
    gitops.config_remove_section(repo.root, "merge.crdt")
    uninstall_hooks(repo.root)


def init(cwd: Path | str = ".") -> list[str]:
    """Create ``.crdt/`` with an empty manifest, bind it to the driver, and install."""
    repo = Repo.open(cwd)
    notes = []
    if not os.path.lexists(repo.root / ".crdt"):
        (repo.root / ".crdt").mkdir()
    repo.check_crdt_dir()  # never through a committed symbolic link
    if not repo.manifest_path.exists():
        atomic_write(repo.manifest_path, b"")
        notes.append("created .crdt/manifest")
    if ensure_attributes(repo.root):
        notes.append("bound .crdt/manifest to the crdt merge driver in .gitattributes")
    ignore = repo.root / ".gitignore"
    text = _read_small(ignore)
    if "/merged/" not in text.splitlines():
        sep = "" if not text or text.endswith("\n") else "\n"
        atomic_write(ignore, (text + sep + "/merged/\n").encode())
    gitops.run(["add", "--", ".crdt/manifest", ".gitattributes", ".gitignore"], repo.root)
    notes += install(repo.root)
    return notes


@dataclass
class Diagnosis:
    problems: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)


def doctor(cwd: Path | str = ".") -> Diagnosis:
    """What is missing or broken in this clone's set-up."""
    d = Diagnosis()
    exe = shutil.which("git-crdt")
    if exe is None:
        d.problems.append("'git-crdt' is not on PATH: git cannot run the merge driver or hooks")
    else:
        d.ok.append(f"git-crdt found at {exe}")
    try:
        repo = Repo.open(cwd)
    except NotARepositoryError as exc:
        d.problems.append(str(exc))
        return d
    driver = gitops.config_get(repo.root, "merge.crdt.driver")
    if driver is None:
        d.problems.append(
            "merge driver 'crdt' is not configured: run 'git crdt install' "
            "(merges would fall back to a text merge)"
        )
    elif "git-crdt merge-driver" not in driver:
        d.problems.append(f"merge.crdt.driver is {driver!r}, not git-crdt's driver")
    else:
        d.ok.append("merge driver configured")
    if not repo.is_initialized():
        d.problems.append("no .crdt/ directory: run 'git crdt init'")
        return d
    attrs = gitops.out(["check-attr", "merge", "--", ".crdt/manifest"], repo.root)
    if not attrs.endswith(": crdt"):
        d.problems.append(".gitattributes does not bind .crdt/manifest to merge=crdt")
    else:
        d.ok.append(".crdt/manifest bound to the driver")
    hooks = gitops.hooks_dir(repo.root)
    missing = [h for h in HOOKS if not _is_ours(hooks / h)]
    if missing:
        d.problems.append(f"hooks missing: {', '.join(missing)} (run 'git crdt install')")
    else:
        d.ok.append("hooks installed")
    if gitops.config_get(repo.root, "core.sparseCheckout") != "true":
        d.problems.append(
            "sparse checkout not set: .crdt/objects may be written into the work "
            "tree (run 'git crdt install')"
        )
    else:
        d.ok.append("sparse checkout keeps .crdt/objects out of the work tree")
    if (repo.root / ".crdt" / "objects").exists():
        d.problems.append(
            ".crdt/objects/ exists in the work tree (run 'git crdt install' to drop it)"
        )
    try:
        repo.read_manifest()
        d.ok.append("manifest valid")
    except Exception as exc:  # report, do not crash: doctor is for broken states
        d.problems.append(f"manifest: {exc}")
    return d
