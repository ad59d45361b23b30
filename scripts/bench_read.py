"""Benchmark: reading chunks in every form git stores them, against reading the same bytes from a
plain file, measured in the same run.

    .venv/bin/python scripts/bench_read.py [--mib 512] [--chunk-mib 64] [--repeat 3]

The data is bf16 words of normal weights (zlib saves about 20% on them), split into chunks.
Each form is read by ``gitobjects.ObjectDB.read_into`` into one reused buffer, then hashed with
blake3 as ``ObjectStore.read_into`` does before a resolution uses the bytes:

- ``ours``: loose objects with stored zlib blocks, as ``add-contribution`` writes them;
- ``git-loose``: loose objects git deflated itself (``core.looseCompression=1``, what a pull of
  fewer than ``transfer.unpackLimit`` objects leaves);
- ``pack-stored``: one pack written with ``pack.compression=0`` (what ``git crdt install``
  sets, so what a clone of an installed remote receives);
- ``pack-deflated``: one pack at git's default compression (a remote that is not installed);
- ``file``: ``readinto`` of a plain file holding the same bytes, plus the same blake3 (the floor).

Prints one JSON line per form with its best time, GB/s and ratio to ``file`` and to ``ours``
(issue 11's target: a resolve after a clone at most 1.2x the resolve in the adding clone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np

from git_crdt_merge.git import commands as gitops
from git_crdt_merge.git import objects as gitobjects


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, input=input, capture_output=True, check=True)
    return proc.stdout.decode().strip()


def chunks_of(mib: int, chunk_mib: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    words = rng.standard_normal(mib * 2**19, dtype=np.float32).view(np.uint32) >> 16
    data = words.astype(np.uint16).tobytes()
    step = chunk_mib * 2**20
    return [data[i : i + step] for i in range(0, len(data), step)]


def best_of(repeat: int, fn: object) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    chunks = chunks_of(args.mib, args.chunk_mib)
    total = sum(len(c) for c in chunks)
    buf = bytearray(max(len(c) for c in chunks))
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp_s:
        tmp = Path(tmp_s)
        results: dict[str, float] = {}

        plain = tmp / "plain"
        plain.write_bytes(b"".join(chunks))
        bounds = [(sum(len(c) for c in chunks[:i]), len(chunks[i])) for i in range(len(chunks))]

        def read_plain() -> None:
            with open(plain, "rb", buffering=0) as fh:
                for _, n in bounds:
                    view = memoryview(buf)[:n]
                    fh.readinto(view)
                    blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest()

        read_plain()
        results["file"] = best_of(args.repeat, read_plain)

        def form(name: str, setup: object) -> None:
            repo = tmp / name
            git(tmp, "init", "-q", str(repo))
            objects = repo / ".git" / "objects"
            shas = setup(repo, objects)  # type: ignore[operator]
            db = gitobjects.ObjectDB(objects, root=repo)

            def read() -> None:
                for sha, (_, n) in zip(shas, bounds, strict=True):
                    view = memoryview(buf)[:n]
                    db.read_into(sha, view)
                    blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest()

            read()  # the page cache holds the object files, as after a clone or pull
            results[name] = best_of(args.repeat, read)

        def ours(repo: Path, objects: Path) -> list[str]:
            return [gitops.write_loose_blob(objects, c) for c in chunks]

        def loose(repo: Path, objects: Path, level: int = 1) -> list[str]:
            return [
                git(
                    repo,
                    "-c",
                    f"core.looseCompression={level}",
                    "hash-object",
                    "-w",
                    "--stdin",
                    input=c,
                )
                for c in chunks
            ]

        def packed(repo: Path, objects: Path, compression: str) -> list[str]:
            shas = ours(repo, objects)
            names = "".join(f"{s}\n" for s in shas).encode()
            git(
                repo,
                "-c",
                f"pack.compression={compression}",
                "pack-objects",
                "-q",
                "--window=0",
                str(objects / "pack" / "pack"),
                input=names,
            )
            git(repo, "prune-packed")
            return shas

        form("ours", ours)
        form("git-loose", loose)
        form("pack-stored", lambda r, o: packed(r, o, "0"))
        form("pack-deflated", lambda r, o: packed(r, o, "-1"))
        for name, seconds in results.items():
            print(
                json.dumps(
                    {
                        "bench": "read",
                        "form": name,
                        "mib": args.mib,
                        "seconds": round(seconds, 3),
                        "gb_per_s": round(total / seconds / 1e9, 2),
                        "ratio_to_file": round(seconds / results["file"], 2),
                        "ratio_to_ours": round(seconds / results["ours"], 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
