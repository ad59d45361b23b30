"""``init``, ``install``, ``uninstall`` and ``doctor``: wiring a clone (or a remote) to git-crdt.

Like ``git lfs install``, install is idempotent and never clobbers a foreign hook: a hook that
is not ours is moved to ``HOOK.legacy`` and chained (it runs first, with the same arguments).

Transport: ``install`` also sets what git needs to move the chunks at near disk speed, in a
clone and in a bare repository that serves as a remote (``TRANSPORT_CONFIG``; why each key,
measured with real git: docs/hosting.md).  Our loose objects are zlib *stored* blocks; with
these settings push, fetch, clone and gc copy them as stored blocks and never search them for
deltas.  ``doctor`` checks the same settings, in a clone, in a bare repository, or in a local
remote (``--remote``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import gitops
from .errors import CrdtError, NotARepositoryError
from .repo import Repo, atomic_write

HOOKS = (
    "post-checkout",
    "post-merge",
    "post-rewrite",
    "post-commit",
    "pre-commit",
    "pre-merge-commit",
    "pre-push",
    "pre-applypatch",  # git am: verify each patch's state before it is committed
    "post-applypatch",  # git am: resolve after each patch (am runs no post-commit)
)
HOOK_MARKER = "git-crdt-merge hook"
DRIVER_ARGS = "merge-driver %O %A %B %L %P"
DRIVER_NAME = "git-crdt-merge: CRDT join of contribution manifests"
ATTRIBUTES = (
    ".crdt/manifest merge=crdt text eol=lf",
    ".crdt/objects/** -delta -diff -merge -text",
)
SPARSE_EXCLUDE = "!/.crdt/objects/"
BIG_FILE_THRESHOLD = "1m"
BIG_FILE_THRESHOLD_BYTES = 1024**2
# Packs above this size are left as they are by ``git gc`` (they hold chunks that are already
# stored); smaller ones are consolidated.
BIG_PACK_THRESHOLD = "64m"
# Set in clones and in bare remotes alike (reasons and measurements: docs/hosting.md).
TRANSPORT_CONFIG = {
    # blobs over 1 MiB are streamed and never searched for deltas (a bare remote reads no
    # .gitattributes, and git's default is 512 MiB)
    "core.bigFileThreshold": BIG_FILE_THRESHOLD,
    # pack-objects (push, serving a clone or fetch, gc) writes what it must deflate as stored
    # blocks, like our own loose objects
    "pack.compression": "0",
    # objects git itself writes loose (a small fetch or push, git add) are stored blocks too
    "core.looseCompression": "0",
    # every push and fetch is kept as the pack it arrived as: served again verbatim, never
    # exploded into loose objects that gc has to pack again
    "receive.unpackLimit": "1",
    "fetch.unpackLimit": "1",
    # gc leaves packs of chunks alone instead of copying them into a new pack every time
    "gc.bigPackThreshold": BIG_PACK_THRESHOLD,
}
# A bare repository reads attributes only from $GIT_DIR/info/attributes.
REMOTE_ATTRIBUTES = (".crdt/objects/** -delta -diff -merge -text",)
# Partial clones (git crdt clone --filter=blob:none) need the serving side's consent.
REMOTE_CONFIG = {"uploadpack.allowFilter": "true"}
# A path that stands for every chunk when asking git for the attributes that apply.
SAMPLE_OBJECT_PATH = ".crdt/objects/00/" + "0" * 62


def program() -> list[str]:
    """The absolute command that runs this installation's ``git-crdt``: the console script
    beside the running interpreter, else the one on PATH, else ``python -m git_crdt_merge``.
    git runs drivers and hooks with whatever PATH the user has at merge time (a virtual
    environment that is not activated): a bare ``git-crdt`` would then be "not found", and git
    would report a conflict but leave the manifest as our side."""
    beside = Path(sys.executable).parent / "git-crdt"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    found = shutil.which("git-crdt")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "git_crdt_merge"]


def driver_command() -> str:
    """``merge.crdt.driver``: run by git through ``sh -c``, so every word is shell-quoted
    (paths with spaces stay one argument)."""
    return " ".join(shlex.quote(w) for w in program()) + " " + DRIVER_ARGS


def driver_program_problem(driver: str) -> str | None:
    """Why the configured driver command cannot run, or None."""
    try:
        words = shlex.split(driver)
    except ValueError:
        return f"merge.crdt.driver {driver!r} is not a valid shell command"
    if "merge-driver" not in words:
        return f"merge.crdt.driver is {driver!r}, not git-crdt's driver"
    exe = words[0]
    if "/" in exe:
        if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
            return (
                f"the merge driver's program {exe} does not exist (a moved or deleted virtual "
                "environment?): run 'git crdt install' again"
            )
    elif shutil.which(exe) is None:
        return (
            f"the merge driver runs {exe!r} from PATH, which does not have it now: merges would "
            "report a conflict and keep only our side; run 'git crdt install' (it writes an "
            "absolute path)"
        )
    return None


def hook_script() -> str:
    text = (resources.files("git_crdt_merge.hook_templates") / "git-crdt-hook.sh").read_text()
    exe = program()
    # the hook needs one program path; `python -m` installations fall back to PATH
    return text.replace("@GIT_CRDT@", shlex.quote(exe[0] if len(exe) == 1 else ""))


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
    gitops.config_set(cwd, "merge.crdt.driver", driver_command(), scope=scope)


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


def chunk_files_in_work_tree(root: Path) -> list[Path]:
    """Files under ``.crdt/objects/`` in the work tree (none after a normal checkout)."""
    objects = root / ".crdt" / "objects"
    if not objects.exists():
        return []
    return sorted(p for p in objects.rglob("*") if p.is_file() or p.is_symlink())


def drop_chunk_files(root: Path) -> int:
    """Take chunk files out of the work tree again (``git sparse-checkout reapply``).

    ``git stash pop`` of a staged ``add-contribution`` writes the chunks into the work tree:
    without ``--index`` it re-adds newly staged files as ordinary index entries (no
    skip-worktree bit), and its merge writes them out.  No hook runs after a stash, so our
    commands and post-hooks call this.  Only files that match the index are removed (git keeps
    a modified one and says so); returns how many files were there.  Never raises."""
    found = chunk_files_in_work_tree(root)
    if not found:
        return 0
    try:
        configure_sparse(root)
    except CrdtError:
        pass  # e.g. unmerged entries; doctor reports what is left
    objects = root / ".crdt" / "objects"
    if objects.is_dir() and not chunk_files_in_work_tree(root):
        shutil.rmtree(objects, ignore_errors=True)  # empty fan-out folders git may leave
    return len(found)


def configure_transport(cwd: Path | str, *, bare: bool) -> list[str]:
    """Set ``TRANSPORT_CONFIG`` (and, in a bare repository, its attributes); returns notes."""
    notes = []
    wanted = dict(TRANSPORT_CONFIG)
    if bare:
        wanted.update(REMOTE_CONFIG)
    changed = []
    for key, value in wanted.items():
        if gitops.config_get(cwd, key, scope="local") != value:
            gitops.config_set(cwd, key, value)
            changed.append(f"{key}={value}")
    if changed:
        notes.append("transport settings: " + ", ".join(changed))
    if bare:
        path = gitops.git_dir(Path(cwd)) / "info" / "attributes"
        text = path.read_text() if path.exists() else ""
        missing = [line for line in REMOTE_ATTRIBUTES if line not in text.splitlines()]
        if missing:
            if text and not text.endswith("\n"):
                text += "\n"
            atomic_write(path, (text + "".join(f"{line}\n" for line in missing)).encode())
            notes.append(f"chunks marked -delta in {path}")
    return notes


def ensure_attributes(root: Path) -> bool:
    """Add our lines to ``.gitattributes``; return True if the file changed."""
    path = root / ".gitattributes"
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    missing = [line for line in ATTRIBUTES if line not in lines]
    if not missing:
        return False
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write(path, (text + "".join(f"{line}\n" for line in missing)).encode())
    return True


def install(
    cwd: Path | str = ".", *, global_: bool = False, sparse: bool | None = None
) -> list[str]:
    """Register the merge driver (and, in a repository, the hooks, the transport settings and
    sparse checkout).  In a bare repository (a remote) only the transport settings apply.

    ``sparse`` None sets sparse checkout when the repository holds git-crdt data."""
    if global_:
        configure_driver(cwd, "global")
        return [
            "merge driver registered in the global git config; run 'git crdt install' in "
            "each clone to add the hooks"
        ]
    if gitops.is_bare(cwd):
        notes = configure_transport(cwd, bare=True)
        return notes + ["bare repository: set what a remote needs to serve the chunks as stored"]
    repo = Repo.open(cwd)
    configure_driver(repo.root, "local")
    notes = configure_transport(repo.root, bare=False)
    # a plain `git am` applies the manifest's diff as text, which fails (sorted lines, other
    # context): with the three-way fallback git runs the driver on it
    gitops.config_set(repo.root, "am.threeWay", "true")
    repo.replica_id()
    notes += install_hooks(repo.root)
    if sparse is None:
        sparse = (
            repo.is_initialized() or gitops.show_blob(repo.root, "HEAD:.crdt/manifest") is not None
        )
    if sparse:
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
    (repo.root / ".crdt").mkdir(exist_ok=True)
    if not repo.manifest_path.exists():
        atomic_write(repo.manifest_path, b"")
        notes.append("created .crdt/manifest")
    if ensure_attributes(repo.root):
        notes.append("bound .crdt/manifest to the crdt merge driver in .gitattributes")
    ignore = repo.root / ".gitignore"
    text = ignore.read_text() if ignore.exists() else ""
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


def _effective_level(cwd: Path | str, key: str, default: int) -> tuple[int, str]:
    """(zlib level, the key it came from) for ``pack.compression``/``core.looseCompression``,
    which fall back to ``core.compression`` and then to git's default."""
    for name in (key, "core.compression"):
        value = gitops.config_get_int(cwd, name)
        if value is not None:
            return value, name
    return default, "git's default"


