"""Parallel resolution across tensors: worker processes resolve whole tensors and write each at
its fixed offset of the output shards.

The per-tensor computation is :func:`engine.merge_tensor`, unchanged: it reads one tensor
name's inputs from the object store, runs the strategy and checks the result, and it depends
only on the plan entry (the random stream is keyed by the root, the tensor name and the
contribution, never by a counter that earlier tensors advanced).  So the bytes of a tensor do
not depend on which process computed it, nor when.  Every worker runs torch on one thread
(the numerics give the same bits for any thread count anyway, see ``docs/design.md``).  The
layout does not depend on the schedule either: a safetensors header holds only names, dtypes,
shapes and offsets, so :func:`writer.create_shard` writes every shard's header and sizes the
file before any tensor is computed, and each worker writes its tensor with ``pwrite`` at the
offset the header promises.  Any number of workers therefore writes the same files as the
serial loop of :func:`engine.compute`.

A strategy with a whole-model statistics pass gets it computed once, in the calling process,
before the workers start; its result (:class:`registry.ModelValues`) is sent to every worker
with the plan, so all of them merge with the same statistics.  A strategy with side tensors
(``Strategy.side_output``) gets them from the workers too: each appends its side tensors to a
data file of its own (``writer.SidePart``) and reports where they are with each tensor's result;
the calling process assembles the side file in name order (``writer.SideFile.finish``), so it
too has the same bytes for any number of workers.

Workers are forked processes (:func:`_context` says why that is safe).  Memory: each worker
holds its own input slots, about (K + 2) x the largest tensor, its extra inputs and its
strategy's float64 working matrices (``resolve.worker_memory``); the default number of workers
is capped by what the available memory holds (:func:`choose_workers`).
A failure leaves nothing behind: the files are written into the cache's work folder, which the
caller publishes only when everything succeeded (``resolve.resolve_to_cache``); a worker that
dies (killed, out of memory) is a :class:`ResolveError`, the remaining tensors are cancelled,
and a worker whose calling process died exits on its own.  Workers ignore SIGINT: Ctrl-C stops
the calling process, which cancels what has not started and waits for the tensors in flight.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .. import faults
from ..errors import ResolveError
from ..strategies import registry
from .plan import Plan, TensorSpec
from .writer import SideFile, SidePart


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def choose_workers(
    strategy: registry.Strategy,
    requested: int | None,
    tensors: int,
    device: str,
    cores: int | None = None,
    per_worker: int = 0,
    available: int | None = None,
) -> int:
    """How many processes resolve this plan.

    ``requested`` (``--workers`` or ``crdt.workers``) is used as given; unset, a strategy that
    declares itself ``compute_bound`` gets every core and the others one process (measured:
    for linear and ties, process start and the second process's reads cost more than the
    arithmetic they share, see ``docs/performance.md``), but no more than ``available`` bytes
    of memory hold at ``per_worker`` bytes each (a large model on a machine with many cores and
    little memory gets fewer workers, not an out-of-memory kill; an explicit number is checked
    by the caller instead).  Never more workers than tensors; one for CUDA (a device runs one
    stream)."""
    if requested is not None and requested < 1:
        raise ResolveError(f"the number of workers must be at least 1, not {requested}")
    if device != "cpu":
        return 1
    if requested is None:
        requested = (cores or available_cores()) if strategy.compute_bound else 1
        if per_worker > 0 and available is not None:
            requested = min(requested, available // per_worker)
    return max(1, min(requested, tensors))


@dataclass(frozen=True)
class _Job:
    """What a worker needs, pickled once per worker: the plan without its strategy object
    (looked up again by name: a strategy holds functions), the statistics, where to read."""

    repo_root: Path
    rev: str | None
    strategy: str
    plan: dict[str, Any]
    model: registry.ModelValues | None
    compute_dtype: str
    device: str
    parent: int  # the calling process (the workers' parent): a worker exits when it is gone
    side: Path | None  # the side file (Strategy.side_output), or None


class _Worker:
    """A worker process's state: the plan, the store, its own input slots, open shard files."""

    def __init__(self, job: _Job) -> None:
        import torch

        from ..heap import bound_heap
        from ..numerics import COMPUTE_DTYPES, RandomStream
        from ..replicated.store import ObjectStore
        from .buffers import InputSlots
        from .cache import seed_of

        torch.set_num_threads(1)  # fixed per worker; the workers are the parallelism
        self.plan = Plan(strategy=registry.get_strategy(job.strategy), **job.plan)
        self.model = job.model
        self.device = job.device
        self.compute = COMPUTE_DTYPES[job.compute_dtype]
        self.store = ObjectStore(job.repo_root, rev=job.rev, workers=1)
        self.rng = RandomStream.from_seed(seed_of(self.plan.root))
        largest = self.plan.largest_input()
        bound_heap(largest)
        self.slots = InputSlots(len(self.plan.descriptors) + 1, largest)
        self.extra_slots = InputSlots(
            len(self.plan.descriptors) * len(self.plan.strategy.extra_inputs),
            self.plan.largest_extra(),
        )
        self.files: dict[Path, int] = {}
        self.side: SidePart | None = None
        if job.side is not None:
            self.side = SidePart(SideFile(job.side).part_path(str(os.getpid())))

    def resolve(self, path: Path, offset: int, index: int) -> _Done:
        from ..heap import release_free_heap
        from . import engine
        from .writer import write_tensor_at

        spec = self.plan.specs[index]
        out = engine.merge_tensor(
            self.plan,
            spec,
            self.store,
            self.rng,
            self.compute,
            self.device,
            self.slots,
            self.extra_slots,
            self.model,
            self.side,
        )
        fd = self.files.get(path)
        if fd is None:
            fd = self.files[path] = os.open(path, os.O_WRONLY)  # created by the caller
        write_tensor_at(fd, offset, out, spec)
        del out
        release_free_heap()
        faults.point("resolve:worker-tensor")
        if self.side is None:
            return _Done(spec.nbytes, None, [])
        return _Done(spec.nbytes, self.side.path, self.side.take())


