"""Recipes with real git and real files: mergekit YAML imported into the registers and
exported back, gradients and filters resolved per tensor, ``resolve --dry-run``, the
one-shot ``git crdt merge`` (byte-identical to a repository's resolve), hostile YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import crdt, digests, fresh_repo, make_model, set_base
from safetensors.torch import load_file

from git_crdt_merge.numerics import RandomStream
from git_crdt_merge.replicated.reader import read_descriptor
from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.replicated.store import ObjectStore
from git_crdt_merge.strategies import layered, registry

SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.layers.2.self_attn.q_proj.weight": (8, 8),
    "model.layers.2.mlp.up_proj.weight": (16, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (16, 8),
}

TIES = """\
merge_method: ties
base_model: models/base.safetensors
models:
  - model: models/base.safetensors
  - model: models/m1.safetensors
    parameters:
      weight: 0.7
      density: 0.5
  - model: models/m2.safetensors
    parameters:
      weight: 0.3
      density: [0.2, 0.8]
parameters:
  lambda:
    - filter: self_attn
      value: 0.5
    - value: 1.0
  int8_mask: true
dtype: float32
"""

SLERP = """\
merge_method: slerp
base_model: models/base.safetensors
models:
  - model: models/base.safetensors
  - model: models/m1.safetensors
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - filter: mlp
      value: [1, 0.5, 0]
    - value: 0.25
"""


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name, seed in (("base", 0), ("m1", 1), ("m2", 2)):
        make_model(tmp_path / "models" / f"{name}.safetensors", seed, SHAPES)
    return tmp_path


def _repo_with(tmp_path: Path, names: list[str]) -> Path:
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, tmp_path / "models" / "base.safetensors")
    for name in names:
        crdt(repo, "add-contribution", str(tmp_path / "models" / f"{name}.safetensors"), "-q")
    return repo


def _state(repo: Path) -> tuple[dict[str, object], dict[str, float]]:
    """The strategy register and each visible contribution's weight, by name."""
    r = Repo.open(repo)
    manifest = r.read_manifest()
    store = ObjectStore(r.root)
    weights = {
        name: read_descriptor(store, manifest, cid).weight
        for cid, name in manifest.visible_contributions()
    }
    return manifest.strategy(), weights


def test_import_ties_recipe_sets_strategy_weights_and_per_model_density(
    models: Path,
) -> None:
    repo = _repo_with(models, ["m1", "m2"])
    (models / "ties.yml").write_text(TIES)
    out = crdt(repo, "recipe", "import", str(models / "ties.yml"), "--json")
    result = json.loads(out.stdout)
    assert result["ignored"] == ["int8_mask"]
    strategy, weights = _state(repo)
    assert strategy == {
        "name": "ties",
        "params": {
            "density": {"m1": 0.5, "m2": {"layers": [{"value": [0.2, 0.8]}]}},
            "lambda": {"layers": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]},
        },
    }
    assert weights == {"m1": 0.7, "m2": 0.3}


def test_export_then_import_gives_the_same_registers(models: Path) -> None:
    repo = _repo_with(models, ["m1", "m2"])
    (models / "ties.yml").write_text(TIES)
    crdt(repo, "recipe", "import", str(models / "ties.yml"))
    before = _state(repo)
    manifest_before = (repo / ".crdt" / "manifest").read_bytes()
    crdt(repo, "recipe", "export", str(models / "exported.yml"))
    exported = (models / "exported.yml").read_text()
    assert "merge_method: ties" in exported and "filter: self_attn" in exported
    again = crdt(repo, "recipe", "import", str(models / "exported.yml"), "--json")
    again = json.loads(again.stdout)
    assert again["changed"] == []  # nothing to write: the same registers and weights
    assert _state(repo) == before
    assert (repo / ".crdt" / "manifest").read_bytes() == manifest_before


def test_export_import_round_trip_into_another_repository(models: Path) -> None:
    first = _repo_with(models, ["m1", "m2"])
    (models / "ties.yml").write_text(TIES)
    crdt(first, "recipe", "import", str(models / "ties.yml"))
    text = crdt(first, "recipe", "export").stdout
    (models / "exported.yml").write_text(text)
    second_root = models / "second"
    second_root.mkdir()
    (second_root / "models").symlink_to(models / "models")
    second = _repo_with(second_root, ["m1", "m2"])
    crdt(second, "recipe", "import", str(models / "exported.yml"))
    assert _state(second) == _state(first)
    assert (
        Repo.open(second).read_manifest().merkle_root()
        == Repo.open(first).read_manifest().merkle_root()
    )