def _unpack_limit(cwd: Path | str, direction: str) -> int:
    for name in (f"{direction}.unpackLimit", "transfer.unpackLimit"):
        value = gitops.config_get_int(cwd, name)
        if value is not None:
            return value
    return 100


def stored_chunk_problems(cwd: Path | str, rev: str = "HEAD") -> tuple[list[str], str | None]:
    """Chunks of ``rev`` that the object database holds as deltas or deflated (problems), and
    an ok line.  Cheap: one ``ls-tree`` and one ``cat-file --batch-check``."""
    proc = gitops.run(["ls-tree", "-r", "-z", rev, "--", ".crdt/objects/"], cwd, check=False)
    if proc.returncode != 0:
        return [], None
    shas = [item.split()[2] for item in proc.stdout.decode().split("\0") if item.strip()]
    forms = gitops.stored_forms(cwd, shas)
    # Stored blocks cost 5 bytes per 64 KiB; zlib's deflate of weights saves 7-20 %.
    big = {s: f for s, f in forms.items() if f[0] >= BIG_FILE_THRESHOLD_BYTES}
    deltas = sum(1 for _, _, delta in big.values() if delta)
    deflated = sum(1 for size, disk, delta in big.values() if not delta and disk < size * 0.99)
    out = []
    if deltas:
        out.append(
            f"{deltas} chunk object(s) of {rev} are stored as deltas (every read "
            "reconstructs them): 'git repack -a -d -F' after 'git crdt install'"
        )
    if deflated:
        out.append(
            f"{deflated} chunk object(s) of {rev} are stored deflated (git inflates them on "
            "every read and re-sends them deflated): 'git repack -a -d -F' after "
            "'git crdt install'"
        )
    if out or not big:
        return out, None
    return out, f"the {len(big)} chunk objects of {rev} are stored undeflated, no deltas"


