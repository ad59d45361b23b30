"""Benchmark: every registered strategy's resolve time on the 100M-parameter model.

    .venv/bin/python scripts/bench_catalogue.py [--layers 24] [--only NAME ...] [--workers 1 2]
        [--spectrum gaussian|decaying]

The model is the one of ``bench_resolve.py`` (24 x 2048x2048 fp32, a base and K = 4
contributions, each with Fisher diagonals and Gram matrices so that fisher_merge and
regression_mean have their extra inputs).  Strategies that take exactly one or two contributions
run on branches where the others were removed (``git crdt remove-contribution``), so they merge
K = 1 or 2.  Each strategy is resolved once, in a fresh process (``resolve()`` after torch is
imported, the cache cleared), and timed against the IO floor measured in the same run: one JSON
line per strategy with seconds and the ratio to the floor.  Parameters: density 0.5 where a
strategy has one, t = 0.5 where t is required, defaults otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_resolve  # noqa: E402  (the same model and IO floor)
import benchenv  # noqa: E402

# argv: strategy name, then optionally the device, an output folder whose files are hashed ("-":
# none) and the number of worker processes ("-": resolve's own choice).
WORKER = r"""
import hashlib, json, os, resource, shutil, sys, threading, time
from pathlib import Path
from git_crdt_merge.replicated import contributions
from git_crdt_merge.resolution import resolve
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.strategies import REQUIRED, get_strategy


repo = Repo.open(".")
name = sys.argv[1]
device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
output = Path(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
workers = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
strategy = get_strategy(name)
params = {}
for p in strategy.params:
    if p.name == "density":
        params["density"] = 0.5
    elif p.default is REQUIRED and p.name == "t":
        params["t"] = 0.5
contributions.set_register(repo, "strategy", {"name": name, "params": params})
shutil.rmtree(repo.state_dir / "cache", ignore_errors=True)


def hwm():
    # VmHWM, not getrusage: Linux keeps ru_maxrss across exec, so a process started by a big
    # one reports its parent's peak
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def pss(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree():
    pids = [os.getpid()]
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return sum(pss(p) for p in pids)


peak = [0]
running = [True]


def sample():
    while running[0]:
        peak[0] = max(peak[0], tree())
        time.sleep(0.05)


sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t0 = time.perf_counter()
resolve.resolve(repo, device=device, output=output, workers=workers)
seconds = time.perf_counter() - t0
running[0] = False
sampler.join()
row = {
    "seconds": seconds,
    "params": params,
    "peak_rss_mb": hwm(),
    "tree_peak_pss_mb": peak[0] // (1 << 20),
    # CPU seconds of the process and its reaped children (the workers): the machine's load
    # changes the wall time, much less the work
    "cpu_s": sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF),
                  resource.getrusage(resource.RUSAGE_CHILDREN))
    ),
}
if output is not None:
    h = hashlib.sha256()
    for f in sorted(output.glob("*.safetensors")):
        h.update(f.read_bytes())
    row["sha256"] = h.hexdigest()[:16]
