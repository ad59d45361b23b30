"""End-to-end run of git-crdt-merge in a temporary directory, with real git.

Three clones of one repository each add a fine-tuned variant of a shared base model, then
exchange work through pushes and pulls in different orders.  At the end every clone holds the
same contribution set, the same Merkle root, and byte-identical merged model files.

    .venv/bin/python scripts/e2e_demo.py [--keep DIR]
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

import numpy as np
from safetensors.numpy import save_file

SHAPES = {
    "embed.weight": (64, 32),
    "layers.0.weight": (32, 32),
    "layers.0.bias": (32,),
    "layers.1.weight": (32, 32),
    "head.weight": (10, 32),
}


def say(msg: str) -> None:
    print(msg, flush=True)


def sh(cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed in {cwd.name}: {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def write_model(
    path: Path, seed: int, base: dict[str, np.ndarray] | None = None, scale: float = 0.05
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if base is None:
        tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    else:
        tensors = {
            k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in base.items()
        }
        tensors["embed.weight"] = base["embed.weight"]  # a frozen layer: stored once
    save_file(tensors, str(path))
    return tensors


def digest_dir(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted(path.iterdir())
        if p.is_file()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="leave the repositories in this directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="git-crdt-demo-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    env_home = work / "home"
    env_home.mkdir(exist_ok=True)
    os.environ.update(
        {
            "HOME": str(env_home),
            "GIT_CONFIG_GLOBAL": str(env_home / ".gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "demo",
            "GIT_AUTHOR_EMAIL": "demo@example",
            "GIT_COMMITTER_NAME": "demo",
            "GIT_COMMITTER_EMAIL": "demo@example",
        }
    )
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    try:
        run(work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"\nrepositories kept in {work}")


def run(work: Path) -> None:
    models = work / "models"
    models.mkdir(exist_ok=True)
    base = write_model(models / "base.safetensors", 0)
    for i, who in enumerate(("alice", "bob", "carol"), 1):
        write_model(models / f"{who}.safetensors", i, base)

    say("1. origin repository with the base model and strategy 'ties'")
    origin = work / "origin.git"
    sh(work, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    seed = work / "seed"
    sh(work, "git", "clone", "-q", str(origin), str(seed))
    sh(seed, "git", "crdt", "init", "-q")
    sh(seed, "git", "crdt", "set-base", str(models / "base.safetensors"), "-q")
    sh(seed, "git", "crdt", "strategy", "ties", "--param", "density=0.5")
    sh(seed, "git", "commit", "-q", "-m", "base model and strategy")
    sh(seed, "git", "push", "-q", "origin", "HEAD:main")

    say("2. three clones each add their fine-tuned model, on their own")
    clones = {}
    for who in ("alice", "bob", "carol"):
        c = work / who
        sh(work, "git", "clone", "-q", str(origin), str(c))
        sh(c, "git", "crdt", "install", "-q")
        sh(
            c,
            "git",
            "crdt",
            "add-contribution",
            str(models / f"{who}.safetensors"),
            "-q",
            "--name",
            who,
        )
        sh(c, "git", "commit", "-q", "-m", f"{who}'s fine-tune")
        clones[who] = c

    say("3. they exchange work in different orders (merges; carol rebases)")
    sh(clones["alice"], "git", "push", "-q", "origin", "HEAD:main")
    sh(clones["bob"], "git", "pull", "-q", "--no-rebase", "origin", "main")
    sh(clones["bob"], "git", "push", "-q", "origin", "HEAD:main")
    sh(clones["carol"], "git", "pull", "-q", "--rebase", "origin", "main")
    sh(clones["carol"], "git", "push", "-q", "origin", "HEAD:main")
    for who in ("alice", "bob"):
        sh(clones[who], "git", "pull", "-q", "--no-rebase", "origin", "main")

    say("4. every clone now holds the same set:")
    roots = {}
    for who, c in clones.items():
        status = json.loads(sh(c, "git", "crdt", "status", "--json"))
        roots[who] = status["merkle_root"]
        names = ", ".join(x["name"] for x in status["contributions"])
        say(f"   {who:6s} root {status['merkle_root'][:16]}  contributions: {names}")
    if len(set(roots.values())) != 1:
        sys.exit("FAILED: the clones disagree on the Merkle root")

    say("5. merged model in each clone (written by the post-merge/post-rewrite hooks):")
    digests = {}
    for who, c in clones.items():
        sh(c, "git", "crdt", "resolve", "-q")
        digests[who] = digest_dir(c / "merged")
        say(f"   {who:6s} " + "  ".join(f"{k}={v}" for k, v in digests[who].items()))
    if len({json.dumps(d, sort_keys=True) for d in digests.values()}) != 1:
        sys.exit("FAILED: the merged models differ")
    say("OK: same contributions, same Merkle root, byte-identical merged models in all clones")


if __name__ == "__main__":
    main()