def transport_diagnosis(cwd: Path | str, *, bare: bool, where: str = "") -> Diagnosis:
    """Settings under which git would deflate the chunks again or search them for deltas."""
    d = Diagnosis()
    fix = "'git crdt install'" + (f" in {where}" if where else "")
    prefix = f"{where}: " if where else ""
    level, source = _effective_level(cwd, "pack.compression", -1)
    if level != 0:
        d.problems.append(
            f"{prefix}pack.compression is {level} ({source}): push, clone, fetch and gc "
            f"deflate every chunk again at 4-25 MB/s per core (run {fix})"
        )
    else:
        d.ok.append(f"{prefix}packs store the chunks undeflated (pack.compression 0)")
    level, source = _effective_level(cwd, "core.looseCompression", 1)
    if level != 0:
        d.problems.append(
            f"{prefix}core.looseCompression is {level} ({source}): objects git unpacks from "
            f"a push or fetch are deflated again (run {fix})"
        )
    direction = "receive" if bare else "fetch"
    limit = _unpack_limit(cwd, direction)
    if limit > 1:
        what = "a push" if bare else "a fetch"
        d.problems.append(
            f"{prefix}{direction}.unpackLimit is {limit}: {what} of fewer objects is exploded "
            f"into loose objects that gc must pack again (run {fix})"
        )
    threshold = gitops.config_get_int(cwd, "core.bigFileThreshold")
    threshold = 512 * 1024**2 if threshold is None else threshold
    if threshold > BIG_FILE_THRESHOLD_BYTES:
        d.problems.append(
            f"{prefix}core.bigFileThreshold is {threshold} bytes: git loads chunks below it "
            f"whole and may search them for deltas (run {fix})"
        )
    delta = gitops.check_attr(cwd, "delta", SAMPLE_OBJECT_PATH)
    if delta != "unset":
        how = (
            f"$GIT_DIR/info/attributes: packing searches the chunks for deltas (run {fix})"
            if bare
            else ".gitattributes: packing may search the chunks for deltas ('git crdt init' "
            "adds the line; commit .gitattributes)"
        )
        d.problems.append(f"{prefix}.crdt/objects/** is not marked -delta in {how}")
    if threshold <= BIG_FILE_THRESHOLD_BYTES and delta == "unset":
        d.ok.append(f"{prefix}chunks are never searched for deltas")
    if not gitops.config_get_int(cwd, "gc.bigPackThreshold"):
        d.problems.append(
            f"{prefix}gc.bigPackThreshold is not set: every 'git gc' copies every chunk into "
            f"a new pack (run {fix})"
        )
    # In a partial clone, asking for a missing blob's size would fetch it: skip the check.
    partial = gitops.config_get(cwd, "extensions.partialClone") is not None
    stored, ok = stored_chunk_problems(cwd) if not partial else ([], None)
    d.problems += [prefix + p for p in stored]
    if ok:
        d.ok.append(prefix + ok)
    return d


