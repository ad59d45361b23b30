"""Linear algebra in float64 on one thread with MKL's AVX2 branch; side-by-side runs.

Part of :mod:`git_crdt_merge.numerics`; see its docstring for the rules."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from ..errors import CpuError

MKL_BRANCH = "AVX2"
"""MKL's conditional-numerical-reproducibility branch, set by ``git_crdt_merge/__init__.py``
(``MKL_CBWR``) before torch's first MKL call: the same bits on every CPU with AVX2."""


@functools.cache
def _read_cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or None where they cannot be read
    (other systems).  A Linux CPU that is not x86 has no ``flags`` line: an empty set."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read(1 << 20)
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return frozenset(flags)


def _cpu_flags() -> frozenset[str] | None:
    """The seam the tests replace: :func:`_read_cpu_flags`, read once per process."""
    return _read_cpu_flags()


def _require_avx2() -> None:
    """Refuse, rather than give other bits, on a CPU that cannot run MKL's AVX2 branch (MKL
    would fall back to another code path there).  Where the flags cannot be read, run."""
    flags = _cpu_flags()
    if flags is not None and "avx2" not in flags:
        raise CpuError(
            "its float64 linear algebra (products, SVD, eigh, solve) needs an x86-64 CPU with "
            "AVX2 to give the same bytes on every machine, and /proc/cpuinfo lists no avx2 "
            "here: resolve on such a CPU, or choose a strategy without linear algebra"
        )


@contextmanager
def linalg_threads() -> Iterator[None]:
    """Run the enclosed LAPACK/BLAS calls on one thread (their results depend on the split),
    on a CPU with AVX2 under MKL's AVX2 branch (:class:`CpuError` otherwise)."""
    if os.environ.get("MKL_CBWR") != MKL_BRANCH:  # pragma: no cover - set by the package
        raise RuntimeError(f"MKL_CBWR must be {MKL_BRANCH} before torch's first MKL call")
    _require_avx2()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_device(device: torch.device | str) -> AbstractContextManager[Any]:
    """Make tensor factories (``zeros``, ``empty``, ``tensor`` ...) allocate on ``device``:
    ``with torch.device(device)``, except where that is the CPU already, because the device
    context intercepts every torch call in Python (measured: about a fifth of the time of
    SLERP's blocked reductions)."""
    target = torch.device(device)
    if target.type == "cpu" and torch.get_default_device().type == "cpu":
        return nullcontext()
    return torch.device(target)


def run_side_by_side(task: Callable[[int], None], items: Iterable[int]) -> None:
    """``task(i)`` for every item, on as many Python threads as torch has intra-op threads,
    each running torch on one thread (element-wise torch ops release the GIL, and the many small
    blocked ops of the exact reductions scale better across tasks than within one).

    Only for tasks that are independent of one another: results must not depend on the
    schedule, and they do not when every task writes only its own tensors."""
    workers = torch.get_num_threads()
    todo = list(items)
    if workers <= 1 or len(todo) <= 1:
        for item in todo:
            task(item)
        return
    pool = _side_pool(workers)
    device = torch.get_default_device()  # a `with torch.device(...)` is per thread: pass it on

    def run(item: int) -> None:
        with on_device(device):
            task(item)

    torch.set_num_threads(1)
    try:
        for future in [pool.submit(run, item) for item in todo]:
            future.result()
    finally:
        torch.set_num_threads(workers)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _side_pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per width: threads (and their allocator state) are reused tensor
    after tensor instead of being created twice per tensor."""
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="crdt-side")
    return pool


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float64 (reproducible; float32 inputs give exact products)."""
    with linalg_threads():
        return torch.matmul(_f64(a), _f64(b))


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``x = U diag(S) Vh`` of a 2-D tensor in float64, singular values descending.

    Signs are fixed so that the largest-magnitude entry of each column of U is positive (lowest
    index on ties), making the factors a function of ``x`` rather than of LAPACK's choice."""
    if x.dim() != 2:
        raise ValueError(f"svd needs a 2-D tensor, got shape {tuple(x.shape)}")
    with linalg_threads():
        u, s, vh = torch.linalg.svd(_f64(x), full_matrices=False)
    if u.numel():
        pivot = u.abs().argmax(dim=0)
        flip = u.gather(0, pivot.unsqueeze(0)).squeeze(0) < 0
        sign = torch.where(flip, -1.0, 1.0).to(torch.float64)
        u = u * sign
        vh = vh * sign.unsqueeze(1)
    return u, s, vh


def eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix, in float64,
    with each eigenvector's largest-magnitude entry made positive."""
    with linalg_threads():
        values, vectors = torch.linalg.eigh(_f64(x))
    if vectors.numel():
        pivot = vectors.abs().argmax(dim=0)
        flip = vectors.gather(0, pivot.unsqueeze(0)).squeeze(0) < 0
        vectors = vectors * torch.where(flip, -1.0, 1.0).to(torch.float64)
    return values, vectors


def matmul_symmetric(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float64 for a product that is symmetric by construction (``W G W^T``,
    ``C A^-1 C^T``): the row blocks of the result are multiplied only up to the diagonal (8
    blocks: 36/64 of the multiply-adds of :func:`matmul`) and the upper triangle is the mirror
    of the lower one, so the result is exactly symmetric.  Block edges are multiples of 8 rows
    (64-byte aligned row blocks, as MKL's reproducibility conditions ask)."""
    a64, b64 = _f64(a), _f64(b)
    rows = a64.shape[0]
    if a64.dim() != 2 or b64.dim() != 2 or b64.shape[1] != rows:
        raise ValueError(
            f"matmul_symmetric needs (n, k) @ (k, n), got {tuple(a.shape)} @ {tuple(b.shape)}"
        )
    blocks = max(1, min(8, rows // 64))
    edges = [0] + [rows * i // blocks // 8 * 8 for i in range(1, blocks)] + [rows]
    out = a64.new_empty((rows, rows))
    with linalg_threads():
        for start, stop in zip(edges, edges[1:], strict=False):
            if stop > start:
                torch.matmul(a64[start:stop], b64[:, :stop], out=out[start:stop, :stop])
    below = torch.ones((rows, rows), dtype=torch.bool, device=out.device).tril()
    return torch.where(below, out, out.T)  # the upper triangle was never written


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` for a symmetric positive-definite ``a`` (only its lower triangle is read), in
    float64, by Cholesky: ``a = L L^T``, then two triangular solves (LAPACK potrf + potrs,
    about 7/8 of the LU solve's work for a square ``b``).  Where ``a`` is not numerically
    positive definite (a singular Gram matrix), it is the LU solve of :func:`solve` on ``a``
    mirrored from its lower triangle; which one runs depends only on the values."""
    with linalg_threads():
        a64 = _f64(a)
        factor, info = torch.linalg.cholesky_ex(a64)
        if int(info) == 0:
            return torch.cholesky_solve(_f64(b), factor)
        lower = a64.tril()
        return torch.linalg.solve(lower + lower.tril(-1).T, _f64(b))


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` for a square, non-singular ``a``, in float64."""
    with linalg_threads():
        return torch.linalg.solve(_f64(a), _f64(b))
