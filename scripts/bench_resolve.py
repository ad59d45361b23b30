"""Benchmark: resolve of a 100M-parameter model (24 x 2048x2048 fp32) with a base and K = 4
contributions, against an IO floor measured in the same run.

    .venv/bin/python scripts/bench_resolve.py [--strategies linear ties dare_ties] [--layers 24]

- floor: reading every input tensor once from the object store (the reader resolve uses) and
  writing the output's bytes once (fsync'd, as resolve does), in a process that has already
  imported torch and git_crdt_merge; the best of five, three before the strategies and two
  after;
- each strategy: `resolve()` in that same process with the cache cleared, the best of three
  (the first run of a process also pays for its buffers' first page faults), so the ratio compares
  the work of resolving with the IO it cannot avoid; the wall time of a whole
  `git crdt resolve` process (which adds about 1.3 s of `import torch`) is printed beside it;
- peak RSS: VmHWM of a fresh `git crdt resolve` process per strategy;
- checkout onto a cached set: `git checkout` between two branches whose merged models are
  cached, hooks included.

Strategies with extra inputs (fisher_merge, regression_mean) make the build store a Fisher
diagonal and a Gram matrix per tensor with each contribution (about three times the ingest).

Targets (issue 3): linear <= 1.5x floor, ties and dare <= 4x floor, peak RSS <=
(K+2) x largest tensor + 300 MB, checkout onto a cached set <= 0.3 s.  Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchenv

WORKER = r"""
import json, os, shutil, sys, time
from pathlib import Path
import torch
from git_crdt_merge.replicated import contributions
from git_crdt_merge.resolution import engine, resolve
from git_crdt_merge.strategies import get_strategy
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.replicated.reader import read_descriptor
from git_crdt_merge.replicated.store import ObjectStore

repo = Repo.open(".")
density = float(sys.argv[2])

def floor(out):
    m = repo.read_manifest()
    store = ObjectStore(repo.root)
    descs = [read_descriptor(store, m, cid)
             for cid in [c for c, _ in m.visible_contributions()] + [m.base()]]
    specs = sorted(descs[0].tensors)
    slots = engine.InputSlots(len(descs), max(d.tensors[n].nbytes
                                              for d in descs for n in specs))
    t0 = time.perf_counter()
    with open(out, "wb") as fh:
        for name in specs:
            for i, d in enumerate(descs):
                t = slots.load(i, store, d.tensors[name])
            fh.write(t.view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - t0

results = {"floor": min(floor(sys.argv[1]) for _ in range(3))}
from git_crdt_merge.strategies import get_strategy

for name in sys.argv[3:]:
    declared = {p.name for p in get_strategy(name).params}
    params = {"density": density} if "density" in declared else {}
    contributions.set_register(repo, "strategy", {"name": name, "params": params})
    times = []
    for _ in range(3):
        shutil.rmtree(repo.state_dir / "cache", ignore_errors=True)
        t0 = time.perf_counter()
        resolve.resolve(repo)
        times.append(time.perf_counter() - t0)
    results[name] = min(times)
# the floor again after the strategies: the machine's noise then bounds both the same way
results["floor"] = min([results["floor"]] + [floor(sys.argv[1]) for _ in range(2)])
print(json.dumps(results))
"""

RSS_WORKER = r"""
import re, sys
from git_crdt_merge.entry import main
sys.argv = ["git-crdt", "resolve", "-q"]
try:
    main()
except SystemExit:
    pass
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024)
"""


def bench_env() -> dict[str, str]:
    """The environment the benchmark's git and worker processes run in."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for key, val in (
        ("GIT_AUTHOR_NAME", "bench"),
        ("GIT_AUTHOR_EMAIL", "bench@example"),
        ("GIT_COMMITTER_NAME", "bench"),
        ("GIT_COMMITTER_EMAIL", "bench@example"),
    ):
        env.setdefault(key, val)
    return env


