"""Run every registered strategy on fixed inputs and print the sha256 of each output.

Usage: ``python tests/resolution/_determinism_worker.py THREADS``.  Run by
test_determinism_matrix.py under several ``ATEN_CPU_CAPABILITY`` values and thread counts;
every configuration must print the same lines.  Inputs come from a fixed RandomStream (never
the torch RNG).
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from git_crdt_merge import numerics
from git_crdt_merge.strategies import all_strategies, registry, resolve_params, run_strategy

ROOT = bytes(range(32))
CONTRIBUTIONS = ["3a-contribution", "7f-contribution", "c0-contribution"]
SHAPES: dict[str, tuple[int, ...]] = {
    "big.weight": (2048, 2048),
    "odd.weight": (37, 129),
    "odd.bias": (1021,),
    "scalar": (),
    "cube": (3, 5, 7),
    # a decaying spectrum: star's subspace iteration and adarank's range finder run on it
    "lowrank.weight": (160, 224),
}


def _values(
    stream: numerics.RandomStream, name: str, cid: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """Deterministic float32 values in about [-1, 1) (exact float64 ops, one cast)."""
    n = torch.Size(shape).numel()
    u = stream.uniform(name, cid, n)
    return ((u - 0.5) * 2.0).to(torch.float32).reshape(shape)


def _low_rank(
    stream: numerics.RandomStream, name: str, cid: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """Rank 6 with singular values falling by 2 per component, plus noise of 1e-4."""
    a = _values(stream, name, f"{cid}/left", (shape[0], 6)).to(torch.float64)
    b = _values(stream, name, f"{cid}/right", (6, shape[1])).to(torch.float64)
    scale = torch.tensor([2.0**-j for j in range(6)], dtype=torch.float64) * 0.01
    noise = _values(stream, name, cid, shape).to(torch.float64) * 1e-4
    return (numerics.matmul(a * scale, b) + noise).to(torch.float32)


# an eigendecomposition of a 2048 x 2048 Gram per contribution takes seconds on one thread:
# these run on the smaller inputs (lowrank.weight exercises their range-finder paths)
SKIP_BIG = {"star", "adarank", "svd_knot_tying"}


def inputs() -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    stream = numerics.RandomStream(b"\x42" * 32)
    table: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for name, shape in SHAPES.items():
        base = _values(stream, name, "base", shape)
        if name == "lowrank.weight":
            deltas = [_low_rank(stream, name, cid, shape) for cid in CONTRIBUTIONS]
        else:
            deltas = [_values(stream, name, cid, shape) * 0.01 for cid in CONTRIBUTIONS]
        table[name] = (base, [(base + d) for d in deltas])
    base, xs = table["odd.weight"]
    table["half.weight"] = (base.to(torch.bfloat16), [x.to(torch.float16) for x in xs])
    return table


def extra_inputs(
    stream: numerics.RandomStream, data: dict[str, tuple[torch.Tensor, list[torch.Tensor]]]
) -> dict[str, dict[str, list[torch.Tensor | None]]]:
    """Fisher diagonals (|values|) for every tensor and Gram matrices X^T X (X: 16 rows of fixed
    values, product through numerics.matmul) for the small 2-D weights; none for big.weight,
    which then takes the weighted-average path of regression_mean (a 2048 x 2048 solve is
    slow)."""
    table: dict[str, dict[str, list[torch.Tensor | None]]] = {}
    for name, (base, xs) in data.items():
        fisher: list[torch.Tensor | None] = [
            _values(stream, name, f"fisher-{cid}", tuple(base.shape)).abs() for cid in CONTRIBUTIONS
        ]
        gram: list[torch.Tensor | None] = [None] * len(xs)
        if base.dim() == 2 and name != "big.weight":
            inner = base.shape[1]
            gram = []
            for cid in CONTRIBUTIONS:
                x = _values(stream, name, f"gram-{cid}", (16, inner))
                gram.append(numerics.matmul(x.T, x).to(torch.float32))
        table[name] = {"fisher": fisher, "gram": gram}
    return table


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def main(threads: int, only: list[str]) -> None:
    torch.set_num_threads(threads)
    rng = numerics.RandomStream(ROOT)
    data = inputs()
    extra = extra_inputs(numerics.RandomStream(b"\x43" * 32), data)
    for strategy in all_strategies():
        if only and strategy.name not in only:  # a subset, when checking a few strategies
            continue
        names = {p.name for p in strategy.params}
        raw: dict[str, object] = {}
        if "density" in names:
            raw["density"] = 0.5
        if "t" in names:
            raw["t"] = 0.5
        if "select_topk" in names:  # exercise the selection step
            raw["select_topk"] = 0.5
        if "rank" in names:  # representation_surgery's low-rank path: its solve, then eigh
            raw["rank"] = 3
        n = min(len(CONTRIBUTIONS), strategy.max_inputs or len(CONTRIBUTIONS))
        ids = CONTRIBUTIONS[:n]
        params = resolve_params(strategy, raw, [(c, c) for c in ids])
        weights = [1.0, 0.5, 2.0][:n]
        model = None
        tensors = data
        if strategy.model_pass is not None:
            # the statistics pass is exact dot products (checked on big.weight below) and the
            # merge a weighted sum (checked by linear): the 2048 x 2048 input only costs time
            tensors = {k: v for k, v in data.items() if k != "big.weight"}
            summaries = {
                name: registry.collect_statistics(
                    strategy, registry.StoredInputs(name, base, xs[:n], ids, weights, rng), params
                )
                for name, (base, xs) in tensors.items()
            }
            numels = {name: base.numel() for name, (base, _) in tensors.items()}
            model = registry.finish_statistics(
                strategy, summaries, numels, ids, weights, params, rng, True
            )
            print(strategy.name, "statistics", json.dumps(model.report, sort_keys=True))
        for name, (base, xs) in tensors.items():
            if name == "big.weight" and strategy.name in SKIP_BIG:
                continue
            kinds = strategy.extra_inputs
            extras = {kind: extra[name][kind][:n] for kind in kinds}
            # the side file's tensors (representation_surgery's modules) are output too
            side: dict[str, torch.Tensor] | None = {} if strategy.side_output else None
            out = run_strategy(
                strategy,
                name,
                base,
                xs[:n],
                ids,
                weights,
                params,
                rng,
                extras=extras,
                model=model,
                side=side,
            )
            print(f"{strategy.name} {name} {out.dtype} {_digest(out)}")
            for key, tensor in sorted((side or {}).items()):
                print(f"{strategy.name} side {key} {tensor.dtype} {_digest(tensor)}")
    x = data["big.weight"][1][0]
    # elementwise exp/log on values spanning their whole range (subnormal results and inputs,
    # overflow, the reduction boundaries), plus part of the big input
    wide = torch.cat(
        [
            torch.arange(100_003, dtype=torch.float64) * 0.0148 - 760.0,  # linspace differs by ISA
            x.reshape(-1)[:400_000].to(torch.float64) * 30.0,
        ]
    )
    positive = torch.cat([wide.abs() * 1e300, wide.abs() * 1e-300, wide.abs()])
    for label, values in (("exp", numerics.exp(wide)), ("log", numerics.log(positive))):
        print(label, hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest())
    print("exact_sum", numerics.exact_sum(x).hex(), numerics.dot(x, x).hex())
    a = data["big.weight"][1][1][:300, :200]
    u, s, vh = numerics.svd(a)
    values, vectors = numerics.eigh(numerics.matmul(a.T, a))
    square = numerics.matmul(a[:200].T, a[:200]) + torch.eye(200, dtype=torch.float64)
    gram_at = numerics.matmul(numerics.matmul(a.T, a), a.T)  # (200, 300): a G a^T is symmetric
    for label, t in {
        "svd": torch.cat([u.reshape(-1), s, vh.reshape(-1)]),
        "eigh": torch.cat([values, vectors.reshape(-1)]),
        "solve": numerics.solve(square, a[:200, :7]),
        "solve_spd": numerics.solve_spd(square, a[:200, :7]),
        "matmul_symmetric": numerics.matmul_symmetric(a, gram_at),
    }.items():
        print(label, hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
