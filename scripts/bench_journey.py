"""Benchmark: a contribution's whole journey, each step against `cp` of the same bytes.

    .venv/bin/python scripts/bench_journey.py [--size 1GiB] [--no-plain-git] [--keep DIR]
        [--storage git|lfs]

A base model and a fine-tune (bf16, random finite bits, one third of the words changed) of
``--size`` each travel: ``set-base`` + ``add-contribution``, ``git commit``, ``git push`` to a
bare remote over file:// (set up with ``git crdt install``), ``git crdt clone`` over file://
(install included), ``git crdt resolve`` (strategy linear) in the clone and in the adding
clone, and ``git gc`` in the clone, the remote and the adding clone.  Beside it, plain git's
add / commit / push / clone of the same two safetensors files (``--no-plain-git`` skips it:
plain ``git add`` deflates at ~16 MB/s).  With ``--storage lfs`` the repository keeps its
chunks in Git LFS: the push uploads them through git-lfs's ``file://`` standalone transfer
into the bare remote's ``lfs/objects``, and a separate step downloads the set's chunks in the
clone (the ``git lfs fetch --include`` that resolve runs) before it resolves.

Every step is a whole process started the way a user would, with ``sync`` (untimed) before
it.  The baseline is ``cp`` of the two model files (2 x size) into a new folder on the same
disk, best of 3, measured in the same run; ``git hash-object`` of the same files is printed
too, as the floor of any git step that must SHA-1 every byte once (git 2.39's SHA-1DC).  The
resolving hooks are off (``crdt.autoResolve false``), so that resolve is measured on its own.
Prints one JSON line per step, then a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchenv
import numpy as np

TENSOR_BYTES = 64 * 1024**2  # one tensor per 64 MiB, like the layers of a real checkpoint


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|K|M|G)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64MiB, 1GiB)")
    unit = (m.group(2) or "B").upper().rstrip("IB") or "B"
    scale = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]
    return int(float(m.group(1)) * scale)


def make_models(base: Path, ft: Path, size: int) -> None:
    """bf16 tensors of random finite bit patterns; the fine-tune changes a third of the words."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    words_total = size // 2
    per = TENSOR_BYTES // 2
    base_t, ft_t = {}, {}
    for i, start in enumerate(range(0, words_total, per)):
        n = min(per, words_total - start)
        w = rng.integers(0, 1 << 16, n, dtype=np.uint16) & np.uint16(0xBFFF)  # no NaN/Inf
        f = w.copy()
        changed = rng.random(n) < 1 / 3
        f[changed] = rng.integers(0, 1 << 16, int(changed.sum()), dtype=np.uint16) & 0xBFFF
        name = f"model.layers.{i}.weight"
        base_t[name] = torch.from_numpy(w).view(torch.bfloat16)
        ft_t[name] = torch.from_numpy(f).view(torch.bfloat16)
    save_file(base_t, str(base))
    save_file(ft_t, str(ft))


def environment(home: Path) -> dict[str, str]:
    gconf = home / ".gitconfig"
    gconf.write_text(
        "[user]\n\tname = bench\n\temail = bench@example.com\n[init]\n\tdefaultBranch = main\n"
        "[advice]\n\tdetachedHead = false\n"
    )
    env = dict(os.environ)
    env.update(HOME=str(home), GIT_CONFIG_GLOBAL=str(gconf), GIT_CONFIG_NOSYSTEM="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for key in ("GIT_DIR", "GIT_WORK_TREE"):
        env.pop(key, None)
    return env


class Runner:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, cmd: list[str], cwd: Path) -> None:
        proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")

    def timed(self, cmds: list[list[str]], cwd: Path) -> float:
        os.sync()  # untimed: no step pays for the previous one's writeback
        t0 = time.perf_counter()
        for cmd in cmds:
            self.run(cmd, cwd)
        return time.perf_counter() - t0


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def du_lfs(repo: Path) -> int:
    return du(repo / "lfs") if (repo / "lfs").is_dir() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="per model")
    ap.add_argument("--no-plain-git", action="store_true", help="skip plain git's steps")
    ap.add_argument("--keep", type=Path, help="work in this (new) folder and leave it")
    ap.add_argument(
        "--storage",
        choices=("git", "lfs"),
        default="git",
        help="the storage mode (lfs: chunks travel through git-lfs's file:// transfer)",
    )
    args = ap.parse_args()
    benchenv.compile_package()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-journey-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = journey(work.resolve(), args.size, plain=not args.no_plain_git, storage=args.storage)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    table(rows)


