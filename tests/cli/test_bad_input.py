"""Bad input of every kind: a one-line error with its documented exit code, and nothing lost or
written (manifest, index and object database unchanged, earlier contributions intact)."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import crdt, git, make_model, new_repo
from typer.testing import CliRunner

from git_crdt_merge import errors
from git_crdt_merge.cli.app import app
from git_crdt_merge.replicated.checks import count_nonfinite
from git_crdt_merge.replicated.repo import Repo

SHAPES = {"layer.0.weight": (8, 16), "layer.0.bias": (8,), "head.weight": (4, 8)}


def raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """A safetensors file written by hand, so that any tensor name can be tried."""
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(t[2] for t in tensors.values()))
    return path


def one_tensor(tmp: Path, name: str) -> Path:
    return raw_safetensors(tmp / "named.safetensors", {name: ("F32", [2], b"\x00" * 8)})


def with_value(tmp: Path, value: float, dtype: str) -> Path:
    import torch

    path = make_model(tmp / f"bad-{dtype}.safetensors", 5, SHAPES, dtype=dtype)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["layer.0.weight"][3, 4] = value
    save_file(tensors, str(path))
    assert tensors["layer.0.weight"].dtype == getattr(torch, dtype)
    return path


def pickle_named_safetensors(tmp: Path) -> Path:
    import torch

    path = tmp / "really-a-pickle.safetensors"
    torch.save({"w": torch.zeros(2)}, str(path))
    return path


def safetensors_named_pt(tmp: Path) -> Path:
    src = make_model(tmp / "st.safetensors", 3, SHAPES)
    path = tmp / "model.pt"
    path.write_bytes(src.read_bytes())
    return path


def symlink(tmp: Path) -> Path:
    src = make_model(tmp / "target.safetensors", 4, SHAPES)
    link = tmp / "link.safetensors"
    link.symlink_to(src)
    return link


def not_utf8(tmp: Path) -> Path:
    path = tmp / "u.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b'{"\xff}')
    return path


def lora_dir(tmp: Path) -> Path:
    d = tmp / "adapter"
    make_model(d / "adapter_model.safetensors", 6, SHAPES)
    (d / "adapter_config.json").write_text("{}")
    return d


Case = tuple[str, Callable[[Path], Path], list[str], int, str]
CASES: list[Case] = [
    ("NaN in float32", lambda t: with_value(t, float("nan"), "float32"), [], 4, "NaN or infinite"),
    ("Inf in bfloat16", lambda t: with_value(t, float("inf"), "bfloat16"), [], 4, "NaN or infin"),
    (
        "shape differs from the set",
        lambda t: make_model(t / "s.safetensors", 7, {**SHAPES, "head.weight": (4, 9)}),
        [],
        4,
        "has shape [4, 9]",
    ),
    (
        "integer dtype where the set has float (float dtypes are cast, integers are not)",
        lambda t: make_model(t / "h.safetensors", 7, SHAPES, dtype="int32"),
        [],
        4,
        "has dtype I32",
    ),
    (
        "tensor missing",
        lambda t: make_model(t / "l.safetensors", 7, {"layer.0.weight": (8, 16)}),
        [],
        4,
        "lacks tensor",
    ),
    ("adapter config without a rank", lora_dir, [], 4, "r must be a positive integer"),
    ("pickle named .safetensors", pickle_named_safetensors, [], 4, "is a pickled checkpoint"),
    ("safetensors named .pt", safetensors_named_pt, [], 4, "is a safetensors file despite"),
    ("symlink", symlink, [], 4, "symbolic link"),
    ("tensor name with /", lambda t: one_tensor(t, "a/b"), [], 4, "path separator"),
    ("tensor name with ..", lambda t: one_tensor(t, "a..b"), [], 4, "path separator or '..'"),
    ("tensor name with control", lambda t: one_tensor(t, "a\x07b"), [], 4, "control character"),
    ("huge tensor name", lambda t: one_tensor(t, "w" * 5000), [], 4, "length 5000"),
    ("empty model", lambda t: raw_safetensors(t / "e.safetensors", {}), [], 4, "holds no tensors"),
    ("header not UTF-8", lambda t: not_utf8(t), [], 4, "header is not JSON"),
    ("contribution name with /", lambda t: GOOD, ["--name", "a/b"], 4, "path separator"),
    ("contribution name ..", lambda t: GOOD, ["--name", ".."], 4, "path separator"),
    ("contribution name control", lambda t: GOOD, ["--name", "a\tb"], 4, "control character"),
    ("huge contribution name", lambda t: GOOD, ["--name", "n" * 300], 4, "1 to 200 characters"),
    ("object size limit", lambda t: GOOD, ["--chunk-size", str(2**31)], 2, "chunk-size"),
]
GOOD = Path("/nonexistent")  # replaced by a model compatible with the set in the test


def snapshot(repo: Path) -> tuple[bytes, str, int]:
    objects = sum(1 for p in (repo / ".git" / "objects").rglob("*") if p.is_file())
    return (repo / ".crdt" / "manifest").read_bytes(), git(repo, "ls-files", "-s").stdout, objects


_SHARED: list[tuple[Path, Path]] = []


@pytest.fixture
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One repository with one contribution, shared by the tests of this module: each test
    proves it leaves it unchanged."""
    if not _SHARED:
        tmp = tmp_path_factory.mktemp("bad-input")
        repo = new_repo(tmp / "repo")
        git(repo, "config", "crdt.autoResolve", "false")
        crdt(repo, "add-contribution", str(make_model(tmp / "first.safetensors", 9, SHAPES)), "-q")
        git(repo, "commit", "-q", "-m", "first")
        _SHARED.append((repo, tmp))
    return _SHARED[0]