print(json.dumps(row))
"""


bench_env = bench_resolve.bench_env


def build_catalogue_repo(
    d: Path, env: dict[str, str], layers: int, dim: int, spectrum: str = "gaussian"
) -> Path:
    """The catalogue's repository under ``d``: base + 4 contributions with extra inputs on
    ``main``, and branches ``k2`` / ``k1`` that keep 2 and 1 of them."""
    repo = d / "repo"
    repo.mkdir(parents=True)
    bench_resolve.build(repo, env, layers, 4, dim, extras=True, spectrum=spectrum)
    listed = json.loads(bench_resolve.sh(repo, env, "git", "crdt", "list", "--json"))
    ids = [row["id"] for row in listed]
    for branch, keep in (("k2", 2), ("k1", 1)):
        bench_resolve.sh(repo, env, "git", "checkout", "-q", "-b", branch, "main")
        for cid in ids[keep:]:
            bench_resolve.sh(repo, env, "git", "crdt", "remove-contribution", cid)
        bench_resolve.sh(repo, env, "git", "commit", "-q", "-m", f"keep {keep}")
    bench_resolve.sh(repo, env, "git", "checkout", "-q", "main")
    return repo


def branch_for(name: str) -> tuple[str, int]:
    """The branch a strategy runs on and its number of contributions (at most 4)."""
    from git_crdt_merge.strategies import get_strategy

    st = get_strategy(name)
    k = 4 if st.max_inputs is None else min(4, st.max_inputs)
    return {4: "main", 3: "main", 2: "k2", 1: "k1"}[k], k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--only", nargs="*", help="strategy names (default: all registered)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per strategy")
    ap.add_argument(
        "--spectrum",
        choices=("gaussian", "decaying"),
        default="gaussian",
        help="the contributions' updates: Gaussian noise (a flat spectrum, the benchmark's "
        "default) or singular values decaying as 1/j (as fine-tuning updates' do)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        nargs="*",
        help="resolve each strategy once per number of worker processes (e.g. 1 2: adds the "
        "speed-up of each against the first, same run); default: resolve's own choice",
    )
    args = ap.parse_args()
    benchenv.compile_package()
    from git_crdt_merge.strategies import all_strategies

    names = args.only or [s.name for s in all_strategies()]
    env = bench_env()
    with tempfile.TemporaryDirectory(
        prefix="bench-catalogue-", dir=os.environ.get("BENCH_DIR")
    ) as d:
        repo = build_catalogue_repo(Path(d), env, args.layers, args.dim, args.spectrum)
        floor_worker = bench_resolve.WORKER
        timing = json.loads(
            bench_resolve.sh(repo, env, sys.executable, "-c", floor_worker, f"{d}/floor.out", "0.5")
        )
        floor = timing["floor"]
        print(
            json.dumps(
                {"bench": "catalogue-floor", "seconds": round(floor, 3), "spectrum": args.spectrum}
            ),
            flush=True,
        )
        for name in names:
            branch, k = branch_for(name)
            seconds: dict[int, float] = {}
            for workers in args.workers or [None]:
                # a fresh checkout drops the register
                bench_resolve.sh(repo, env, "git", "checkout", "-q", "-f", branch)
                row: dict[str, object] = {"bench": "catalogue", "strategy": name, "k": k}
                if workers is not None:
                    row["workers"] = workers
                row.update(_run_one(repo, env, name, workers, floor, args.timeout))
                print(json.dumps(row), flush=True)
                if workers is not None and "seconds" in row:
                    seconds[workers] = float(row["seconds"])  # type: ignore[arg-type]
            if len(seconds) > 1:
                first = seconds[min(seconds)]
                speedup = {str(w): round(first / s, 2) for w, s in sorted(seconds.items())}
                summary = {"bench": "catalogue-workers", "strategy": name, "speedup": speedup}
                print(json.dumps(summary), flush=True)


def _run_one(
    repo: Path, env: dict[str, str], name: str, workers: int | None, floor: float, timeout: float
) -> dict[str, object]:
    """Resolve strategy ``name`` once in a fresh process: seconds, ratio to the floor, memory
    (the resolving process's peak RSS, and the peak PSS of it and its workers together,
    sampled every 50 ms: shared pages counted once), CPU seconds."""
    row: dict[str, object] = {}
    how = "-" if workers is None else str(workers)
    argv = [sys.executable, "-c", WORKER, name, "cpu", "-", how]
    try:
        proc = subprocess.run(
            argv, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode == 0:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            row["seconds"] = round(result["seconds"], 3)
            row["ratio_to_floor"] = round(result["seconds"] / floor, 2)
            row["params"] = result["params"]
            for key in ("peak_rss_mb", "tree_peak_pss_mb"):
                row[key] = result[key]
            row["cpu_s"] = round(result["cpu_s"], 2)
        else:
            row["error"] = proc.stderr.strip().splitlines()[-1][:200]
    except subprocess.TimeoutExpired:
        row["error"] = f"over {timeout:.0f} s"
    return row


if __name__ == "__main__":
    main()
