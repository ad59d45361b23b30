"""Casting and mismatches (resolution/align.py, replicated/alignment.py), through real git:
inputs of other float dtypes, the declared output dtype, resized vocabularies, tied heads, and
what is still refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import choose, crdt, fresh_repo, git, set_base
from safetensors import safe_open
from safetensors.torch import save_file

from git_crdt_merge.replicated.repo import Repo
from git_crdt_merge.resolution.resolve import resolve

SHAPES = {"layer.0.weight": (8, 16), "layer.0.bias": (8,)}


def tensors_of(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {
        n: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()
    }


def write(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A .safetensors file, or with ``config`` a Hugging Face folder with its config.json."""
    if config is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def add(repo: Path, path: Path, *extra: str) -> None:
    crdt(repo, "add-contribution", str(path), "-q", *extra)
    git(repo, "commit", "-q", "-m", f"add {path.name}")


def merged(repo: Path) -> dict[str, torch.Tensor]:
    outcome = resolve(Repo.open(repo))
    with safe_open(str(outcome.output / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(
        a[n].dtype == b[n].dtype and a[n].numpy().tobytes() == b[n].numpy().tobytes()
        if a[n].dtype != torch.bfloat16
        else torch.equal(a[n].view(torch.int16), b[n].view(torch.int16))
        for n in a
    )


def resolve_set(
    tmp: Path,
    label: str,
    base: dict[str, torch.Tensor],
    contributions: list[dict[str, torch.Tensor]],
    strategy: str,
    **params: object,
) -> dict[str, torch.Tensor]:
    repo = fresh_repo(tmp / label)
    set_base(repo, write(tmp / label / ".." / f"{label}-in" / "base.safetensors", base))
    for i, c in enumerate(contributions):
        add(repo, write(tmp / f"{label}-in" / f"c{i}.safetensors", c))
    choose(repo, strategy, **params)
    return merged(repo)


# -- dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "params", "dtype"),
    [("ties", {"density": 0.5}, torch.bfloat16), ("task_arithmetic", {}, torch.float16)],
)
def test_half_precision_fine_tune_on_a_float32_base_equals_the_same_fine_tune_pre_cast(
    tmp_path: Path, strategy: str, params: dict, dtype: torch.dtype
) -> None:
    base = tensors_of(0)
    tuned = {n: t.to(dtype) for n, t in tensors_of(1).items()}
    other = tensors_of(2)
    cast = resolve_set(tmp_path, "cast", base, [tuned, other], strategy, **params)
    pre = {n: t.to(torch.float32) for n, t in tuned.items()}  # exact: every half fits in F32
    precast = resolve_set(tmp_path, "pre", base, [pre, other], strategy, **params)
    assert all(t.dtype == torch.float32 for t in cast.values())  # the base's dtype
    assert same_bytes(cast, precast)


def test_output_dtype_is_one_round_to_nearest_even_cast_of_the_float32_result(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, write(tmp_path / "in" / "base.safetensors", tensors_of(0)))
    add(repo, write(tmp_path / "in" / "a.safetensors", tensors_of(1)))
    add(repo, write(tmp_path / "in" / "b.safetensors", tensors_of(2)))
    choose(repo, "task_arithmetic", **{"lambda": 0.7})
    root_before = Repo.open(repo).read_manifest().merkle_root()
    full = merged(repo)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        crdt(repo, "output-dtype", name)
        out = merged(repo)
        assert all(t.dtype == dtype for t in out.values())
        assert same_bytes(out, {n: t.to(dtype) for n, t in full.items()})  # torch's RNE cast
    shown = json.loads(crdt(repo, "output-dtype", "--json").stdout)
    assert shown == {"output_dtype": "float16"}
    crdt(repo, "output-dtype", "keep")  # back to the source's dtype: the earlier root and bytes
    assert Repo.open(repo).read_manifest().merkle_root() == root_before
    assert same_bytes(merged(repo), full)


def test_unknown_output_dtype_is_a_usage_error_with_a_suggestion(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    proc = crdt(repo, "output-dtype", "bf61", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "did you mean 'bf16'?" in proc.stderr


def test_a_float64_contribution_is_rounded_once_to_float32_compute(tmp_path: Path) -> None:
    base = tensors_of(0)
    wide = {n: t.to(torch.float64) + 1e-12 for n, t in tensors_of(1).items()}
    out = resolve_set(tmp_path, "wide", base, [wide], "task_arithmetic")
    narrowed = {n: t.to(torch.float32) for n, t in wide.items()}
    assert same_bytes(out, resolve_set(tmp_path, "narrow", base, [narrowed], "task_arithmetic"))


# -- resized vocabulary ---------------------------------------------------------------------
def vocab_model(seed: int, rows: int, head: bool = True) -> dict[str, torch.Tensor]:
    shapes = {"model.embed_tokens.weight": (rows, 4), "model.norm.weight": (4,)}
    if head:
        shapes["lm_head.weight"] = (rows, 4)
    return tensors_of(seed, shapes)


def test_resized_vocabulary_rows_are_merged_where_they_overlap_and_new_rows_averaged(
    tmp_path: Path,
) -> None:
    base, grown, same, shrunk = (
        vocab_model(0, 10),
        vocab_model(1, 12),  # two new tokens
        vocab_model(2, 10),
        vocab_model(3, 8),  # lacks two of the base's tokens
    )
    out = resolve_set(tmp_path, "v", base, [grown, same, shrunk], "task_arithmetic")
    # the rule, spelled out: a contribution lacking base rows takes the base's rows there
    padded = {n: t.clone() for n, t in shrunk.items()}
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        padded[n] = torch.cat([shrunk[n], base[n][8:]])
    head_only = {n: (t[:10] if t.shape[0] == 12 else t) for n, t in grown.items()}
    ref = resolve_set(tmp_path, "ref", base, [head_only, same, padded], "task_arithmetic")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert list(out[n].shape) == [12, 4]
        assert torch.equal(out[n][:10], ref[n])  # the strategy over the base's rows
        assert torch.equal(out[n][10:], grown[n][10:])  # new rows of one contribution: copied
    assert torch.equal(out["model.norm.weight"], ref["model.norm.weight"])


def test_new_rows_of_several_contributions_are_their_weighted_mean(tmp_path: Path) -> None:
    a, b = vocab_model(1, 6, head=False), vocab_model(2, 9, head=False)
    c = vocab_model(3, 9, head=False)
    repo = fresh_repo(tmp_path / "repo")
    for path, m, w in (("a", a, "1"), ("b", b, "1"), ("c", c, "3")):
        add(repo, write(tmp_path / "in" / f"{path}.safetensors", m), "--weight", w)
    out = merged(repo)["model.embed_tokens.weight"]  # linear, no base
    name = "model.embed_tokens.weight"
    expected = b[name][6:] * torch.tensor(0.25) + c[name][6:] * torch.tensor(0.75)
    assert torch.equal(out[6:], expected)
    assert out.shape == (9, 4)


# -- tied heads -----------------------------------------------------------------------------
def test_a_tied_contribution_without_lm_head_uses_its_embedding(tmp_path: Path) -> None:
    base, tied = vocab_model(0, 10), vocab_model(1, 10, head=False)
    out = resolve_set(tmp_path, "t", base, [tied], "task_arithmetic")
    explicit = {**tied, "lm_head.weight": tied["model.embed_tokens.weight"].clone()}
    assert same_bytes(out, resolve_set(tmp_path, "e", base, [explicit], "task_arithmetic"))


def test_an_untied_contribution_without_lm_head_is_refused_naming_the_tensor(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, write(tmp_path / "in" / "base.safetensors", vocab_model(0, 10)))
    untied = write(
        tmp_path / "in" / "untied", vocab_model(1, 10, head=False), {"tie_word_embeddings": False}
    )
    add(repo, untied)
    choose(repo, "task_arithmetic")
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9 and proc.stderr.count("\n") == 1
    assert "lacks tensor 'lm_head.weight' but its config.json says tie_word_embeddings" in (
        proc.stderr
    )


def test_a_contribution_with_its_own_head_over_a_tied_base_is_refused(tmp_path: Path) -> None:
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, write(tmp_path / "in" / "base.safetensors", vocab_model(0, 10, head=False)))
    add(repo, write(tmp_path / "in" / "a.safetensors", vocab_model(1, 10)))
    choose(repo, "task_arithmetic")
    proc = crdt(repo, "resolve", check=False)
    assert proc.returncode == 9 and proc.stderr.count("\n") == 1
    assert "has its own 'lm_head.weight' but the base ties the head" in proc.stderr


# -- still refused ----------------------------------------------------------------------------
def test_other_shape_differences_are_refused_naming_the_tensor_and_both_shapes(
    tmp_path: Path,
) -> None:
    repo = fresh_repo(tmp_path / "repo")
    set_base(repo, write(tmp_path / "in" / "base.safetensors", vocab_model(0, 10)))
    wrong = vocab_model(1, 10)
    wrong["model.embed_tokens.weight"] = torch.zeros(10, 5)  # not the row count: the width
    proc = crdt(
        repo, "add-contribution", str(write(tmp_path / "in" / "w.safetensors", wrong)), check=False
    )
    assert proc.returncode == 4 and proc.stderr.count("\n") == 1
    assert "tensor 'model.embed_tokens.weight' has shape [10, 5]" in proc.stderr
    assert "[10, 4] in the base" in proc.stderr
