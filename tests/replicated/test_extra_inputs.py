"""Extra inputs (Fisher diagonals, Gram matrices) and the whole-model pass, end to end.

Through the real CLI in temporary git repositories: extra inputs are stored as objects
referenced from the descriptor, travel with a clone and resolve there; a missing one is exit
code 9, a bad one exit code 4; the same set added in different orders resolves to the same
bytes (statistics included); the statistics pass reads through the same few input buffers as
the merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import crdt, descriptor_address, git, make_model, new_repo
from safetensors.torch import save_file

from git_crdt_merge.errors import ResolveError
from git_crdt_merge.query.verify import verify
from git_crdt_merge.replicated.contributions import set_register
from git_crdt_merge.replicated.reader import load_descriptor
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.replicated.store import ObjectStore
from git_crdt_merge.resolution import engine
from git_crdt_merge.resolution.resolve import resolve
from git_crdt_merge.strategies import registry

SHAPES = {"layer.0.weight": (8, 12), "layer.0.bias": (8,), "head.weight": (4, 8)}


def model(tmp: Path, seed: int) -> Path:
    return make_model(tmp / "models" / f"m{seed}.safetensors", seed, shapes=SHAPES)


def fisher_file(tmp: Path, seed: int, **override: torch.Tensor) -> Path:
    rng = np.random.default_rng(1000 + seed)
    tensors = {
        n: torch.from_numpy(np.abs(rng.standard_normal(s)).astype(np.float32))
        for n, s in SHAPES.items()
    }
    tensors.update(override)
    path = tmp / "extras" / f"fisher{seed}-{len(override)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def gram_file(tmp: Path, seed: int, **override: torch.Tensor) -> Path:
    rng = np.random.default_rng(2000 + seed)
    tensors = {}
    for n, s in SHAPES.items():
        if len(s) == 2:
            x = rng.standard_normal((20, s[1])).astype(np.float64)
            tensors[n] = torch.from_numpy(x.T @ x).to(torch.float32)
    tensors.update(override)
    path = tmp / "extras" / f"gram{seed}-{len(override)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def repo_at(path: Path) -> Path:
    repo = new_repo(path)
    git(repo, "config", "crdt.autoResolve", "false")
    return repo


def add(repo: Path, *args: str) -> str:
    out = crdt(repo, "add-contribution", "--json", "-q", *args).stdout
    return str(json.loads(out)["id"])


def choose(repo: Path, strategy: str, **params: object) -> None:
    set_register(Repo.open(repo), "strategy", {"name": strategy, "params": params})


def read(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def load(path: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in read(path).items()}


def test_extra_inputs_are_stored_as_objects_and_resolve_in_a_second_clone(tmp_path: Path) -> None:
    a = repo_at(tmp_path / "a")
    m1, m2 = model(tmp_path, 1), model(tmp_path, 2)
    f1, f2, g1, g2 = (
        fisher_file(tmp_path, 1),
        fisher_file(tmp_path, 2),
        gram_file(tmp_path, 1),
        gram_file(tmp_path, 2),
    )
    id1 = add(a, str(m1), "--fisher", str(f1), "--gram", str(g1), "-n", "one")
    id2 = add(a, str(m2), "--extra", f"fisher={f2}", "--extra", f"gram={g2}", "-n", "two")
    plain = json.loads(crdt(a, "add-contribution", "--json", "-q", str(m1), "-n", "plain").stdout)
    assert plain["id"] != id1  # the extra inputs are part of the content
    crdt(a, "remove-contribution", "plain")
    git(a, "commit", "-q", "-m", "two contributions with extra inputs")
    store = ObjectStore(a)
    desc = load_descriptor(store, descriptor_address(a, id1))
    assert sorted(desc["extras"]) == ["fisher", "gram"]
    assert sorted(desc["extras"]["fisher"]["tensors"]) == sorted(SHAPES)
    assert sorted(desc["extras"]["gram"]["tensors"]) == ["head.weight", "layer.0.weight"]
    assert desc["extras"]["gram"]["tensors"]["layer.0.weight"]["shape"] == [12, 12]
    for table in desc["extras"].values():
        for info in table["tensors"].values():
            assert all(store.has(oid) for oid in info["chunks"])
    report = verify(Repo.open(a), "HEAD", full=True)  # extra inputs' chunks are checked too
    assert not report.problems and report.objects > 2 * (1 + len(SHAPES))

    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(a), str(b))
    crdt(b, "install", "-q")
    git(b, "config", "crdt.autoResolve", "false")
    xs = [load(m1), load(m2)]
    fs = [load(f1), load(f2)]
    gs = [load(g1), load(g2)]
    order = [0, 1] if id1 < id2 else [1, 0]  # canonical order: by id
    xs, fs, gs = [xs[i] for i in order], [fs[i] for i in order], [gs[i] for i in order]

    crdt(b, "strategy", "fisher_merge")
    out = json.loads(crdt(b, "resolve", "--json", "-q").stdout)
    merged = load(Path(out["output"]) / "model.safetensors")
    for n in SHAPES:
        num = sum((f[n] + 1e-8) * x[n] for f, x in zip(fs, xs, strict=True))
        den = sum(f[n] + 1e-8 for f in fs)
        np.testing.assert_allclose(merged[n], num / den, rtol=1e-5, atol=1e-6)

    choose(b, "regression_mean", alpha=1.0)
    merged = load(resolve(Repo.open(b)).output / "model.safetensors")
    for n in SHAPES:
        if n in gs[0]:
            a_ = sum(x[n] @ g[n] for x, g in zip(xs, gs, strict=True))
            expected = a_ @ np.linalg.inv(sum(g[n] for g in gs))
        else:
            expected = (xs[0][n] + xs[1][n]) / 2
        np.testing.assert_allclose(merged[n], expected, rtol=1e-4, atol=1e-5)


def test_a_missing_extra_input_is_exit_code_9_naming_contribution_kind_and_command(
    tmp_path: Path,
) -> None:
    repo = repo_at(tmp_path / "repo")
    add(repo, str(model(tmp_path, 1)), "--fisher", str(fisher_file(tmp_path, 1)), "-n", "good")
    add(repo, str(model(tmp_path, 2)), "-n", "bare")
    choose(repo, "fisher_merge")
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9
    message = proc.stderr.strip()
    assert "\n" not in message
    assert "needs a fisher extra input" in message and "'bare'" in message
    assert "add-contribution PATH --fisher" in message
    # the data-free proxy is there only when asked for
    choose(repo, "fisher_merge", fisher_source="squared_weights")
    assert not resolve(Repo.open(repo)).empty
    choose(repo, "regression_mean")
    with pytest.raises(ResolveError, match="needs a gram extra input, but contribution"):
        resolve(Repo.open(repo))


def test_bad_extra_inputs_are_exit_code_4_and_write_nothing(tmp_path: Path) -> None:
    repo = repo_at(tmp_path / "repo")
    m = model(tmp_path, 1)
    manifest = (repo / ".crdt" / "manifest").read_bytes()
    sym = torch.eye(12)
    sym[0, 1] = 5.0
    cases = {
        "negative values": [
            "--fisher",
            str(fisher_file(tmp_path, 1, **{"layer.0.bias": -torch.ones(8)})),
        ],
        "non-finite": [
            "--fisher",
            str(fisher_file(tmp_path, 2, **{"layer.0.bias": torch.full((8,), float("nan"))})),
        ],
        "differs from the model's": [
            "--fisher",
            str(fisher_file(tmp_path, 3, **{"layer.0.bias": torch.ones(9)})),
        ],
        "the model has no tensor 'nope'": [
            "--fisher",
            str(fisher_file(tmp_path, 4, nope=torch.ones(2))),
        ],
        "not a float type": [
            "--fisher",
            str(fisher_file(tmp_path, 5, **{"layer.0.bias": torch.ones(8, dtype=torch.int32)})),
        ],
        "is not symmetric": ["--gram", str(gram_file(tmp_path, 1, **{"layer.0.weight": sym}))],
        "expected [12, 12]": [
            "--gram",
            str(gram_file(tmp_path, 2, **{"layer.0.weight": torch.eye(8)})),
        ],
        "belongs to a 2-D weight": [
            "--gram",
            str(gram_file(tmp_path, 3, **{"layer.0.bias": torch.eye(8)})),
        ],
        "unknown kind 'hessian'": ["--extra", f"hessian={fisher_file(tmp_path, 6)}"],
        "must be KIND=PATH": ["--extra", "fisher"],
        "is given twice": [
            "--fisher",
            str(fisher_file(tmp_path, 7)),
            "--extra",
            f"fisher={fisher_file(tmp_path, 7)}",
        ],
        "must be an existing .safetensors file": ["--gram", str(tmp_path / "none.safetensors")],
    }
    for message, args in cases.items():
        proc = crdt(repo, "add-contribution", str(m), *args, check=False)
        assert proc.returncode == 4, (message, proc.stderr)
        assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert (repo / ".crdt" / "manifest").read_bytes() == manifest


def test_strategies_json_lists_extra_inputs_and_statistics_passes(tmp_path: Path) -> None:
    rows = {r["name"]: r for r in json.loads(crdt(tmp_path, "strategies", "--json").stdout)}
    assert rows["fisher_merge"]["extra_inputs"] == ["fisher"]
    assert rows["regression_mean"]["extra_inputs"] == ["gram"]
    assert rows["linear"]["extra_inputs"] == [] and not rows["linear"]["statistics_pass"]
    assert rows["ada_merging"]["statistics_pass"] and rows["genetic_merge"]["statistics_pass"]


STRATEGIES = {
    "fisher_merge": {},
    "regression_mean": {},
    "ada_merging": {"steps": 20},
    "dam": {"steps": 20},
    "evolutionary_merge": {"population_size": 6, "generations": 4},
    "genetic_merge": {"population_size": 6, "generations": 4},
}


def test_same_set_added_in_different_orders_resolves_to_identical_bytes(tmp_path: Path) -> None:
    base = model(tmp_path, 0)
    items = [
        (model(tmp_path, s), fisher_file(tmp_path, s), gram_file(tmp_path, s)) for s in (1, 2, 3)
    ]
    repos = []
    for label, order in (("x", [0, 1, 2]), ("y", [2, 0, 1])):
        repo = repo_at(tmp_path / label)
        crdt(repo, "set-base", str(base), "-q")
        for i in order:
            m, f, g = items[i]
            add(repo, str(m), "--fisher", str(f), "--gram", str(g), "-n", f"c{i}")
            git(repo, "commit", "-q", "-m", f"c{i}")
        repos.append(repo)
    models = set()
    for name, params in STRATEGIES.items():
        found = []
        for repo in repos:
            choose(repo, name, **params)
            outcome = resolve(Repo.open(repo))
            found.append({p.name: p.read_bytes() for p in sorted(outcome.output.iterdir())})
        assert found[0] == found[1], name
        record = json.loads(found[0]["resolution.json"])
        assert ("statistics" in record) == (name not in ("fisher_merge", "regression_mean"))
        models.add(found[0]["model.safetensors"])
    assert len(models) == len(STRATEGIES)


def test_statistics_pass_reads_through_the_merges_few_input_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = repo_at(tmp_path / "repo")
    crdt(repo, "set-base", str(model(tmp_path, 0)), "-q")
    for s in (1, 2, 3):
        add(repo, str(model(tmp_path, s)), "-n", f"c{s}")
    choose(repo, "ada_merging", granularity="layer", steps=5)
    buffers: set[tuple[int, int]] = set()
    summaries: list[object] = []
    load_into = engine.InputSlots.load
    collect = registry.collect_statistics

    def spy_load(self: engine.InputSlots, slot: int, *args: object) -> torch.Tensor:
        buffers.add((id(self), slot))
        return load_into(self, slot, *args)  # type: ignore[arg-type]

    def spy_collect(*args: object, **kw: object) -> object:
        summaries.append(collect(*args, **kw))  # type: ignore[arg-type]
        return summaries[-1]

    monkeypatch.setattr(engine.InputSlots, "load", spy_load)
    monkeypatch.setattr(engine.registry, "collect_statistics", spy_collect)
    outcome = resolve(Repo.open(repo))
    assert len(summaries) == len(SHAPES)  # one streamed read per tensor name
    for summary in summaries:  # each tensor reduced at once to a K x K table of floats
        assert isinstance(summary, list) and len(summary) == 3
        assert all(isinstance(v, float) for row in summary for v in row)
    assert len(buffers) == 4  # K + 1 buffers for both passes: memory stays a few tensors
    record = json.loads((outcome.output / "resolution.json").read_text())
    assert record["statistics"]["granularity"] == "layer"
    assert sorted(record["statistics"]["coefficients"]) == sorted(SHAPES)


def test_fitness_plugin_is_found_by_entry_point_in_the_resolving_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    info = site / "crdt_cli_fitness-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "crdt_cli_fitness.py").write_text(
        "def loss(candidate):\n"
        "    return sum((c - 0.25) ** 2 for c in next(iter(candidate.coefficients.values())))\n"
    )
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crdt-cli-fitness\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[git_crdt_merge.fitness]\nquarter = crdt_cli_fitness:loss\n"
    )
    repo = repo_at(tmp_path / "repo")
    for s in (1, 2):
        add(repo, str(model(tmp_path, s)), "-n", f"c{s}")
    choose(repo, "genetic_merge", fitness="quarter", population_size=8, generations=10)
    proc = crdt(repo, "resolve", check=False)  # not installed here: a one-line exit 9
    assert proc.returncode == 9 and proc.stderr.strip().count("\n") == 0
    assert "plugin 'quarter' not found in entry point group 'git_crdt_merge.fitness'" in proc.stderr
    monkeypatch.setenv("PYTHONPATH", str(site))
    out = json.loads(crdt(repo, "resolve", "--json", "-q").stdout)
    record = json.loads((Path(out["output"]) / "resolution.json").read_text())
    assert record["statistics"]["objective"] == "quarter"
    assert record["statistics"]["plugin"] == "crdt-cli-fitness 1.0"
    assert record["statistics"]["loss"] < 2 * 0.25**2  # better than the centre (1/2, 1/2)


def test_a_data_aware_plugin_reads_each_candidates_merged_tensors_from_the_store(
    tmp_path: Path,
) -> None:
    import importlib
    import sys

    site = tmp_path / "site"
    info = site / "crdt_reader_fitness-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "crdt_reader_fitness.py").write_text(
        "from git_crdt_merge import numerics\n"
        "SEEN = []\n"
        "def loss(candidate):\n"
        "    t = candidate.merged('head.weight')\n"
        "    SEEN.append((list(candidate.coefficients['head.weight']), t.clone()))\n"
        "    return numerics.dot(t, t)\n"
    )
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crdt-reader-fitness\nVersion: 1\n")
    (info / "entry_points.txt").write_text(
        "[git_crdt_merge.fitness]\nsmallest-head = crdt_reader_fitness:loss\n"
    )
    repo = repo_at(tmp_path / "repo")
    base = model(tmp_path, 0)
    crdt(repo, "set-base", str(base), "-q")
    ids = [add(repo, str(model(tmp_path, s)), "-n", f"c{s}") for s in (1, 2)]
    choose(repo, "evolutionary_merge", fitness="smallest-head", population_size=4, generations=2)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        resolve(Repo.open(repo))
        seen = sys.modules["crdt_reader_fitness"].SEEN
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("crdt_reader_fitness", None)
        importlib.invalidate_caches()
    assert len(seen) == 4 + 2 * 2  # the first population, then the children of two rounds
    b = load(base)["head.weight"]
    xs = [load(model(tmp_path, s))["head.weight"] for s in (1, 2)]
    xs = xs if ids[0] < ids[1] else xs[::-1]  # canonical order
    for coeffs, tensor in seen:
        expected = b + sum(c * (x - b) for c, x in zip(coeffs, xs, strict=True))
        np.testing.assert_allclose(tensor.double().numpy(), expected, rtol=1e-5, atol=1e-5)