def journey(work: Path, size: int, *, plain: bool, storage: str) -> list[dict[str, object]]:
    home = work / "home"
    home.mkdir()
    r = Runner(environment(home))
    models = work / "models"
    models.mkdir()
    base, ft = models / "base.safetensors", models / "ft.safetensors"
    make_models(base, ft, size)
    payload = base.stat().st_size + ft.stat().st_size

    cps = []
    for i in range(3):
        dest = work / f"cp{i}"
        cps.append(r.timed([["cp", "-r", str(models), str(dest)]], work))
        shutil.rmtree(dest)
    cp_s = min(cps)
    # A threshold above the files' size: git then hashes them in memory.  Below it, hash-object
    # streams them through its bulk-checkin path, which also deflates every byte (at ~10 MB/s
    # here: a 2 GiB "floor" of 216 s that measures zlib, not SHA-1).
    sha1_s = r.timed(
        [
            [
                "git",
                "-c",
                "core.bigFileThreshold=64g",
                "hash-object",
                "--no-filters",
                str(base),
                str(ft),
            ]
        ],
        work,
    )
    rows: list[dict[str, object]] = []

    def step(name: str, seconds: float, note: str = "") -> None:
        row = {
            "bench": "journey",
            "step": name,
            "seconds": round(seconds, 3),
            "cp_s": round(cp_s, 3),
            "ratio": round(seconds / cp_s, 2),
            "sha1_floor_ratio": round(seconds / sha1_s, 2),
            "bytes": payload,
            "note": note,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    step("cp (baseline, best of 3)", cp_s, f"all: {[round(c, 3) for c in cps]}")
    step("git hash-object (SHA-1 floor)", sha1_s)

    remote = work / "remote.git"
    t = r.timed([["git", "init", "-q", "--bare", str(remote)]], work)
    t += r.timed([["git", "crdt", "install", "-q"]], remote)
    step("remote: git init --bare + git crdt install", t)

    a = work / "a"
    a.mkdir()
    for cmd in (
        ["git", "init", "-q"],
        ["git", "crdt", "init", "-q", "--storage", storage],
        ["git", "config", "crdt.autoResolve", "false"],
        ["git", "crdt", "strategy", "linear"],
        ["git", "commit", "-q", "-m", "init"],
        ["git", "remote", "add", "origin", f"file://{remote}"],
    ):
        r.run(cmd, a)
    t = r.timed(
        [
            ["git", "crdt", "set-base", str(base), "-q"],
            ["git", "crdt", "add-contribution", str(ft), "-n", "ft", "-q"],
        ],
        a,
    )
    step("add (set-base + add-contribution)", t)
    step("commit (pre-commit verify)", r.timed([["git", "commit", "-q", "-m", "ft"]], a))
    step("push to a bare remote, file://", r.timed([["git", "push", "-q", "origin", "main"]], a))
    b = work / "b"
    t = r.timed([["git", "crdt", "clone", "-q", "--no-resolve", f"file://{remote}", str(b)]], work)
    r.run(["git", "config", "crdt.autoResolve", "false"], b)
    step("git crdt clone, file:// (install included)", t)
    if storage == "lfs":
        # what resolve runs first (git/commands.lfs_fetch_paths): every chunk is in the set here
        listed = subprocess.run(
            ["git", "ls-files", "--", ".crdt/objects/"], cwd=b, capture_output=True, text=True
        ).stdout.split()
        fetch = ["git", "lfs", "fetch", f"--include={','.join(listed)}", "--exclude=", "origin"]
        t = r.timed([fetch + ["HEAD"]], b)
        step("download the set's LFS objects (git lfs fetch --include, as resolve does)", t)
    step("resolve linear in the clone", r.timed([["git", "crdt", "resolve", "-q"]], b))
    step("resolve linear in the adding clone", r.timed([["git", "crdt", "resolve", "-q"]], a))
    step("git gc in the clone", r.timed([["git", "gc", "-q"]], b))
    step("git gc in the remote", r.timed([["git", "gc", "-q"]], remote))
    step("git gc in the adding clone (packs its loose objects)", r.timed([["git", "gc", "-q"]], a))
    sizes = {
        "bench": "journey",
        "step": "remote objects on disk / payload",
        "ratio": None,
        "sha1_floor_ratio": None,
        "note": f"{(du(remote / 'objects') + du_lfs(remote)) / payload:.4f}",
    }
    rows.append(sizes)
    print(json.dumps(sizes), flush=True)

    if plain:
        premote = work / "plain.git"
        r.run(["git", "init", "-q", "--bare", str(premote)], work)
        p = work / "p"
        p.mkdir()
        r.run(["git", "init", "-q"], p)
        r.run(["git", "remote", "add", "origin", f"file://{premote}"], p)
        shutil.copy(base, p / base.name)
        shutil.copy(ft, p / ft.name)
        step("plain git add", r.timed([["git", "add", base.name, ft.name]], p))
        step("plain git commit", r.timed([["git", "commit", "-q", "-m", "models"]], p))
        step("plain git push, file://", r.timed([["git", "push", "-q", "origin", "main"]], p))
        step(
            "plain git clone, file://",
            r.timed([["git", "clone", "-q", f"file://{premote}", str(work / "pc")]], work),
        )
    return rows


def table(rows: list[dict[str, object]]) -> None:
    width = max(len(str(row["step"])) for row in rows)
    print(f"{'step':<{width}}  {'seconds':>9}  {'x cp':>7}  {'x SHA-1':>7}", file=sys.stderr)
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        floor = "" if row["sha1_floor_ratio"] is None else f"{row['sha1_floor_ratio']:.2f}"
        secs = row["note"] if row["ratio"] is None else f"{row['seconds']:.2f}"
        print(f"{row['step']:<{width}}  {secs:>9}  {ratio:>7}  {floor:>7}", file=sys.stderr)


if __name__ == "__main__":
    main()
