"""Benchmark: every registered strategy's resolve time on the 100M-parameter model.

    .venv/bin/python scripts/bench_catalogue.py [--layers 24] [--only NAME ...]

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

# argv: strategy name, then optionally the device and an output folder whose files are hashed.
WORKER = r"""
import hashlib, json, shutil, sys, time
from pathlib import Path
from git_crdt_merge.replicated import contributions
from git_crdt_merge.resolution import resolve
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.strategies import REQUIRED, get_strategy

repo = Repo.open(".")
name = sys.argv[1]
device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
output = Path(sys.argv[3]) if len(sys.argv) > 3 else None
strategy = get_strategy(name)
params = {}
for p in strategy.params:
    if p.name == "density":
        params["density"] = 0.5
    elif p.default is REQUIRED and p.name == "t":
        params["t"] = 0.5
contributions.set_register(repo, "strategy", {"name": name, "params": params})
shutil.rmtree(repo.state_dir / "cache", ignore_errors=True)
t0 = time.perf_counter()
resolve.resolve(repo, device=device, output=output)
seconds = time.perf_counter() - t0
row = {"seconds": seconds, "params": params}
if output is not None:
    h = hashlib.sha256()
    for f in sorted(output.glob("*.safetensors")):
        h.update(f.read_bytes())
    row["sha256"] = h.hexdigest()[:16]
print(json.dumps(row))
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


def build_catalogue_repo(d: Path, env: dict[str, str], layers: int, dim: int) -> Path:
    """The catalogue's repository under ``d``: base + 4 contributions with extra inputs on
    ``main``, and branches ``k2`` / ``k1`` that keep 2 and 1 of them."""
    repo = d / "repo"
    repo.mkdir(parents=True)
    bench_resolve.build(repo, env, layers, 4, dim, extras=True)
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
    args = ap.parse_args()
    from git_crdt_merge.strategies import all_strategies

    names = args.only or [s.name for s in all_strategies()]
    env = bench_env()
    with tempfile.TemporaryDirectory(
        prefix="bench-catalogue-", dir=os.environ.get("BENCH_DIR")
    ) as d:
        repo = build_catalogue_repo(Path(d), env, args.layers, args.dim)
        floor_worker = bench_resolve.WORKER
        timing = json.loads(
            bench_resolve.sh(repo, env, sys.executable, "-c", floor_worker, f"{d}/floor.out", "0.5")
        )
        floor = timing["floor"]
        print(json.dumps({"bench": "catalogue-floor", "seconds": round(floor, 3)}), flush=True)
        for name in names:
            branch, k = branch_for(name)
            bench_resolve.sh(repo, env, "git", "checkout", "-q", "-f", branch)  # drop the register
            row: dict[str, object] = {"bench": "catalogue", "strategy": name, "k": k}
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", WORKER, name],
                    cwd=repo,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
                if proc.returncode == 0:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    row["seconds"] = round(result["seconds"], 3)
                    row["ratio_to_floor"] = round(result["seconds"] / floor, 2)
                    row["params"] = result["params"]
                else:
                    row["error"] = proc.stderr.strip().splitlines()[-1][:200]
            except subprocess.TimeoutExpired:
                row["error"] = f"over {args.timeout:.0f} s"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
