"""Device check: `git crdt resolve --device cuda` on a small model, for several strategies.

    python scripts/device_check.py [--strategies linear ties ...]

For each strategy: resolve twice on CUDA (cache cleared between) and once on the CPU; print one
JSON line with the sha256 of each output and whether the two CUDA runs agree.  CUDA results are
not promised to equal the CPU's (they are cached under their own key); two CUDA runs of the same
set on the same GPU are expected to agree.  Needs a CUDA build of torch and a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PARAMS = {"slerp": ["t=0.3"], "nearswap": ["t=0.01"], "ties": ["density=0.5"]}


def sh(cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--strategies",
        nargs="*",
        default=["linear", "task_arithmetic", "ties", "dare_ties", "della", "model_stock"],
    )
    args = ap.parse_args()
    import numpy as np
    from safetensors.numpy import save_file

    env_keys = {
        "GIT_AUTHOR_NAME": "dev",
        "GIT_AUTHOR_EMAIL": "dev@example",
        "GIT_COMMITTER_NAME": "dev",
        "GIT_COMMITTER_EMAIL": "dev@example",
    }
    for key, val in env_keys.items():
        os.environ.setdefault(key, val)
    with tempfile.TemporaryDirectory(prefix="device-check-") as d:
        repo = Path(d) / "repo"
        repo.mkdir()
        rng = np.random.default_rng(0)
        shapes = {"a.weight": (512, 512), "b.weight": (300, 77), "c.bias": (512,)}
        base = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
        save_file(base, f"{d}/base.safetensors")
        sh(repo, "git", "init", "-q", "-b", "main")
        sh(repo, "git", "crdt", "init", "-q")
        sh(repo, "git", "config", "crdt.autoResolve", "false")
        sh(repo, "git", "crdt", "set-base", f"{d}/base.safetensors", "-q")
        for j in range(3):
            noisy = {
                n: v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32)
                for n, v in base.items()
            }
            save_file(noisy, f"{d}/c{j}.safetensors")
            sh(repo, "git", "crdt", "add-contribution", f"{d}/c{j}.safetensors", "-q")
        sh(repo, "git", "commit", "-q", "-m", "models")
        cache = repo / ".git" / "crdt" / "cache"
        for name in args.strategies:
            params = [x for p in PARAMS.get(name, []) for x in ("--param", p)]
            sh(repo, "git", "crdt", "strategy", name, *params)
            row: dict[str, object] = {"strategy": name}
            for label, device in (("cuda_1", "cuda"), ("cuda_2", "cuda"), ("cpu", "cpu")):
                shutil.rmtree(cache, ignore_errors=True)
                out = Path(d) / f"{name}-{label}"
                try:
                    sh(repo, "git", "crdt", "resolve", "--device", device, "--output", str(out))
                    row[label] = digest(out / "model.safetensors")
                except RuntimeError as exc:
                    row[label] = f"error: {exc}"
            row["cuda_runs_agree"] = row["cuda_1"] == row["cuda_2"]
            row["cuda_equals_cpu"] = row["cuda_1"] == row["cpu"]
            print(json.dumps(row), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