def _local_remote_path(cwd: Path | str, remote: str) -> tuple[Path | None, str]:
    """(local path or None, what to call it) of a remote name, a path or a file:// URL."""
    url = remote
    if not remote.startswith(("/", ".", "file://")) and not Path(remote).exists():
        found = gitops.remote_url(cwd, remote) if gitops.is_bare(cwd) is not None else None
        if found is None:
            return None, remote
        url = found
    if url.startswith("file://"):
        url = url[len("file://") :]
    path = Path(url) if Path(url).is_absolute() else Path(cwd) / url
    return (path if path.exists() else None), remote


def diagnose_remote(cwd: Path | str, remote: str) -> Diagnosis:
    """Transport settings of a remote on this machine (a name, a path or a file:// URL)."""
    path, label = _local_remote_path(cwd, remote)
    where = f"remote {label}"
    if path is None:
        return Diagnosis(
            problems=[
                f"{where}: not a repository on this machine, so its settings cannot be read "
                "here (hosted remotes: docs/hosting.md)"
            ]
        )
    bare = gitops.is_bare(path)
    if bare is None:
        return Diagnosis(problems=[f"{where}: {path} is not a git repository"])
    return transport_diagnosis(path, bare=bare, where=where)


def doctor(cwd: Path | str = ".", *, remote: str | None = None) -> Diagnosis:
    """What is missing or broken in this clone's set-up (or a bare repository's, or a local
    remote's with ``remote``)."""
    d = Diagnosis()
    exe = shutil.which("git-crdt")
    if exe is None:
        d.problems.append("'git-crdt' is not on PATH: git cannot run the merge driver or hooks")
    else:
        d.ok.append(f"git-crdt found at {exe}")
    if remote is not None:
        r = diagnose_remote(cwd, remote)
        d.ok += r.ok
        d.problems += r.problems
    if gitops.is_bare(cwd):
        d.ok.append("bare repository: checking what a remote needs")
        t = transport_diagnosis(cwd, bare=True)
        d.ok += t.ok
        d.problems += t.problems
        return d
    try:
        repo = Repo.open(cwd)
    except NotARepositoryError as exc:
        if remote is None:
            d.problems.append(str(exc))
        return d
    driver = gitops.config_get(repo.root, "merge.crdt.driver")
    if driver is None:
        d.problems.append(
            "merge driver 'crdt' is not configured: run 'git crdt install' "
            "(merges would fall back to a text merge)"
        )
    elif (why := driver_program_problem(driver)) is not None:
        d.problems.append(why)
    else:
        d.ok.append(f"merge driver configured ({driver})")
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
    chunk_files = chunk_files_in_work_tree(repo.root)
    if chunk_files:
        d.problems.append(
            f"{len(chunk_files)} file(s) under .crdt/objects/ in the work tree (left by a "
            "plain 'git clone' or by 'git stash pop', which re-adds new files without the "
            "skip-worktree bit): run 'git sparse-checkout reapply' or 'git crdt install'; "
            "the next git-crdt command or hook does it too"
        )
    t = transport_diagnosis(repo.root, bare=False)
    d.ok += t.ok
    d.problems += t.problems
    try:
        manifest = repo.read_manifest()
        d.ok.append("manifest valid")
    except Exception as exc:  # report, do not crash: doctor is for broken states
        d.problems.append(f"manifest: {exc}")
        return d
    from .freshness import output_state

    state = output_state(repo, manifest)
    (d.ok if state.ok else d.problems).append(state.message())
    return d