def sh(cwd: Path, env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        args, cwd=cwd, env=env, check=True, stdout=subprocess.PIPE, text=True
    ).stdout


def needs_extras(names: list[str]) -> bool:
    """Whether a strategy to time reads extra inputs (Fisher diagonals, Gram matrices)."""
    from git_crdt_merge.strategies import get_strategy

    return any(get_strategy(n).extra_inputs for n in names)


def extra_files(models: Path, j: int, base: dict, rng: object) -> list[str]:
    """A Fisher diagonal (|N(0,1)|) per tensor and a full-rank Gram matrix per weight
    (X^T X of 64 random rows plus the identity, symmetrised in float64)."""
    import numpy as np
    from safetensors.numpy import save_file

    gen: np.random.Generator = rng  # type: ignore[assignment]
    fisher = {n: np.abs(gen.standard_normal(v.shape, dtype=np.float32)) for n, v in base.items()}
    save_file(fisher, str(models / f"f{j}.safetensors"))
    gram = {}
    for n, v in base.items():
        x = gen.standard_normal((64, v.shape[1]))
        g = x.T @ x + np.eye(v.shape[1])
        gram[n] = ((g + g.T) / 2).astype(np.float32)
    save_file(gram, str(models / f"g{j}.safetensors"))
    return [
        "--fisher",
        str(models / f"f{j}.safetensors"),
        "--gram",
        str(models / f"g{j}.safetensors"),
    ]


def decaying_update(rng: object, shape: tuple[int, int], scale: float) -> object:
    """A task vector with singular values s_j proportional to 1/j (a spectrum that decays, as
    fine-tuning updates' do, where Gaussian noise's is flat) and random singular vectors, with
    the Frobenius norm of ``scale`` times Gaussian noise of the same shape."""
    import numpy as np

    gen: np.random.Generator = rng  # type: ignore[assignment]
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(gen.standard_normal((m, r), dtype=np.float32))
    v, _ = np.linalg.qr(gen.standard_normal((n, r), dtype=np.float32))
    s = 1.0 / np.arange(1, r + 1, dtype=np.float64)
    s *= scale * np.sqrt(m * n) / np.sqrt(np.sum(s * s))
    return ((u * s.astype(np.float32)) @ v.T).astype(np.float32)