@dataclass(frozen=True)
class _Done:
    """A worker's answer for one tensor: its bytes (for the progress bar) and the side tensors
    it appended to its data file ``side`` (spec and offset each)."""

    nbytes: int
    side: Path | None
    side_entries: list[tuple[TensorSpec, int]]


_STATE: _Worker | None = None


def _watch_parent(parent: int) -> None:
    """Exit when the calling process is gone (killed): nobody would read our results, the
    pool's queues never tell an orphan to stop, and an orphan would keep the caller's stdout
    and stderr open (whoever waits for their end would wait forever).  A dead caller is seen
    by our parent pid changing (we are re-parented at once, while ``kill(pid, 0)`` still
    succeeds on a zombie that nobody has reaped)."""
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            os._exit(1)


def _start(job: _Job) -> None:
    global _STATE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the calling process's to handle
    # fresh stdio objects: a thread of the caller (a progress bar) may have held the old ones'
    # locks at the fork, and a warning written through them would then wait forever
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives as long as the worker
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    threading.Thread(target=_watch_parent, args=(job.parent,), daemon=True).start()
    _STATE = _Worker(job)


def _resolve(path: Path, offset: int, index: int) -> _Done:
    if _STATE is None:  # pragma: no cover - the initializer always ran
        raise ResolveError("resolve worker used before it was started")
    return _STATE.resolve(path, offset, index)


def _context() -> Any:
    """``fork`` where the system has it: a worker starts in milliseconds with torch imported,
    and nothing of the caller's ``__main__`` runs again (``forkserver`` and ``spawn`` re-run an
    unguarded script, and import torch once more).  Forking after torch has run its thread
    pools is safe here because a worker sets torch to one thread before any torch call, so it
    never enters the OpenMP or MKL pools it inherited; CUDA never runs in workers."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")  # pragma: no cover - not Linux


def write_shards(
    plan: Plan,
    store: Any,
    work: Path,
    shards: dict[str, list[TensorSpec]],
    metadata: dict[str, str],
    *,
    model: registry.ModelValues | None,
    compute_dtype: str,
    device: str,
    workers: int,
    side: SideFile | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write every shard of ``shards`` (file name -> its tensors in order) into ``work`` with
    ``workers`` processes; the same bytes as the serial loop of ``engine.compute``."""
    from .writer import create_shard, shard_offsets

    index_of = {spec.name: i for i, spec in enumerate(plan.specs)}
    items: list[tuple[Path, int, int]] = []
    for fname, specs in shards.items():
        path = (work / fname).resolve()
        create_shard(path, specs, metadata)
        for spec, offset in zip(specs, shard_offsets(specs, metadata), strict=True):
            items.append((path, offset, index_of[spec.name]))
    # largest first: long tensors start early and the small ones fill the end (the order
    # changes only the schedule, never a byte)
    items.sort(key=lambda it: (-plan.specs[it[2]].nbytes, it[2]))
    job = _Job(
        repo_root=Path(store.root).resolve(),
        rev=store.rev,
        strategy=plan.strategy.name,
        plan={f.name: getattr(plan, f.name) for f in fields(plan) if f.name != "strategy"},
        model=model,
        compute_dtype=compute_dtype,
        device=device,
        parent=os.getpid(),
        side=None if side is None else side.path,
    )
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=_context(), initializer=_start, initargs=(job,)
    )
    try:
        futures = [executor.submit(_resolve, *item) for item in items]
        for future in as_completed(futures):
            done = future.result()  # a worker's error is raised here, as it was raised
            if side is not None and done.side is not None:
                side.adopt(done.side, done.side_entries)
            if progress is not None:
                progress(done.nbytes)
    except BrokenProcessPool:
        raise ResolveError(
            "a resolve worker process died (killed, or out of memory); nothing was published"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    for fname in shards:  # the workers' writes are in the page cache of these files
        fd = os.open(work / fname, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
