"""Benchmark ``git crdt verify --full`` against reading the same objects with ``cat``.

Builds a throw-away repository with one contribution of SIZE_MB of float32 tensors, then times
(all with a warm page cache, medians of --repeat runs):

- ``cat`` of every loose object file of the contribution into /dev/null (the IO floor),
- the fast verify (no tensor bytes read),
- ``verify --full`` (every object read and blake3-hashed),
- blake3 of the same bytes already in memory (the floor for any full check),
- the NaN/Inf scan that ingest runs before storing (``checks.count_nonfinite``).

Usage: python scripts/bench_verify.py [--size-mb 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def sh(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args()
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    from safetensors.numpy import save_file

    from git_crdt_merge.git import commands as gitops
    from git_crdt_merge.query.verify import verify
    from git_crdt_merge.replicated import checks
    from git_crdt_merge.replicated.repo import Repo
    from git_crdt_merge.replicated.store import ObjectStore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = opts.size_mb * 1024 * 1024 // 4 // 8
        rng = np.random.default_rng(0)
        tensors = {f"t{i}": rng.standard_normal(n, dtype=np.float32) for i in range(8)}
        save_file(tensors, str(root / "m.safetensors"))
        repo = root / "repo"
        repo.mkdir()
        env_cfg = ["-c", "user.name=b", "-c", "user.email=b@b"]  # no global config needed
        sh(["git", "init", "-q"], repo)
        sh(["git-crdt", "init", "-q"], repo)
        sh(["git-crdt", "add-contribution", str(root / "m.safetensors"), "-q"], repo)
        sh(["git", *env_cfg, "commit", "-q", "--no-verify", "-m", "m"], repo)
        r = Repo.open(repo)
        store = ObjectStore(repo)
        files = [
            str(gitops.common_dir(repo) / "objects" / sha[:2] / sha[2:])
            for sha in store.known().values()
        ]
        total = sum(os.path.getsize(f) for f in files)

        def timed(fn: object) -> float:
            runs = []
            for _ in range(opts.repeat):
                t0 = time.perf_counter()
                fn()  # type: ignore[operator]
                runs.append(time.perf_counter() - t0)
            return statistics.median(runs)

        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        t_cat = timed(lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL))
        t_fast = timed(lambda: verify(r, "HEAD"))
        t_full = timed(lambda: verify(r, "HEAD", full=True))
        arrays = list(tensors.values())
        import blake3

        blob = b"".join(a.tobytes() for a in tensors.values())
        t_b3 = timed(lambda: blake3.blake3(blob, max_threads=blake3.blake3.AUTO).digest())
        t_scan = timed(lambda: [checks.count_nonfinite("F32", memoryview(a)) for a in arrays])
        mb = total / 1e6
        print(
            f"objects: {len(files)} files, {mb:.0f} MB (warm page cache, median of {opts.repeat})"
        )
        print(f"cat > /dev/null      {t_cat:7.3f} s  {mb / t_cat:7.0f} MB/s")
        print(f"verify (fast)        {t_fast:7.3f} s")
        ratio = t_cat / t_full
        print(f"verify --full        {t_full:7.3f} s  {mb / t_full:7.0f} MB/s  ({ratio:.2f}x cat)")
        print(f"blake3 alone (memory){t_b3:7.3f} s  {mb / t_b3:7.0f} MB/s  (the hashing floor)")
        print(f"NaN/Inf scan (F32)   {t_scan:7.3f} s  {mb / t_scan:7.0f} MB/s")


if __name__ == "__main__":
    main()
