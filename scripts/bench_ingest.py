"""Benchmark: `git crdt add-contribution` of a 1 GiB safetensors model against `cp` of the
same file, measured in the same run (target: ingest <= 2x cp).

    .venv/bin/python scripts/bench_ingest.py [--gib 1.0] [--repeat 3]

Both are whole processes started the same way, on a file already in the page cache, run
alternately; ``ratio`` compares the best of ``--repeat`` runs of each, ``median_ratio`` the
medians (cp's time swings 2-4x here with the page cache's writeback state).  Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def make_model(path: Path, gib: float) -> int:
    """32 equal fp32 matrices of random values (incompressible, like real weights)."""
    total = int(gib * 2**30)
    n_tensors = 32
    cols = 4096
    rows = max(1, total // (n_tensors * cols * 4))
    rng = np.random.default_rng(0)
    tensors = {
        f"model.layers.{i}.weight": rng.standard_normal((rows, cols), dtype=np.float32)
        for i in range(n_tensors)
    }
    save_file(tensors, str(path))
    return path.stat().st_size


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    # Flush the previous run's dirty pages first (untimed), so that neither contender pays
    # for the other's writeback.
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GIT_AUTHOR_NAME", "bench")
    env.setdefault("GIT_AUTHOR_EMAIL", "bench@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "bench")
    env.setdefault("GIT_COMMITTER_EMAIL", "bench@example.com")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        model = tmp / "model.safetensors"
        size = make_model(model, args.gib)
        model.read_bytes()  # warm the page cache for both contenders
        cp_times, ingest_times = [], []
        for i in range(args.repeat):
            cp_times.append(timed(["cp", str(model), str(tmp / f"copy{i}")], tmp, env))
            (tmp / f"copy{i}").unlink()
            repo = tmp / f"repo{i}"
            repo.mkdir()
            subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
            subprocess.run(["git", "crdt", "init", "-q"], cwd=repo, env=env, check=True)
            ingest_times.append(
                timed(["git", "crdt", "add-contribution", str(model), "-q"], repo, env)
            )
            shutil.rmtree(repo)
        cp_best, ingest_best = min(cp_times), min(ingest_times)
        print(
            json.dumps(
                {
                    "bench": "ingest",
                    "bytes": size,
                    "cp_s": round(cp_best, 3),
                    "ingest_s": round(ingest_best, 3),
                    "ratio": round(ingest_best / cp_best, 2),
                    "median_ratio": round(
                        statistics.median(ingest_times) / statistics.median(cp_times), 2
                    ),
                    "cp_MBps": round(size / cp_best / 1e6),
                    "ingest_MBps": round(size / ingest_best / 1e6),
                    "target_ratio": 2.0,
                    "all_cp_s": [round(t, 3) for t in cp_times],
                    "all_ingest_s": [round(t, 3) for t in ingest_times],
                }
            )
        )


if __name__ == "__main__":
    main()