def test_slerp_gradient_and_filters_resolve_per_tensor(models: Path) -> None:
    repo = _repo_with(models, ["m1"])
    (models / "slerp.yml").write_text(SLERP)
    crdt(repo, "recipe", "import", str(models / "slerp.yml"))
    crdt(repo, "resolve", "-o", str(models / "out"), "-q")
    merged = load_file(str(models / "out" / "model.safetensors"))
    base = load_file(str(models / "models" / "base.safetensors"))
    m1 = load_file(str(models / "models" / "m1.safetensors"))
    expected_t = {
        "model.embed_tokens.weight": 0.25,  # no filter matches: the default rule
        "model.layers.0.self_attn.q_proj.weight": 0.0,
        "model.layers.1.self_attn.q_proj.weight": 0.5,
        "model.layers.2.self_attn.q_proj.weight": 1.0,
        "model.layers.0.mlp.up_proj.weight": 1.0,
        "model.layers.1.mlp.up_proj.weight": 0.5,
        "model.layers.2.mlp.up_proj.weight": 0.0,
        "model.norm.weight": 0.25,
        "lm_head.weight": 0.25,
    }
    slerp = registry.get_strategy("slerp")
    cid = Repo.open(repo).read_manifest().visible_contributions()[0][0]
    for name, t in expected_t.items():
        one = registry.run_strategy(
            slerp,
            name,
            base[name],
            [m1[name]],
            [cid],
            [1.0],
            {"t": t},
            RandomStream.from_seed(b"\0" * 8),
        )
        assert merged[name].numpy().tobytes() == one.numpy().tobytes(), name
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )


def test_dry_run_prints_the_plan_and_writes_nothing(models: Path) -> None:
    repo = _repo_with(models, ["m1"])
    (models / "slerp.yml").write_text(SLERP)
    crdt(repo, "recipe", "import", str(models / "slerp.yml"))
    plan = json.loads(crdt(repo, "resolve", "--dry-run", "--json").stdout)
    assert plan["strategy"] == "slerp" and plan["layers"] == 3
    assert plan["per_tensor_params"] == ["t"]
    by_name = {t["name"]: t for t in plan["tensors"]}
    assert set(by_name) == set(SHAPES)
    assert by_name["model.layers.1.mlp.up_proj.weight"]["params"] == {"t": 0.5}
    assert by_name["model.layers.2.self_attn.q_proj.weight"]["params"] == {"t": 1.0}
    assert by_name["lm_head.weight"]["bytes"] == 16 * 8 * 4
    assert plan["estimated_memory_bytes"] == 16 * 8 * 4 * (2 + 3)
    assert plan["estimated_seconds"] > 0
    assert [c["name"] for c in plan["contributions"]] == ["m1"]
    human = crdt(repo, "resolve", "--dry-run")
    assert "dry run: nothing written" in human.stderr
    assert "model.layers.2.mlp.up_proj.weight" in human.stderr
    assert not (repo / "merged").exists()
    assert not list((repo / ".git" / "crdt").glob("cache/*"))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_one_shot_merge_equals_the_repository_resolve(models: Path, method: str) -> None:
    recipe = TIES.replace("merge_method: ties", f"merge_method: {method}")
    (models / "recipe.yml").write_text(recipe)
    repo = _repo_with(models, ["m1", "m2"])
    crdt(repo, "recipe", "import", str(models / "recipe.yml"))
    crdt(repo, "resolve", "-o", str(models / "from-repo"), "-q")
    out = crdt(models, "merge", "recipe.yml", "-o", "one-shot", "--json")
    assert json.loads(out.stdout)["merkle_root"] == Repo.open(repo).read_manifest().merkle_root()
    assert digests(models / "one-shot") == digests(models / "from-repo")
    # again into the same folder: refused without --force, the same bytes with it
    again = crdt(models, "merge", "recipe.yml", "-o", "one-shot", check=False)
    assert again.returncode == 4 and "--force" in again.stderr
    crdt(models, "merge", "recipe.yml", "-o", "one-shot", "--force", "-q")
    assert digests(models / "one-shot") == digests(models / "from-repo")


def test_recipe_dtype_is_the_output_dtype_in_a_repository_and_in_a_one_shot_merge(
    models: Path,
) -> None:
    """``dtype: bfloat16`` over float32 models sets the output_dtype register; a one-shot
    merge of the same recipe writes the same bytes; ``dtype: float32`` (the models' own)
    writes no register, so the root stays the one without it."""
    repo = _repo_with(models, ["m1", "m2"])
    (models / "same.yml").write_text(TIES)
    crdt(repo, "recipe", "import", str(models / "same.yml"))
    plain_root = Repo.open(repo).read_manifest().merkle_root()
    assert Repo.open(repo).read_manifest().output_dtype() is None
    (models / "recipe.yml").write_text(TIES.replace("dtype: float32", "dtype: bfloat16"))
    crdt(repo, "recipe", "import", str(models / "recipe.yml"))
    manifest = Repo.open(repo).read_manifest()
    assert manifest.output_dtype() == "bfloat16"
    assert manifest.merkle_root() != plain_root
    assert "dtype: bfloat16" in crdt(repo, "recipe", "export").stdout
    crdt(repo, "resolve", "-o", str(models / "from-repo"), "-q")
    merged = load_file(str(models / "from-repo" / "model.safetensors"))
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.bfloat16}
    crdt(models, "merge", "recipe.yml", "-o", "one-shot", "-q")
    assert digests(models / "one-shot") == digests(models / "from-repo")


