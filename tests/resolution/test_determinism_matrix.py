"""Same inputs, same output bytes under every CPU capability and thread count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_determinism_worker.py")


def _capabilities() -> list[str]:
    caps = ["default", "avx2"]
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return caps
    if " avx512f" in flags:
        caps.append("avx512")
    return caps


def _run(capability: str, threads: int) -> subprocess.Popen[str]:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    # what MKL would pick by itself on such a CPU; the package must override it
    env.pop("MKL_CBWR", None)
    if capability in ("avx2", "avx512"):
        env["MKL_CBWR"] = capability.upper()
    env["PYTHONPATH"] = str(WORKER.parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(threads)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_strategy_gives_identical_bytes_across_capabilities_and_threads() -> None:
    configs = [(cap, threads) for cap in _capabilities() for threads in (1, 2)]
    outputs: dict[tuple[str, int], str] = {}
    # two 1-thread workers at a time, 2-thread workers alone: keeps the 2 cores busy, no more
    for batch in ([c for c in configs if c[1] == 1], [c for c in configs if c[1] == 2]):
        width = 2 if batch and batch[0][1] == 1 else 1
        for start in range(0, len(batch), width):
            procs = {cfg: _run(*cfg) for cfg in batch[start : start + width]}
            for cfg, proc in procs.items():
                out, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, f"{cfg}: {err}"
                outputs[cfg] = out
    reference_cfg = configs[0]
    reference = outputs[reference_cfg]
    assert reference.count("\n") > 40
    for cfg, out in outputs.items():
        if out != reference:
            diff = [
                (a, b)
                for a, b in zip(reference.splitlines(), out.splitlines(), strict=False)
                if a != b
            ]
            pytest.fail(f"{cfg} differs from {reference_cfg}: {diff[:5]}")
