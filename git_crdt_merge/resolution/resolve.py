"""Layer 2 entry point: bring the output folder to the merged model of the visible set.

On a cache hit (the usual case after a checkout back to a known set) this is a few file
operations and imports no torch; on a miss it plans and computes with :mod:`engine`, writes the
result into the cache under a temporary name, renames it into place and publishes it.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import faults
from ..errors import ResolveError, StoreError
from ..git import commands as gitops
from ..replicated.contributions import fetch_set
from ..replicated.descriptor import Descriptor
from ..replicated.encoding import layout_problem
from ..replicated.manifest import Manifest
from ..replicated.repo import Repo
from ..replicated.store import ObjectStore
from ..vocabulary import COMPUTE_DTYPE_NAMES
from . import cache

if TYPE_CHECKING:
    from .plan import Plan


@dataclass
class Outcome:
    root: str
    output: Path
    cache_hit: bool
    empty: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "merkle_root": self.root,
            "output": str(self.output),
            "cache_hit": self.cache_hit,
            "empty": self.empty,
        }


def _no_symlink_on_the_way(root: Path, out_dir: Path) -> None:
    """The ``output`` register comes from repository content: never follow a symbolic link
    (committed by anyone) out of the work tree."""
    cur = root
    for part in out_dir.relative_to(root).parts:
        cur = cur / part
        if cur.is_symlink():
            raise ResolveError(
                f"output path {out_dir.relative_to(root)} goes through the symbolic link "
                f"{cur.relative_to(root)}; refusing to write through it"
            )


def check_output_path(root: Path, out_dir: Path) -> None:
    """The output folder lies in the work tree, through no symbolic link, and not inside a
    git directory or a ``.crdt`` one at any depth (a nested repository's ``.git/hooks``)."""
    _no_symlink_on_the_way(root, out_dir)
    for part in out_dir.relative_to(root).parts:
        if part.casefold() in (".git", ".crdt"):
            raise ResolveError(f"output path {out_dir.relative_to(root)} goes into {part}")


def check_inputs(store: ObjectStore, descriptors: list[Descriptor]) -> None:
    """Refuse descriptors whose tensors contradict their chunks (sizes read from the object
    headers), before any buffer is sized from them: a hostile descriptor must give a one-line
    error, not an allocation of its claimed size.  Raw chunks must add up to the tensor; an
    encoded chunk may be no larger than zstd's bound for the decoded size recorded for it
    (which the descriptor's validation made add up to the tensor), and its frame is checked
    against that size before it is decoded.  (Fields were validated when the descriptors were
    read: ``reader.read_descriptor``.)"""
    for desc in descriptors:
        for _, info in desc.entries():
            why = layout_problem(
                info.nbytes, info.chunks, info.encoding, store.size, f"tensor {info.name!r}"
            )
            if why is not None:
                raise StoreError(f"{why} (run 'git crdt verify --full')")


def xor_scratch_needed(descriptors: list[Descriptor]) -> bool:
    """Whether some input is XOR-encoded (resolution then may hold one more tensor)."""
    return any(
        info.encoding is not None and info.encoding.base is not None
        for desc in descriptors
        for _, info in desc.entries()
    )


def resolve(
    repo: Repo,
    *,
    output: Path | None = None,
    device: str = "cpu",
    compute_dtype: str = "float32",
    max_shard: int | None = None,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> Outcome:
    """Resolve the work tree's manifest into ``output`` (default: the ``output`` register);
    ``max_shard`` defaults to the ``crdt.maxShardSize`` setting.

    ``workers``: processes that resolve tensors side by side (default: ``crdt.workers``, else
    every core for compute-bound strategies and one for the others, see
    :func:`pool.choose_workers`); the bytes are the same for any number."""
    repo.require_initialized()
    if max_shard is None:
        max_shard = cache.max_shard_setting(repo)
    if compute_dtype not in COMPUTE_DTYPE_NAMES:
        raise ResolveError(f"compute dtype must be float32 or float64, not {compute_dtype!r}")
    if max_shard < 1:
        raise ResolveError(f"the maximum shard size must be at least 1 byte, not {max_shard}")
    if workers is not None and workers < 1:
        raise ResolveError(f"the number of workers must be at least 1, not {workers}")
    manifest = repo.read_manifest()
    out_dir = output if output is not None else repo.root / manifest.output()
    if output is None:
        check_output_path(repo.root, out_dir)
    cache.check_replaceable(repo, out_dir)  # before any work: never computed only to be refused
    root = manifest.merkle_root()
    if not manifest.visible_contributions():
        if output is None:  # the set became empty: the old model must not stay
            from .freshness import remove_output

            remove_output(repo, out_dir)
        return Outcome(root, out_dir, False, empty=True)
    settings = cache.Settings(device, compute_dtype, max_shard, workers)
    key = settings.key(root, cache.strategy_revision(manifest))
    if cache.try_publish(repo, key, out_dir):
        return Outcome(root, out_dir, True)
    resolve_to_cache(
        repo, manifest, ObjectStore(repo.root), settings, on_start=on_start, progress=progress
    )
    cache.publish_entry(repo, key, out_dir)
    cache.prune_to_budget(repo, key)
    return Outcome(root, out_dir, False)


def plan_only(repo: Repo) -> dict[str, Any]:
    """``resolve --dry-run``: the plan of the work tree's manifest
    (:func:`.dryrun.describe_plan`), from the descriptors alone; nothing is computed or
    written.  An empty set gives ``{"empty": True}``."""
    repo.require_initialized()
    manifest = repo.read_manifest()
    if not manifest.visible_contributions():
        return {"empty": True, "merkle_root": manifest.merkle_root()}
    from . import engine
    from .dryrun import describe_plan

    store = ObjectStore(repo.root)
    plan = engine.make_plan(store, manifest)
    check_inputs(store, [*plan.descriptors, *([plan.base] if plan.base else [])])
    return {"empty": False, **describe_plan(plan)}


def resolve_to_cache(
    repo: Repo,
    manifest: Manifest,
    store: ObjectStore,
    settings: cache.Settings,
    *,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """The one cache-miss path: compute the merged model of ``manifest``'s visible set into its
    cache entry (``settings.key``) and return its folder.  It fetches what a partial clone
    lacks, plans, refuses hostile descriptors (:func:`check_inputs`) and what memory cannot
    hold before any buffer is sized, computes into a work folder and commits it to the cache.
    Every caller (``resolve``, ``diff --tensors REV``) goes through here, so none runs
    unguarded."""
    from . import engine, pool  # torch is imported only when there is work to do

    key = settings.key(manifest.merkle_root(), cache.strategy_revision(manifest))
    if settings.device == "cuda" and not engine.torch.cuda.is_available():
        raise ResolveError("--device cuda: no CUDA device is available")
    fetch_set(store, manifest)  # a partial clone: what this set needs, in two batches
    plan = engine.make_plan(store, manifest)
    inputs = [*plan.descriptors, *([plan.base] if plan.base else [])]
    check_inputs(store, inputs)
    largest = max((math.prod(s.shape) for s in plan.specs), default=0)
    check_memory(
        plan.largest_input(),
        len(plan.descriptors) + 1 + int(xor_scratch_needed(inputs)),
        # LoRA: the float64 product B @ A and each adapter's materialised input
        engine.lowrank_bytes(plan, largest, settings.compute_dtype),
    )
    requested = settings.workers if settings.workers is not None else configured_workers(repo)
    per_worker = worker_memory(plan, int(xor_scratch_needed(inputs)))
    have = available_memory()
    processes = pool.choose_workers(
        plan.strategy,
        requested,
        len(plan.specs),
        settings.device,
        per_worker=per_worker,
        available=have,
    )
    if processes > 1 and have is not None and processes * per_worker > have:
        raise ResolveError(
            f"{processes} resolve workers need about {processes * per_worker / 1e9:.1f} GB of "
            f"memory ({per_worker / 1e9:.2f} GB each), {have / 1e9:.1f} GB is available: "
            f"lower --workers or crdt.workers"
        )
    if on_start is not None:
        on_start(sum(s.nbytes for s in plan.specs))
    work = cache.new_work_dir(repo, key)

    def advance(n: int) -> None:
        faults.point("resolve:tensor")
        if progress is not None:
            progress(n)

    try:
        engine.compute(plan, store, work, replace(settings, workers=processes), advance)
        faults.point("resolve:computed")
        return cache.commit_to_cache(repo, key, work)
    except MemoryError:
        shutil.rmtree(work, ignore_errors=True)
        raise ResolveError("out of memory while resolving (see 'git crdt verify')") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


WORKERS_KEY = "crdt.workers"


def configured_workers(repo: Repo) -> int | None:
    """``crdt.workers`` (a local setting, never replicated: it says how this machine computes,
    not what); None when unset (the per-strategy default)."""
    raw = gitops.config_get(repo.root, WORKERS_KEY)
    if raw is None or raw.strip().lower() in ("", "auto"):
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ResolveError(f"{WORKERS_KEY} must be a number of processes (at least 1), not {raw!r}")
    return value


def available_memory() -> int | None:
    """Bytes of memory this process may still use: the system's MemAvailable, and what the
    address-space limit (``ulimit -v``) leaves; None where neither is known."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/statm", "rb") as fh:
                used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            found.append(max(limit - used, 0))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


def worker_memory(plan: Plan, xor_scratch: int) -> int:
    """Bytes one worker process of a parallel resolve may hold at its peak: its input slots
    (:func:`memory_needed`), its extra-input slots (Gram matrices, Fisher diagonals) and the
    strategy's float64 working matrices (``Strategy.float64_scratch``)."""
    k = len(plan.descriptors)
    largest = max((math.prod(s.shape) for s in plan.specs), default=0)
    side = max(
        (max(s.shape[0], math.prod(s.shape[1:])) for s in plan.specs if len(s.shape) >= 2),
        default=0,
    )
    extras = k * len(plan.strategy.extra_inputs) * plan.largest_extra()
    return (
        memory_needed(plan.largest_input(), k + 1 + xor_scratch)
        + extras
        + plan.strategy.scratch_bytes(largest, side, k)
    )


def memory_needed(largest: int, inputs: int, extra: int = 0) -> int:
    """Bytes a resolution's buffers take: one slot per input, plus the result and
    temporaries, each the size of the largest tensor, plus ``extra`` (LoRA deltas)."""
    return largest * (inputs + 3) + extra


def check_memory(largest: int, inputs: int, extra: int = 0) -> None:
    """Refuse a resolution whose buffers alone (one slot per input, plus the result and
    temporaries, each the largest tensor) cannot fit: a descriptor that lists one small chunk
    many times claims a tensor far larger than its objects, and must be a one-line error, not
    an out-of-memory kill.  ``extra``: further buffers of the plan (LoRA deltas)."""
    need = memory_needed(largest, inputs, extra)
    have = available_memory()
    if have is not None and need > have:
        raise ResolveError(
            f"resolving needs about {need / 1e9:.1f} GB of memory (largest tensor "
            f"{largest / 1e9:.2f} GB x {inputs + 3}"
            + (f", plus {extra / 1e9:.2f} GB for LoRA deltas" if extra else "")
            + f"), {have / 1e9:.1f} GB is available"
        )
