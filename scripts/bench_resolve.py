"""Benchmark: resolve of a 100M-parameter model (24 x 2048x2048 fp32) with a base and K = 4
contributions, against an IO floor measured in the same run.

    .venv/bin/python scripts/bench_resolve.py [--strategies linear ties dare_ties] [--layers 24]

- floor: a process that reads every input tensor once from the object store and writes the
  output size once (fsync'd, like resolve), started the same way as resolve;
- each strategy: `git crdt resolve` as a whole process (cache cleared), wall time and peak
  RSS (from wait4's rusage);
- checkout onto a cached set: `git checkout` between two branches whose merged models are
  cached, hooks included.

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

FLOOR_SCRIPT = r"""
import os, sys
from pathlib import Path
from git_crdt_merge.repo import Repo
from git_crdt_merge.store import ObjectStore
from git_crdt_merge.contributions import load_descriptor
repo = Repo.open(".")
m = repo.read_manifest()
store = ObjectStore(repo.root)
ids = [cid for cid, _ in m.visible_contributions()] + [m.base()]
descs = [load_descriptor(store, cid) for cid in ids]
with open(Path(sys.argv[1]), "wb") as fh:
    for name in sorted(descs[0]["tensors"]):
        for d in descs:  # the same reader resolve uses: chunks straight into a fresh buffer
            info = d["tensors"][name]
            buf = bytearray(info["bytes"])
            store.read_into(info["chunks"], memoryview(buf))
        fh.write(buf)
    fh.flush()
    os.fsync(fh.fileno())
"""


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    return wall, usage.ru_maxrss * 1024


def sh(cwd: Path, env: dict[str, str], *args: str) -> None:
    subprocess.run(args, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def build(repo: Path, env: dict[str, str], layers: int, k: int, dim: int) -> None:
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
        tensors = {
            n: v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32)
            for n, v in base.items()
        }
        save_file(tensors, str(models / f"c{j}.safetensors"))
        sh(repo, env, "git", "crdt", "add-contribution", str(models / f"c{j}.safetensors"), "-q")
        (models / f"c{j}.safetensors").unlink()
    sh(repo, env, "git", "commit", "-q", "-m", "models")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", nargs="*", default=["linear", "ties", "dare_ties"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for key, val in (
        ("GIT_AUTHOR_NAME", "bench"),
        ("GIT_AUTHOR_EMAIL", "bench@example"),
        ("GIT_COMMITTER_NAME", "bench"),
        ("GIT_COMMITTER_EMAIL", "bench@example"),
    ):
        env.setdefault(key, val)
    if args.build_only is not None:
        build(args.build_only, env, args.layers, args.k, args.dim)
        return
    largest = args.dim * args.dim * 4
    with tempfile.TemporaryDirectory(prefix="bench-resolve-", dir=os.environ.get("BENCH_DIR")) as d:
        repo = Path(d) / "repo"
        repo.mkdir()
        # Built in a child process: this process stays small, so the peak RSS that wait4
        # reports for each measured child (which starts from its parent's) is the child's own.
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
            ],
            env=env,
            check=True,
        )
        cache = repo / ".git" / "crdt" / "cache"
        floor, floor_rss = run_measured(
            [sys.executable, "-c", FLOOR_SCRIPT, str(Path(d) / "floor.out")], repo, env
        )
        print(
            json.dumps(
                {
                    "bench": "resolve-floor",
                    "seconds": round(floor, 3),
                    "peak_rss_mb": round(floor_rss / 1e6),
                }
            ),
            flush=True,
        )
        rss_budget = (args.k + 2) * largest + 300e6
        for name in args.strategies:
            params = (
                []
                if name in ("linear", "task_arithmetic", "model_stock")
                else ["--param", f"density={args.density}"]
            )
            sh(repo, env, "git", "crdt", "strategy", name, *params)
            shutil.rmtree(cache, ignore_errors=True)
            wall, rss = run_measured(["git-crdt", "resolve", "-q"], repo, env)
            target = 1.5 if name in ("linear", "weight_average") else 4.0
            print(
                json.dumps(
                    {
                        "bench": "resolve",
                        "strategy": name,
                        "seconds": round(wall, 3),
                        "ratio_to_floor": round(wall / floor, 2),
                        "target_ratio": target,
                        "peak_rss_mb": round(rss / 1e6),
                        "rss_budget_mb": round(rss_budget / 1e6),
                        "params": args.k,
                        "layers": args.layers,
                        "dim": args.dim,
                    }
                ),
                flush=True,
            )
        # checkout onto a cached set: two branches, both resolved once, then switch
        sh(repo, env, "git", "config", "crdt.autoResolve", "true")
        sh(repo, env, "git", "crdt", "strategy", "linear")
        sh(repo, env, "git", "commit", "-q", "-m", "linear")
        sh(repo, env, "git", "crdt", "resolve", "-q")
        sh(repo, env, "git", "checkout", "-q", "-b", "other")
        sh(repo, env, "git", "crdt", "strategy", "task_arithmetic")
        sh(repo, env, "git", "commit", "-q", "-m", "task arithmetic")
        sh(repo, env, "git", "crdt", "resolve", "-q")
        times = []
        for i in range(6):
            branch = "main" if i % 2 == 0 else "other"
            wall, _ = run_measured(["git", "checkout", "-q", branch], repo, env)
            times.append(wall)
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