def test_one_shot_dry_run_writes_nothing(models: Path) -> None:
    (models / "slerp.yml").write_text(SLERP)
    out = crdt(models, "merge", "slerp.yml", "--dry-run", "--json")
    plan = json.loads(out.stdout)["plan"]
    assert plan["per_tensor_params"] == ["t"] and len(plan["tensors"]) == len(SHAPES)
    assert sorted(p.name for p in models.iterdir()) == ["models", "slerp.yml"]


HOSTILE = {
    "huge": "merge_method: ties\n# " + "x" * (1024 * 1024 + 10) + "\n",
    "nested": "merge_method: " + "[" * 200 + "]" * 200 + "\n",
    "python_tag": "merge_method: !!python/object/apply:os.system ['touch pwned']\n",
    "alias_bomb": "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n",
    "unknown_key": "merge_method: ties\nmodels: [{model: m1}]\nmerge_methd: x\n",
    "unknown_model_key": "merge_method: ties\nmodels: [{model: m1, weight: 2}]\n",
    "unknown_method": "merge_method: tiez\nmodels: [{model: m1}]\n",
    "unknown_param": "merge_method: ties\nmodels: [{model: m1}]\nparameters: {denisty: 0.5}\n",
    "slices": "merge_method: passthrough\nslices: []\n",
    "out_of_range": "merge_method: ties\nmodels: [{model: m1, parameters: {density: [0.5, 2]}}]\n",
    "not_yaml": "merge_method: [unclosed\n",
    "not_mapping": "- 1\n- 2\n",
}
EXPECTED = {
    "huge": "larger than the limit",
    "nested": "nested deeper than 16",
    "python_tag": "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
    "alias_bomb": "aliases",
    "unknown_key": "unknown key 'merge_methd' (valid: base_model, dtype, merge_method, models, "
    "parameters)",
    "unknown_model_key": "unknown key 'weight' (valid: model, parameters)",
    "unknown_method": "unknown strategy 'tiez'",
    "unknown_param": "has no parameter 'denisty' (valid: weight, density, lambda, normalize, "
    "rescale)",
    "slices": "layer slices",
    "out_of_range": "parameter density[m1]: rule 1[1] must be in (0, 1], got 2",
    "not_yaml": "not valid YAML",
    "not_mapping": "a recipe is a mapping",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_recipes_are_refused_in_one_line(models: Path, case: str) -> None:
    repo = _repo_with(models, ["m1"])
    manifest = (repo / ".crdt" / "manifest").read_bytes()
    (models / "bad.yml").write_text(HOSTILE[case])
    proc = crdt(repo, "recipe", "import", str(models / "bad.yml"), check=False)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("git-crdt: error: "), proc.stderr
    assert EXPECTED[case] in lines[0]
    assert "Traceback" not in proc.stderr
    assert (repo / ".crdt" / "manifest").read_bytes() == manifest
    assert not (repo / "pwned").exists() and not (models / "pwned").exists()
    one_shot = crdt(models, "merge", "bad.yml", "-o", "out", check=False)
    assert one_shot.returncode == 4 and len(one_shot.stderr.strip().splitlines()) == 1
    assert not (models / "out").exists()


def test_import_refuses_models_that_match_no_contribution(models: Path) -> None:
    repo = _repo_with(models, ["m1"])
    (models / "ties.yml").write_text(TIES)
    proc = crdt(repo, "recipe", "import", str(models / "ties.yml"), check=False)
    assert proc.returncode == 4
    assert "'models/m2.safetensors' matches no visible contribution" in proc.stderr


def test_layer_index_rule_is_what_the_plan_uses() -> None:
    assert layered.layer_count(SHAPES) == 3


def test_strategy_command_writes_the_canonical_per_tensor_form_and_plain_values_as_given(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    crdt(repo, "strategy", "ties", "-p", "density=0.5", "-p", "lambda=1")
    line = next(
        x for x in (repo / ".crdt" / "manifest").read_text().splitlines() if '"strategy"' in x
    )
    assert '"value":{"name":"ties","params":{"density":0.5,"lambda":1}}' in line  # bytes kept
    crdt(repo, "strategy", "slerp", "-p", "t=[0,0.5,1]")
    assert Repo.open(repo).read_manifest().strategy() == {
        "name": "slerp",
        "params": {"t": {"layers": [{"value": [0.0, 0.5, 1.0]}]}},
    }
    bad = crdt(
        repo, "strategy", "slerp", "-p", 't={"layers":[{"filter":"mlp","value":1}]}', check=False
    )
    assert bad.returncode == 9 and "end its rules with one without a filter" in bad.stderr
