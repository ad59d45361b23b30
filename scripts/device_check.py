"""Device check: every strategy on CUDA against the CPU's bytes, and the 100M benchmark timed.

    python scripts/device_check.py [--only NAME ...] [--layers 2 --dim 512] [--timing-layers 24]

Equality: the catalogue's repository (``bench_catalogue.py``: a base and 4 contributions with
Fisher diagonals and Gram matrices; strategies that take 1 or 2 contributions on branches that
keep that many) at a small size.  Each strategy is resolved in a fresh process on CUDA twice and
on the CPU once, the cache cleared before each; one JSON line per strategy with the sha256 of
the output shards, whether the CUDA runs agree with each other, and whether they equal the CPU.

Timing (``--timing-layers N``, 0 to skip): the 100M benchmark (N x 2048 x 2048 fp32) for
``--timing`` strategies, seconds on CUDA against the CPU in the same run.  Needs a CUDA build of
torch and a GPU; run it when the device tool lends one and record the result in
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_catalogue  # noqa: E402  (the same repository and worker)
import bench_resolve  # noqa: E402


def run_worker(
    repo: Path, env: dict[str, str], name: str, device: str, out: Path, timeout: float
) -> dict[str, object]:
    """One cold resolve of ``name`` on ``device`` into ``out``, in a fresh process."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", bench_catalogue.WORKER, name, device, str(out)],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_all(
    d: Path, env: dict[str, str], names: list[str], layers: int, dim: int, timeout: float
) -> list[dict[str, object]]:
    repo = bench_catalogue.build_catalogue_repo(d, env, layers, dim)
    rows = []
    for name in names:
        branch, k = bench_catalogue.branch_for(name)
        row: dict[str, object] = {"check": "equality", "strategy": name, "k": k}
        for label, device in (("cuda_1", "cuda"), ("cuda_2", "cuda"), ("cpu", "cpu")):
            bench_resolve.sh(repo, env, "git", "checkout", "-q", "-f", branch)
            result = run_worker(repo, env, name, device, d / f"{name}-{label}", timeout)
            if "error" in result:
                row[f"{label}_error"] = result["error"]
            else:
                row[label] = result["sha256"]
                row[f"{label}_s"] = round(float(result["seconds"]), 3)  # type: ignore[arg-type]
        hashes = [row.get(label) for label in ("cuda_1", "cuda_2", "cpu")]
        row["cuda_runs_agree"] = hashes[0] is not None and hashes[0] == hashes[1]
        row["cuda_equals_cpu"] = hashes[0] is not None and hashes[0] == hashes[2]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="strategy names (default: all registered)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--timing-layers", type=int, default=24)
    ap.add_argument("--timing", nargs="*", default=["linear", "ties", "dare_ties", "della"])
    ap.add_argument("--timeout", type=float, default=600, help="seconds per resolve")
    args = ap.parse_args()
    from git_crdt_merge.strategies import all_strategies

    names = args.only or [s.name for s in all_strategies()]
    env = bench_catalogue.bench_env()
    with tempfile.TemporaryDirectory(prefix="device-check-") as d:
        rows = check_all(Path(d) / "small", env, names, args.layers, args.dim, args.timeout)
        equal = sum(bool(r["cuda_equals_cpu"]) for r in rows)
        print(json.dumps({"check": "summary", "strategies": len(rows), "cuda_equals_cpu": equal}))
    if args.timing_layers > 0:
        with tempfile.TemporaryDirectory(prefix="device-timing-") as d:
            repo = bench_catalogue.build_catalogue_repo(Path(d), env, args.timing_layers, 2048)
            for name in args.timing:
                branch, k = bench_catalogue.branch_for(name)
                row: dict[str, object] = {"check": "timing", "strategy": name, "k": k}
                for device in ("cuda", "cpu"):
                    bench_resolve.sh(repo, env, "git", "checkout", "-q", "-f", branch)
                    result = run_worker(repo, env, name, device, Path(d) / name, args.timeout)
                    row[device] = result.get("seconds", result.get("error"))
                if isinstance(row["cuda"], float) and isinstance(row["cpu"], float):
                    row["speedup"] = round(row["cpu"] / row["cuda"], 2)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