def build(
    repo: Path,
    env: dict[str, str],
    layers: int,
    k: int,
    dim: int,
    extras: bool = False,
    spectrum: str = "gaussian",
) -> None:
    """A base of ``layers`` dim x dim fp32 matrices and ``k`` contributions base + 0.01 x
    Gaussian noise (``spectrum`` "gaussian": a flat spectrum) or base + an update of the same
    norm whose singular values decay as 1/j (``spectrum`` "decaying")."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    models = repo.parent / "models"
    models.mkdir()
    base = {
        f"layers.{i}.weight": rng.standard_normal((dim, dim), dtype=np.float32)
        for i in range(layers)
    }
    save_file(base, str(models / "base.safetensors"))
    sh(repo, env, "git", "init", "-q", "-b", "main")
    sh(repo, env, "git", "crdt", "init", "-q")
    sh(repo, env, "git", "config", "crdt.autoResolve", "false")
    sh(repo, env, "git", "crdt", "set-base", str(models / "base.safetensors"), "-q")
    for j in range(k):
        if spectrum == "decaying":
            tensors = {n: v + decaying_update(rng, v.shape, 0.01) for n, v in base.items()}
        else:
            tensors = {
                n: v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32)
                for n, v in base.items()
            }
        save_file(tensors, str(models / f"c{j}.safetensors"))
        more = extra_files(models, j, base, rng) if extras else []
        sh(
            repo,
            env,
            "git",
            "crdt",
            "add-contribution",
            str(models / f"c{j}.safetensors"),
            "-q",
            *more,
        )
        for f in models.glob("[cfg][0-9]*.safetensors"):
            f.unlink()
    sh(repo, env, "git", "commit", "-q", "-m", "models")


def set_strategy(repo: Path, env: dict[str, str], name: str, density: float) -> None:
    from git_crdt_merge.strategies import get_strategy  # torch: only when the bench runs

    declared = {p.name for p in get_strategy(name).params}
    params = ["--param", f"density={density}"] if "density" in declared else []
    subprocess.run(
        ["git", "crdt", "strategy", name, *params],
        cwd=repo,
        env=env,
        check=True,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", nargs="*", default=["linear", "ties", "dare_ties"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    benchenv.compile_package()
    env = bench_env()
    if args.build_only is not None:
        build(args.build_only, env, args.layers, args.k, args.dim, args.extras)
        return
    largest = args.dim * args.dim * 4
    with tempfile.TemporaryDirectory(prefix="bench-resolve-", dir=os.environ.get("BENCH_DIR")) as d:
        repo = Path(d) / "repo"
        repo.mkdir()
        # Built in a child process, so that this process stays small.
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--build-only",
                str(repo),
                "--layers",
                str(args.layers),
                "--k",
                str(args.k),
                "--dim",
                str(args.dim),
                *(["--extras"] if needs_extras(args.strategies) else []),
            ],
            env=env,
            check=True,
        )
        cache = repo / ".git" / "crdt" / "cache"
        timing = json.loads(
            sh(
                repo,
                env,
                sys.executable,
                "-c",
                WORKER,
                str(Path(d) / "floor.out"),
                str(args.density),
                *args.strategies,
            )
        )
        floor = timing["floor"]
        print(json.dumps({"bench": "resolve-floor", "seconds": round(floor, 3)}), flush=True)
        rss_budget = (args.k + 2) * largest + 300e6
        for name in args.strategies:
            set_strategy(repo, env, name, args.density)
            shutil.rmtree(cache, ignore_errors=True)
            t0 = time.perf_counter()
            sh(repo, env, "git-crdt", "resolve", "-q")
            process_s = time.perf_counter() - t0
            shutil.rmtree(cache, ignore_errors=True)
            rss = int(sh(repo, env, sys.executable, "-c", RSS_WORKER).strip().splitlines()[-1])
            target = 1.5 if name in ("linear", "weight_average") else 4.0
            print(
                json.dumps(
                    {
                        "bench": "resolve",
                        "strategy": name,
                        "seconds": round(timing[name], 3),
                        "ratio_to_floor": round(timing[name] / floor, 2),
                        "target_ratio": target,
                        "whole_process_s": round(process_s, 3),
                        "peak_rss_mb": round(rss / 1e6),
                        "rss_budget_mb": round(rss_budget / 1e6),
                        "k": args.k,
                        "layers": args.layers,
                        "dim": args.dim,
                    }
                ),
                flush=True,
            )
        # checkout onto a cached set: two branches, both resolved once, then switch
        sh(repo, env, "git", "config", "crdt.autoResolve", "true")
        set_strategy(repo, env, "linear", args.density)
        sh(repo, env, "git", "commit", "-q", "-m", "linear")
        sh(repo, env, "git", "crdt", "resolve", "-q")
        sh(repo, env, "git", "checkout", "-q", "-b", "other")
        set_strategy(repo, env, "task_arithmetic", args.density)
        sh(repo, env, "git", "commit", "-q", "-m", "task arithmetic")
        sh(repo, env, "git", "crdt", "resolve", "-q")
        times = []
        for i in range(6):
            t0 = time.perf_counter()
            sh(repo, env, "git", "checkout", "-q", "main" if i % 2 == 0 else "other")
            times.append(time.perf_counter() - t0)
        times.sort()
        print(
            json.dumps(
                {
                    "bench": "checkout-cached",
                    "median_s": round(times[len(times) // 2], 3),
                    "max_s": round(times[-1], 3),
                    "target_s": 0.3,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
