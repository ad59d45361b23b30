"""Benchmark: the merge driver as a whole process on two manifests of 1,000 contributions
each (half of them shared, plus removes and register writes).  Target: median <= 100 ms.

    .venv/bin/python scripts/bench_driver.py [--contributions 1000] [--runs 21]

Prints one JSON line; ``python_startup_ms`` (an empty ``python -c pass``) is measured in the
same run as a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchenv

from git_crdt_merge.replicated.manifest import Manifest, add_record, remove_record, set_record


def side(shared: list, n_own: int, replica: str) -> Manifest:
    recs = list(shared)
    own = [
        add_record(secrets.token_hex(16), secrets.token_hex(32), f"c-{replica}-{i}")
        for i in range(n_own)
    ]
    recs += own
    recs.append(remove_record(secrets.token_hex(16), [own[0].tag]))
    recs.append(set_record("strategy", {"name": "ties", "params": {"density": 0.5}}, 3, replica))
    return Manifest({}).with_records(recs)


def median_ms(cmd: list[str], runs: int, setup=None) -> float:
    times = []
    for _ in range(runs):
        if setup:
            setup()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contributions", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    benchenv.compile_package()
    n = args.contributions
    shared = [
        add_record(secrets.token_hex(16), secrets.token_hex(32), f"shared-{i}")
        for i in range(n // 2)
    ]
    a = side(shared, n - n // 2, "a" * 16).serialize()
    b = side(shared, n - n // 2, "b" * 16).serialize()
    exe = str(Path(sys.executable).parent / "git-crdt")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "O").write_bytes(b"")
        (tmp / "B").write_bytes(b)

        def reset() -> None:
            (tmp / "A").write_bytes(a)

        cmd = [
            exe,
            "merge-driver",
            str(tmp / "O"),
            str(tmp / "A"),
            str(tmp / "B"),
            "7",
            ".crdt/manifest",
        ]
        driver = median_ms(cmd, args.runs, reset)
        merged = Manifest.parse((tmp / "A").read_bytes())
        floor = median_ms([sys.executable, "-c", "pass"], args.runs)
    print(
        json.dumps(
            {
                "bench": "merge-driver",
                "contributions_per_side": n,
                "lines_a": a.count(b"\n"),
                "lines_b": b.count(b"\n"),
                "lines_joined": len(merged.records),
                "median_ms": round(driver, 1),
                "python_startup_ms": round(floor, 1),
                "target_ms": 100,
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
