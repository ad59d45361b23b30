"""Benchmark: `git crdt add-contribution` of a 1 GiB safetensors model against `cp` of the
same file, measured in the same run (target: ingest <= 2x cp); with ``--storage``, the chunk
encodings on a realistic bf16 fine-tune instead.

    .venv/bin/python scripts/bench_ingest.py [--gib 1.0] [--repeat 3]
    .venv/bin/python scripts/bench_ingest.py --storage [--layers 2] [--dim 4096] [--repeat 3]

Both are whole processes started the same way, on a file already in the page cache, run
alternately; ``ratio`` compares the best of ``--repeat`` runs of each, ``median_ratio`` the
medians (cp's time swings 2-4x here with the page cache's writeback state).  Prints one
JSON line.

``--storage``: a base of ``--layers`` bf16 matrices ``--dim`` x ``--dim`` drawn from
N(0, 0.02) and a fine-tune = base + N(0, 0.02 x ``--delta``) rounded to bf16 (about a third
of the bf16 words change at the default delta).  On the same tensors in the same run: the
size over raw of zstd (level 1) on raw bytes, zipnn (if importable: install it with
`.venv/bin/pip install zipnn` after torch==2.13.0, which it would otherwise replace), byte
planes + zstd, XOR against the base + planes + zstd (``xor-planes-zstd``) and the elements that
differ from the base as planes + zstd (``xor-sparse-zstd``), with each codec's in-process encode
and decode GB/s (best of ``--repeat``); then whole `git crdt set-base` + `add-contribution`
processes raw and with each XOR encoding, run in turn (ingest GB/s, repository bytes over
raw; and the start-up of the same process doing nothing, ``process_start_s``, with each
encoded ingest's GB/s after it), and
the decoding of the
fine-tune's tensors as resolution reads them (base already loaded) against raw reads of the
same tensors, and whole `git crdt resolve` processes of both repositories.
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
from collections.abc import Callable
from pathlib import Path

import benchenv
import numpy as np
from safetensors.numpy import save_file

ENCODED = ("xor-planes-zstd", "xor-sparse-zstd")  # the ingests with compression, beside raw


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


def best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def make_finetune(tmp: Path, layers: int, dim: int, delta: float) -> tuple[Path, Path, float]:
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    base, tuned = {}, {}
    for i in range(layers):
        w = torch.from_numpy(rng.standard_normal((dim, dim), dtype=np.float32) * 0.02)
        d = torch.from_numpy(rng.standard_normal((dim, dim), dtype=np.float32) * 0.02 * delta)
        base[f"model.layers.{i}.weight"] = w.to(torch.bfloat16)
        tuned[f"model.layers.{i}.weight"] = (w + d).to(torch.bfloat16)
    changed = float(
        np.mean(
            [(base[n].view(torch.int16) != tuned[n].view(torch.int16)).float().mean() for n in base]
        )
    )
    save_file(base, str(tmp / "base.safetensors"))
    save_file(tuned, str(tmp / "tuned.safetensors"))
    return tmp / "base.safetensors", tmp / "tuned.safetensors", changed


def codec_table(base_path: Path, tuned_path: Path, repeat: int) -> dict[str, dict[str, float]]:
    """Size over raw and in-process encode / decode GB/s of each codec on the same tensors."""
    import zstandard
    from safetensors import safe_open

    from git_crdt_merge.replicated import encoding

    def raw_tensors(path: Path) -> list[bytes]:
        import torch

        with safe_open(str(path), "pt") as f:
            return [f.get_tensor(k).view(torch.int16).numpy().tobytes() for k in sorted(f.keys())]

    base, tuned = raw_tensors(base_path), raw_tensors(tuned_path)
    total = sum(len(b) for b in tuned)
    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()

    def planes_decode(frames: list[bytes], with_base: bool) -> None:
        for i, frame in enumerate(frames):
            out = bytearray(len(tuned[i]))
            encoding.decode_piece(frame, 2, memoryview(out))
            if with_base:
                encoding.xor_into(memoryview(out), base[i])

    def sparse_decode(frames: list[bytes]) -> None:
        for i, frame in enumerate(frames):
            out = bytearray(len(tuned[i]))
            encoding.decode_sparse(frame, 2, memoryview(base[i]), memoryview(out))

    codecs: dict[str, tuple[Callable[[], list[bytes]], Callable[[list[bytes]], object]]] = {
        "zstd-raw": (
            lambda: [zc.compress(t) for t in tuned],
            lambda fs: [zd.decompress(f) for f in fs],
        ),
        "planes-zstd": (
            lambda: [encoding.encode_piece(t, 2) for t in tuned],
            lambda fs: planes_decode(fs, False),
        ),
        "xor-planes-zstd": (
            lambda: [encoding.encode_piece(t, 2, b) for t, b in zip(tuned, base, strict=True)],
            lambda fs: planes_decode(fs, True),
        ),
        "xor-sparse-zstd": (
            lambda: [
                encoding.encode_piece(t, 2, b, sparse=True)
                for t, b in zip(tuned, base, strict=True)
            ],
            sparse_decode,
        ),
    }
    try:
        from zipnn import ZipNN

        znn = ZipNN(input_format="byte", bytearray_dtype="bfloat16")
        codecs["zipnn"] = (
            lambda: [bytes(znn.compress(t)) for t in tuned],
            lambda fs: [znn.decompress(f) for f in fs],
        )
    except ImportError:
        pass
    table = {}
    for name, (enc, dec) in codecs.items():
        t_enc, frames = best(enc, repeat)
        t_dec, _ = best(lambda dec=dec, frames=frames: dec(frames), repeat)  # type: ignore[misc]
        size = sum(len(f) for f in frames)  # type: ignore[union-attr]
        table[name] = {
            "ratio": round(size / total, 3),
            "encode_GBps": round(total / t_enc / 1e9, 2),
            "decode_GBps": round(total / t_dec / 1e9, 2),
        }
    return table


def storage(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> dict[str, object]:
    base, tuned, changed = make_finetune(tmp, args.layers, args.dim, args.delta)
    size = tuned.stat().st_size
    out: dict[str, object] = {
        "bench": "storage",
        "tensors": f"{args.layers} x bf16 {args.dim}x{args.dim}",
        "bytes": size,
        "changed_words": round(changed, 3),
        "codecs": codec_table(base, tuned, args.repeat),
    }
    repos = {}
    kinds = ("raw", *ENCODED)
    runs: dict[str, list[float]] = {enc: [] for enc in kinds}
    new: dict[str, int] = {}
    for i in range(args.repeat):  # the encodings in turn, so that a load swing hits all
        for enc in kinds:
            base_enc = "raw" if enc == "raw" else "planes-zstd"
            repo = tmp / f"{enc}{i}"
            repo.mkdir()
            subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
            subprocess.run(["git", "crdt", "init", "-q"], cwd=repo, env=env, check=True)
            subprocess.run(["git", "config", "crdt.autoResolve", "false"], cwd=repo, check=True)
            cmd = ["git", "crdt", "set-base", str(base), "-q", "--encoding", base_enc]
            subprocess.run(cmd, cwd=repo, env=env, check=True)
            os.sync()
            t0 = time.perf_counter()
            cmd = ["git", "crdt", "add-contribution", str(tuned), "--json", "--encoding", enc]
            proc = subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
            runs[enc].append(time.perf_counter() - t0)
            new[enc] = json.loads(proc.stdout)["new_bytes"]
            if i:
                shutil.rmtree(repo)
            else:
                repos[enc] = repo
    # the fixed part of every ingest: the same process started and parsing its options
    start = min(
        timed(["git", "crdt", "add-contribution", "--help"], repos["raw"], env)
        for _ in range(args.repeat)
    )
    out["process_start_s"] = round(start, 3)
    for enc in kinds:
        t = min(runs[enc])
        out[f"ingest_{enc}"] = {
            "GBps": round(size / t / 1e9, 2),
            "repository_bytes_over_raw": round(new[enc] / size, 3),
            "time_over_raw": round(t / min(runs["raw"]), 2),
            "GBps_after_start": round(size / (t - start) / 1e9, 2),
            "all_s": [round(x, 3) for x in runs[enc]],
        }
    out["decode_in_resolve"] = decode_speed(repos, args.repeat)
    for enc, repo in repos.items():
        subprocess.run(["git", "crdt", "strategy", "linear"], cwd=repo, env=env, check=True)
        t_res = []
        for _ in range(args.repeat):
            shutil.rmtree(repo / ".git" / "crdt" / "cache", ignore_errors=True)
            shutil.rmtree(repo / "merged", ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(["git", "crdt", "resolve", "-q"], cwd=repo, env=env, check=True)
            t_res.append(time.perf_counter() - t0)
        out[f"resolve_{enc}_s"] = round(min(t_res), 3)
    merged = {(repos[e] / "merged" / "model.safetensors").read_bytes() for e in kinds}
    out["merged_identical"] = len(merged) == 1
    return out


def decode_speed(repos: dict[str, Path], repeat: int) -> dict[str, float]:
    """The fine-tune's tensors read as resolution reads them: raw chunks into a buffer, against
    encoded ones decoded with the base's bytes already loaded (its slot), in-process."""
    from git_crdt_merge.replicated.encoding import read_tensor_into
    from git_crdt_merge.replicated.reader import read_descriptor
    from git_crdt_merge.replicated.repo import Repo
    from git_crdt_merge.replicated.store import ObjectStore

    speeds = {}
    for label, repo in repos.items():
        manifest = Repo.open(repo).read_manifest()
        store = ObjectStore(repo)
        ((cid, _),) = manifest.visible_contributions()
        desc = read_descriptor(store, manifest, cid)
        base = read_descriptor(store, manifest, manifest.base() or "")
        entries = [(desc.tensors[n], base.tensors[n]) for n in sorted(desc.tensors)]
        bufs = [bytearray(e.nbytes) for e, _ in entries]
        base_bufs = [bytearray(b.nbytes) for _, b in entries]
        for (_, b), buf in zip(entries, base_bufs, strict=True):
            read_tensor_into(store, b, memoryview(buf))
        held = {b.blake3: memoryview(buf) for (_, b), buf in zip(entries, base_bufs, strict=True)}

        def read_all(store: ObjectStore, items: list, held: dict) -> None:
            for (e, _), buf in items:
                read_tensor_into(store, e, memoryview(buf), known=held.get)

        items = list(zip(entries, bufs, strict=True))
        t, _ = best(lambda s=store, i=items, h=held: read_all(s, i, h), repeat)
        speeds[f"{label}_GBps"] = round(sum(len(b) for b in bufs) / t / 1e9, 2)
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--storage", action="store_true", help="measure the chunk encodings")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--delta", type=float, default=0.0012, help="fine-tune delta / weight scale")
    args = ap.parse_args()
    benchenv.compile_package()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GIT_AUTHOR_NAME", "bench")
    env.setdefault("GIT_AUTHOR_EMAIL", "bench@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "bench")
    env.setdefault("GIT_COMMITTER_EMAIL", "bench@example.com")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        if args.storage:
            print(json.dumps(storage(args, env, tmp)))
            return
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
