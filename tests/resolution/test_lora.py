"""LoRA adapters and loadable outputs, with real peft and transformers on tiny models.

The models are built here (a Llama and a GPT-2 of hidden size 32, 2 layers, seeded); the
adapters come from ``peft.get_peft_model`` + ``save_pretrained``, with ``lora_B`` perturbed so
their deltas are not zero.  The merged delta must be the float64 mean of ``scaling * B @ A``
within float32 rounding; the outputs must load with ``from_pretrained`` /
``PeftModel.from_pretrained`` with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import crdt, fresh_repo, set_base

import git_crdt_merge  # noqa: F401  (sets MKL_CBWR before torch's first MKL call)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
DORA_TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def _llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _adapter(base_dir: Path, out: Path, seed: int, **lora: object) -> Path:
    """A saved PEFT LoRA adapter of the model in ``base_dir``, its lora_B made non-zero (and
    DoRA's magnitude vectors moved off the base's row norms)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora})
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(out, save_embedding_layers=False)  # the factors only
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base model folder (with tokenizer, README, preprocessor config and modelling code)
    and adapters: rank 4, rank 2 with rsLoRA, two DoRA (the second rank 2 with rsLoRA,
    both also on the embeddings) and one with other targets."""
    tmp = tmp_path_factory.mktemp("llama")
    base = tmp / "base"
    _llama(0).save_pretrained(base)
    _tokenizer(base)
    (base / "README.md").write_text("# the base's own card\n")
    (base / "preprocessor_config.json").write_text('{"size": 3}\n')
    (base / "modeling_custom.py").write_text("raise SystemExit('never run')\n")
    return {
        "base": base,
        "a": _adapter(base, tmp / "ada", 1),
        "b": _adapter(base, tmp / "adb", 2, r=2, lora_alpha=4, use_rslora=True),
        "dora": _adapter(base, tmp / "dora", 3, use_dora=True, target_modules=DORA_TARGETS),
        "dora2": _adapter(
            base,
            tmp / "dora2",
            6,
            r=2,
            lora_alpha=4,
            use_rslora=True,
            use_dora=True,
            target_modules=DORA_TARGETS,
        ),
        "other_targets": _adapter(base, tmp / "kv", 4, target_modules=["k_proj", "v_proj"]),
    }


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """target base tensor -> scaling * B @ A in float64, read independently of the tool."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")].double()
        r = a.shape[0]
        alpha = config["lora_alpha"]
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        out[target] = scaling * (b @ a.double())
    return out


def _repo_with(tmp_path: Path, llama: dict[str, Path], *names: str) -> Path:
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, llama["base"])
    for name in names:
        crdt(repo, "add-contribution", str(llama[name]), "--name", name)
    return repo