@pytest.mark.parametrize(("what", "make", "args", "code", "text"), CASES, ids=[c[0] for c in CASES])
def test_bad_model_is_a_one_line_error_that_writes_nothing(
    shared: tuple[Path, Path],
    tmp_path: Path,
    what: str,
    make: Callable[[Path], Path],
    args: list[str],
    code: int,
    text: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, _ = shared
    path = make(tmp_path)
    if path == GOOD:
        path = make_model(tmp_path / "good.safetensors", 11, SHAPES)
    before = snapshot(repo)
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(app, ["add-contribution", str(path), *args])  # in-process: fast
    assert result.exit_code == code, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    if code == errors.InputError.exit_code:
        assert len(lines) == 1 and lines[0].startswith("git-crdt: error: "), result.stderr
    assert text in result.stderr
    assert result.stdout == ""
    assert snapshot(repo) == before
    assert [name for _, name in Repo.open(repo).read_manifest().visible_contributions()] == [
        "first"
    ]


def test_bad_model_through_git_crdt_is_one_line_without_traceback(
    shared: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, _ = shared
    before = snapshot(repo)
    for path in (pickle_named_safetensors(tmp_path), with_value(tmp_path, float("inf"), "float16")):
        proc = subprocess.run(
            ["git", "crdt", "add-contribution", str(path)], cwd=repo, capture_output=True, text=True
        )
        assert proc.returncode == errors.InputError.exit_code
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert snapshot(repo) == before


def test_nonfinite_values_are_stored_when_allowed(
    shared: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, _ = shared
    path = with_value(tmp_path, float("nan"), "float32")
    proc = crdt(repo, "add-contribution", str(path), "--allow-nonfinite", "--name", "nan", "--json")
    assert json.loads(proc.stdout)["tensors"] == 3
    crdt(repo, "remove-contribution", "nan")


def test_base_that_does_not_match_the_contributions_is_refused(
    shared: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, _ = shared
    before = snapshot(repo)
    other = make_model(tmp_path / "base.safetensors", 1, {**SHAPES, "layer.0.bias": (9,)})
    proc = crdt(repo, "set-base", str(other), check=False)
    assert proc.returncode == errors.InputError.exit_code
    assert "tensor 'layer.0.bias' has shape [8] in contribution 'first'" in proc.stderr
    assert "[9] in the base" in proc.stderr
    assert snapshot(repo) == before


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["strategy", "no_such_strategy"], errors.ResolveError.exit_code, "unknown strategy"),
        (["strategy", "linear", "-p", "bogus=1"], errors.ResolveError.exit_code, "unknown param"),
        (["strategy", "ties", "-p", "density=[1"], errors.ResolveError.exit_code, "density"),
    ],
)
def test_unknown_strategy_or_parameter_is_refused(
    shared: tuple[Path, Path],
    args: list[str],
    code: int,
    text: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, _ = shared
    before = snapshot(repo)
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code and text in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(repo) == before


def test_manifest_line_longer_than_the_limit_is_a_manifest_error(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    line = json.dumps({"op": "add", "message": "x" * 70000}, separators=(",", ":"))
    (repo / ".crdt" / "manifest").write_text(line + "\n")
    proc = crdt(repo, "status", check=False)
    assert proc.returncode == errors.ManifestError.exit_code
    assert ".crdt/manifest:1: line longer than 65536 bytes" in proc.stderr


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3"])
def test_nonfinite_count_reads_the_bit_patterns_of_every_float_format(dtype: str) -> None:
    bits = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E5M2": 8, "F8_E4M3": 8}[dtype]
    exp = {"F64": 11, "F32": 8, "F16": 5, "BF16": 8, "F8_E5M2": 5, "F8_E4M3": 4}[dtype]
    utype = {64: np.uint64, 32: np.uint32, 16: np.uint16, 8: np.uint8}[bits]
    mant = bits - 1 - exp
    all_ones = ((1 << exp) - 1) << mant
    nan = all_ones | ((1 << mant) - 1)
    largest_finite = all_ones - (1 if dtype == "F8_E4M3" else (1 << mant))
    values = np.array([0, 1, largest_finite, nan, nan | (1 << (bits - 1))], dtype=utype)
    assert count_nonfinite(dtype, memoryview(values.tobytes())) == 2
    assert count_nonfinite(dtype, memoryview(values[:3].tobytes())) == 0


def test_nonfinite_count_covers_every_block_of_a_large_tensor() -> None:
    """Blocks of a large tensor are counted in parallel: a NaN or Inf in any of them counts."""
    values = np.zeros(9_000_001, dtype=np.uint16)  # BF16 zeros, three blocks of 4M elements
    for at, bits in ((0, 0x7FC0), (5_000_000, 0x7F80), (9_000_000, 0xFF81)):
        values[at] = bits
    assert count_nonfinite("BF16", memoryview(values.tobytes())) == 3
    floats = np.ones(9_000_001, dtype=np.float32)
    floats[[1, 4_200_000, 8_999_999]] = [np.inf, np.nan, -np.inf]
    assert count_nonfinite("F32", memoryview(floats.tobytes())) == 3


def _nonfinite_reference(dtype: str, patterns: np.ndarray) -> np.ndarray:
    """Which bit patterns are NaN or infinite, by each format's own definition."""
    if dtype == "F16":
        return ~np.isfinite(patterns.astype(np.uint16).view(np.float16))
    if dtype == "BF16":  # bf16 is the top half of a float32
        return ~np.isfinite((patterns.astype(np.uint32) << 16).view(np.float32))
    if dtype == "F8_E5M2":  # the top byte of a float16
        return ~np.isfinite((patterns.astype(np.uint16) << 8).view(np.float16))
    return (patterns & 0x7F) == 0x7F  # F8_E4M3 ("fn"): no Inf, NaN is S.1111.111


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F8_E5M2", "F8_E4M3"])
def test_nonfinite_count_is_exact_for_every_bit_pattern(dtype: str) -> None:
    """Every pattern alone (the two-maxima test that skips a finite block) and all together."""
    utype = np.uint8 if dtype.startswith("F8") else np.uint16
    patterns = np.arange(np.iinfo(utype).max + 1, dtype=np.int64).astype(utype)
    want = _nonfinite_reference(dtype, patterns)
    got = [
        count_nonfinite(dtype, memoryview(patterns[i : i + 1].tobytes()))
        for i in range(len(patterns))
    ]
    assert got == want.astype(int).tolist()
    assert count_nonfinite(dtype, memoryview(patterns.tobytes())) == int(want.sum())


def test_nonfinite_count_of_wide_floats_at_the_edges_of_the_exponent() -> None:
    for dtype, ftype in (("F32", np.float32), ("F64", np.float64)):
        info = np.finfo(ftype)
        finite = np.array([info.max, -info.max, info.tiny, -0.0, 0.0, 1.0], dtype=ftype)
        assert count_nonfinite(dtype, memoryview(finite.tobytes())) == 0
        for bad in (np.inf, -np.inf, np.nan, -np.nan):
            values = np.append(finite, ftype(bad))
            assert count_nonfinite(dtype, memoryview(values.tobytes())) == 1, (dtype, bad)