def _loaded(folder: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info.get("error_msgs")
    return model.eval()


def test_lora_merge_is_the_mean_of_the_adapters_deltas(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    repo = _repo_with(tmp_path, llama, "a", "b")
    crdt(repo, "resolve")
    merged = load_file(repo / "merged" / "model.safetensors")
    base = load_file(llama["base"] / "model.safetensors")
    da, db = _deltas(llama["a"]), _deltas(llama["b"])
    assert set(da) == set(db) and len(da) == 2 * len(TARGETS)
    assert set(merged) == set(base)
    for name, w in base.items():
        if name not in da:
            assert torch.equal(merged[name], w), name  # no adapter changes it: the base
            continue
        want = (w.double() + (da[name] + db[name]) / 2).float()  # float64 mean, one rounding
        ulp = torch.finfo(torch.float32).eps * want.abs().max().item()
        assert (merged[name].double() - want.double()).abs().max().item() <= 2 * ulp, name
        # and far from merging the factors separately
        assert not torch.allclose(merged[name], w)
    model = _loaded(repo / "merged")
    tok = transformers.AutoTokenizer.from_pretrained(repo / "merged")
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
    record = json.loads((repo / "merged" / "resolution.json").read_text())
    assert sorted(c["name"] for c in record["contributions"]) == ["a", "b"]
    assert {c["kind"] for c in record["contributions"]} == {"lora"}


def test_every_strategy_merges_deltas_ties_resolves_and_verify_agrees(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    repo = _repo_with(tmp_path, llama, "a", "b")
    crdt(repo, "strategy", "ties", "-p", "density=0.5")
    crdt(repo, "verify")
    crdt(repo, "resolve")
    _loaded(repo / "merged")


def test_adapter_output_loads_with_peft_and_equals_the_merged_delta(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    repo = _repo_with(tmp_path, llama, "a", "b")
    crdt(repo, "output", "--adapter-rank", "6")  # rank 4 + rank 2: the mean is exact
    crdt(repo, "verify")
    crdt(repo, "resolve")
    out = repo / "merged"
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and not config["use_rslora"]
    got = _deltas(out)
    da, db = _deltas(llama["a"]), _deltas(llama["b"])
    for name in da:
        want = (da[name] + db[name]) / 2
        err = (got[name] - want).abs().max().item()
        assert err <= 1e-6 * want.abs().max().item() + 1e-7, name
    base = transformers.AutoModelForCausalLM.from_pretrained(llama["base"])
    model = peft.PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    # the same model as the full-weights output
    crdt(repo, "output", "--adapter-rank", "0")
    crdt(repo, "resolve")
    full = _loaded(out)
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, logits, atol=1e-5, rtol=1e-4)
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 6)


def test_adapter_output_is_reproducible(tmp_path: Path, llama: dict[str, Path]) -> None:
    from git_crdt_merge.replicated.repo import Repo
    from git_crdt_merge.replicated.store import ObjectStore
    from git_crdt_merge.resolution import cache, engine

    repo = _repo_with(tmp_path, llama, "a", "b")
    crdt(repo, "output", "--adapter-rank", "3")  # truncated: the SVD's choice matters
    r = Repo.open(repo)
    outs = []
    for i in range(2):
        work = tmp_path / f"w{i}"
        work.mkdir()
        store = ObjectStore(repo)
        engine.compute(engine.make_plan(store, r.read_manifest()), store, work, cache.Settings())
        outs.append({p.name: p.read_bytes() for p in sorted(work.iterdir())})
    assert outs[0] == outs[1]
    a = load_file(tmp_path / "w0" / "adapter_model.safetensors")
    assert all(t.shape[0] == 3 or t.shape[1] == 3 for t in a.values())


def test_incompatible_adapters_are_refused_at_add_time(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    repo = _repo_with(tmp_path, llama, "a")
    # magnitude vectors in an adapter whose config does not say use_dora: not a LoRA
    flipped = tmp_path / "flipped"
    shutil.copytree(llama["dora"], flipped)
    config = json.loads((flipped / "adapter_config.json").read_text())
    (flipped / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    dora = crdt(repo, "add-contribution", str(flipped), check=False)
    assert dora.returncode == 4 and "use_dora" in dora.stderr
    assert len(dora.stderr.strip().splitlines()) == 1
    # the reverse: use_dora set, no magnitude vectors
    plain = tmp_path / "plain"
    shutil.copytree(llama["a"], plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    missing = crdt(repo, "add-contribution", str(plain), check=False)
    assert missing.returncode == 4 and "no lora_magnitude_vector" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    other = crdt(repo, "add-contribution", str(llama["other_targets"]), check=False)
    assert other.returncode == 4 and "same modules" in other.stderr
    # an adapter of another model: its q_proj does not fit this base's
    tmp = tmp_path / "wide"
    torch.manual_seed(9)
    wide = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    wide.save_pretrained(tmp / "base")
    _adapter(tmp / "base", tmp / "adapter", 5)
    bad = crdt(repo, "add-contribution", str(tmp / "adapter"), check=False)
    assert bad.returncode == 4 and "another base model" in bad.stderr


def test_full_fine_tune_beside_adapters_is_merged_as_its_own_delta(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    full = tmp_path / "full"
    model = transformers.AutoModelForCausalLM.from_pretrained(llama["base"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(full)
    repo = _repo_with(tmp_path, llama, "a")
    crdt(repo, "add-contribution", str(full), "--name", "full")
    crdt(repo, "verify")
    crdt(repo, "resolve")
    merged = load_file(repo / "merged" / "model.safetensors")
    base = load_file(llama["base"] / "model.safetensors")
    ft = load_file(full / "model.safetensors")
    da = _deltas(llama["a"])
    for name, w in base.items():
        want = ((w.double() + da.get(name, 0)) + ft[name].double()) / 2
        assert (merged[name].double() - want).abs().max().item() < 1e-5, name


def test_adapters_without_base_fail_in_verify_as_in_resolve(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    crdt(repo, "add-contribution", str(llama["a"]), "--name", "a")
    v = crdt(repo, "verify", check=False)
    r = crdt(repo, "resolve", check=False)
    assert v.returncode != 0 and "set-base" in v.stdout + v.stderr
    assert r.returncode == 9 and "set-base" in r.stderr


def test_base_files_model_card_and_code_left_out(tmp_path: Path, llama: dict[str, Path]) -> None:
    repo = fresh_repo(tmp_path / "repo")
    added = crdt(repo, "set-base", str(llama["base"]))
    assert "modeling_custom.py (program code" in added.stderr  # said, never silent
    crdt(repo, "add-contribution", str(llama["a"]), "--name", "math", "--weight", "2")
    crdt(repo, "add-contribution", str(llama["b"]), "--name", "code")
    crdt(repo, "resolve")
    out = repo / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "preprocessor_config.json" in names and "modeling_custom.py" not in names
    record = json.loads((out / "resolution.json").read_text())
    card = (out / "README.md").read_text()
    assert "the base's own card" not in card
    assert any("README.md of the base" in line for line in record["files"]["left_out"])
    for c in record["contributions"]:
        assert c["name"] in card and c["id"] in card
        assert f"| {c['name']} | lora | {c['weight']!r} | `{c['id']}` |" in card
    assert record["merkle_root"] in card and record["tool"] in card
    assert '```yaml\nmerge_method: "linear"' in card
    assert 'model: "math"' in card and "weight: 2.0" in card
    assert "git crdt add-contribution MATH_PATH --name 'math' --weight 2.0" in card
    assert "git crdt resolve  # Merkle root " + record["merkle_root"] in card
    # deterministic: a second resolution elsewhere writes the same card
    crdt(repo, "resolve", "-o", str(tmp_path / "again"))
    assert (tmp_path / "again" / "README.md").read_text() == card


def test_single_file_base_takes_config_and_tokenizer_from_a_contribution(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    """A base given as one .safetensors file with Hugging Face folder fine-tunes: config
    and tokenizer come from the first contribution that has them, or from config_from."""
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, llama["base"] / "model.safetensors")
    folders = []
    for i, marker in enumerate(["first", "second"]):
        model = transformers.AutoModelForCausalLM.from_pretrained(llama["base"])
        with torch.no_grad():
            model.lm_head.weight.add_(0.01 * (i + 1))
        model.generation_config.max_length = 10 + i  # tells the sources apart
        folder = tmp_path / marker
        model.save_pretrained(folder)
        _tokenizer(folder)
        folders.append(folder)
        crdt(repo, "add-contribution", str(folder), "--name", marker)
    crdt(repo, "resolve", "--max-shard-size", "20000")  # sharded: the other layout
    out = repo / "merged"
    assert (out / "model.safetensors.index.json").is_file()
    _loaded(out)
    transformers.AutoTokenizer.from_pretrained(out)
    record = json.loads((out / "resolution.json").read_text())
    ids = {c["name"]: c["id"] for c in record["contributions"]}
    first = min(ids.values())  # canonical order: by id
    source = record["files"]["copied"]["config.json"]
    assert first[:12] in source
    crdt(repo, "output", "--config-from", "second")
    crdt(repo, "verify")
    crdt(repo, "resolve")
    record = json.loads((out / "resolution.json").read_text())
    assert ids["second"][:12] in record["files"]["copied"]["generation_config.json"]
    assert json.loads((out / "generation_config.json").read_text())["max_length"] == 11
    crdt(repo, "remove-contribution", "second")
    v = crdt(repo, "verify", check=False)
    r = crdt(repo, "resolve", check=False)
    assert v.returncode != 0 and r.returncode == 9 and "config_from" in r.stderr


def test_gpt2_fan_in_fan_out_adapters_and_tied_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=True
    )
    base = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(base)
    adapters = [
        _adapter(base, tmp_path / f"g{i}", 10 + i, target_modules=["c_attn"], fan_in_fan_out=True)
        for i in range(2)
    ]
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, base)
    for i, a in enumerate(adapters):
        crdt(repo, "add-contribution", str(a), "--name", f"g{i}")
    crdt(repo, "resolve")
    merged = load_file(repo / "merged" / "model.safetensors")
    w = load_file(base / "model.safetensors")
    d0, d1 = _deltas(adapters[0]), _deltas(adapters[1])
    for name in d0:
        want = w[name].double() + ((d0[name] + d1[name]) / 2).T  # Conv1D stores (in, out)
        assert (merged[name].double() - want).abs().max().item() < 1e-6, name
    model = _loaded(repo / "merged")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_memory_check_counts_the_lora_product_buffers(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    from git_crdt_merge.replicated.repo import Repo
    from git_crdt_merge.replicated.store import ObjectStore
    from git_crdt_merge.resolution import engine

    repo = _repo_with(tmp_path, llama, "a", "b")
    store = ObjectStore(repo)
    plan = engine.make_plan(store, Repo.open(repo).read_manifest())
    assert plan.lowrank is not None
    n = max(math.prod(s.shape) for s in plan.specs)
    factor = plan.lowrank.largest_factor()
    assert factor == 4 * 32 * 4  # rank 4 x 32 float32
    # one float64 product, then per adapter a float32 input and its two factors
    assert engine.lowrank_bytes(plan, n, "float32") == 8 * n + 2 * (4 * n + 2 * factor)
    assert engine.lowrank_bytes(plan, n, "float64") == 8 * n + 2 * (8 * n + 2 * factor)


def test_code_files_are_copied_only_when_asked_for(tmp_path: Path, llama: dict[str, Path]) -> None:
    repo = fresh_repo(tmp_path / "repo")
    added = crdt(repo, "set-base", str(llama["base"]), "--include-code")
    assert "warning: kept program code modeling_custom.py" in added.stderr
    crdt(repo, "add-contribution", str(llama["a"]), "--name", "a")
    crdt(repo, "resolve")
    out = repo / "merged"
    assert (out / "modeling_custom.py").read_text() == "raise SystemExit('never run')\n"
    record = json.loads((out / "resolution.json").read_text())
    assert record["files"]["copied"]["modeling_custom.py"].startswith("the base")
    assert "`modeling_custom.py` from the base" in (out / "README.md").read_text()


# -- DoRA -----------------------------------------------------------------------------------
def _dora_formula(base: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """target -> PEFT's DoRA weight in float64, read independently of the tool: with
    V = W + scaling * B @ A in the adapter's orientation (embeddings: transposed),
    (m / ||V||_row) * V."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, m in tensors.items():
        if not key.endswith(".lora_magnitude_vector"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
        embedding = f"base_model.model.{module}.lora_embedding_A" in tensors
        prefix = f"base_model.model.{module}." + ("lora_embedding_" if embedding else "lora_")
        suffix = "" if embedding else ".weight"
        a, b = tensors[f"{prefix}A{suffix}"].double(), tensors[f"{prefix}B{suffix}"].double()
        r = a.shape[0]
        alpha = config["lora_alpha"]
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        w = base[f"{module}.weight"].double()
        v = (w.T if embedding else w) + scaling * (b @ a)
        v = v * (m.double() / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1)
        out[f"{module}.weight"] = v.T if embedding else v
    return out


def _peft_merged(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload() weights of an adapter."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in float32 ulps of the tensor's largest magnitude."""
    ulp = torch.finfo(torch.float32).eps * want.abs().max().item()
    return (got.double() - want.double()).abs().max().item() / ulp


def test_dora_adapters_merge_as_peft_merges_them(tmp_path: Path, llama: dict[str, Path]) -> None:
    base = load_file(llama["base"] / "model.safetensors")
    f1, f2 = _dora_formula(base, llama["dora"]), _dora_formula(base, llama["dora2"])
    assert (
        set(f1)
        == set(f2)
        == {
            *(f"model.layers.{i}.self_attn.{t}.weight" for i in range(2) for t in TARGETS),
            "model.embed_tokens.weight",
        }
    )
    p1, p2 = _peft_merged(llama["base"], llama["dora"]), _peft_merged(llama["base"], llama["dora2"])
    # the formula is PEFT's DoRA (its float32 merge within a few ulp)
    for name in f1:
        assert _ulps(p1[name], f1[name]) <= 4 and _ulps(p2[name], f2[name]) <= 4, name
        assert not torch.allclose(p1[name], base[name])  # the adapters change the weights
    repo = _repo_with(tmp_path, llama, "dora", "dora2")
    crdt(repo, "verify")
    crdt(repo, "resolve")
    merged = load_file(repo / "merged" / "model.safetensors")
    for name, w in base.items():
        if name not in f1:
            assert torch.equal(merged[name], w), name
            continue
        # each adapter's model rounded once to float32, then linear's mean (exact halving)
        want = ((f1[name].float().double() + f2[name].float().double()) / 2).float()
        assert torch.equal(merged[name], want), name
        peft_mean = ((p1[name].double() + p2[name].double()) / 2).float()
        assert _ulps(merged[name], peft_mean) <= 4, name
    # deterministic: a second resolution elsewhere writes the same bytes
    crdt(repo, "resolve", "-o", str(tmp_path / "again"))
    first = (repo / "merged" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first
    _loaded(repo / "merged")


def test_one_dora_adapter_reproduces_merge_and_unload(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    repo = _repo_with(tmp_path, llama, "dora")
    crdt(repo, "strategy", "linear", "-p", "normalize=false")  # weight 1: the adapter's model
    crdt(repo, "resolve")
    merged = load_file(repo / "merged" / "model.safetensors")
    base = load_file(llama["base"] / "model.safetensors")
    formula = _dora_formula(base, llama["dora"])
    peft_weights = _peft_merged(llama["base"], llama["dora"])
    for name, w in merged.items():
        if name in formula:
            assert torch.equal(w, formula[name].float()), name  # float64, one rounding
            assert _ulps(w, peft_weights[name]) <= 4, name
        else:
            assert torch.equal(w, peft_weights[name]), name
    ids = torch.tensor([[1, 5, 6, 7]])
    model = _loaded(repo / "merged")
    peft_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(llama["base"]), llama["dora"]
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-4)


def test_dora_memory_estimate_counts_the_magnitudes(tmp_path: Path, llama: dict[str, Path]) -> None:
    from git_crdt_merge.replicated.repo import Repo
    from git_crdt_merge.replicated.store import ObjectStore
    from git_crdt_merge.resolution import engine, lowrank

    repo = _repo_with(tmp_path, llama, "dora", "dora2")
    plan = engine.make_plan(ObjectStore(repo), Repo.open(repo).read_manifest())
    assert plan.lowrank is not None and plan.lowrank.dora_adapters() == 2
    n = max(math.prod(s.shape) for s in plan.specs)
    mag = plan.lowrank.largest_magnitude()
    assert mag == 4 * 32  # 32 rows (q_proj, v_proj, the embedding's dimensions), float32
    factor = plan.lowrank.largest_factor()
    assert factor == 4 * 64 * 4  # the embedding's A: rank 4 x 64 rows, float32
    lora = 8 * n + 2 * (4 * n + 2 * factor)
    dora = 2 * mag + 8 * mag + lowrank.DOT_ROWS_SCRATCH
    assert engine.lowrank_bytes(plan, n, "float32") == lora + dora


def test_gpt2_fan_in_fan_out_dora_adapter_reproduces_merge_and_unload(tmp_path: Path) -> None:
    """Conv1D stores (in, out): DoRA's norm is over each output, a column of the stored
    weight."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=True
    )
    base = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(base)
    adapter = _adapter(
        base, tmp_path / "g", 12, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True
    )
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, base)
    crdt(repo, "add-contribution", str(adapter), "--name", "g")
    crdt(repo, "resolve")
    merged = load_file(repo / "merged" / "model.safetensors")
    w = load_file(base / "model.safetensors")
    peft_weights = _peft_merged(base, adapter)
    changed = [n for n in merged if "c_attn.weight" in n]
    assert len(changed) == 2
    for name in changed:
        assert merged[name].shape == w[name].shape == (32, 96)
        assert _ulps(merged[name], peft_weights[name]) <= 4, name
        assert not torch.allclose(merged[name], w[name])
