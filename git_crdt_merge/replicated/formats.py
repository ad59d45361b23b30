"""Reading model files: safetensors files, Hugging Face directories, LoRA adapters, and
(only on request) pickled checkpoints.

Safetensors files are read without torch: the JSON header gives each tensor's byte range,
and the bytes are taken from a memory map, so ingest never converts or copies a tensor.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import lfs

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_NAME = 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files of a Hugging Face directory that decide how the model loads (config, tokenizer).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
AUX_FILES = (*CONFIG_FILES, *TOKENIZER_FILES, "adapter_config.json")
# Files that are program code: stored only when the user asks (``--include-code``), because a
# merged/ folder holding them runs them under ``from_pretrained(..., trust_remote_code=True)``.
CODE_SUFFIXES = (".py", ".pyc", ".so", ".dll", ".dylib", ".sh", ".exe", ".bat", ".js", ".ipynb")
# Weight files are read as tensors, never kept as side files.
WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".gguf", ".h5", ".msgpack", ".onnx")
MAX_SIDE_FILES = 256
MAX_AUX_BYTES = 64 * 1024 * 1024


@dataclass
class TensorData:
    name: str
    dtype: str
    shape: list[int]
    data: memoryview  # raw little-endian bytes
    # where ``data`` lies in a safetensors file (lfs storage stores a model that is already an
    # LFS object as slices of it: store.py)
    file: Path | None = None
    offset: int = 0


@dataclass
class ModelSource:
    """What ``add-contribution`` reads: tensor files plus auxiliary files."""

    path: Path
    kind: str  # "full" | "lora"
    files: list[Path]
    aux: dict[str, Path] = field(default_factory=dict)
    pickled: bool = False
    skipped: list[str] = field(default_factory=list)  # files of the folder not kept, and why

    @property
    def code(self) -> list[str]:
        """The program code files kept (only with ``--include-code``)."""
        return sorted(n for n in self.aux if is_code(n))

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def check_tensor_name(name: str) -> None:
    if not name or len(name) > MAX_TENSOR_NAME:
        raise InputError(f"tensor name of length {len(name)} (1 to {MAX_TENSOR_NAME} allowed)")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError(f"tensor name {name!r} contains a control character")
    if "/" in name or "\\" in name or ".." in name:
        raise InputError(f"tensor name {name!r} contains a path separator or '..'")
    if name == "__metadata__":  # the safetensors header's own key: no reader could load it
        raise InputError("tensor name '__metadata__' is reserved by the safetensors format")


def _no_symlink(path: Path) -> None:
    if path.is_symlink():
        raise InputError(f"{path}: is a symbolic link; pass the file it points to")


def _looks_like_safetensors(path: Path) -> bool:
    """True if ``path`` starts with a valid safetensors header (whatever its name says)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            head = fh.read(8)
            if len(head) < 8:
                return False
            (hlen,) = struct.unpack("<Q", head)
            if not 2 <= hlen <= min(MAX_HEADER_BYTES, size - 8):
                return False
            return isinstance(json.loads(fh.read(hlen)), dict)
    except (OSError, ValueError):
        return False


def is_code(name: str) -> bool:
    return name.casefold().endswith(CODE_SUFFIXES)


def side_files(path: Path, *, include_code: bool = False) -> tuple[dict[str, Path], list[str]]:
    """The non-weight files of a model folder kept with it (config, tokenizer, README.md,
    preprocessor_config.json, ...: every regular top-level file up to ``MAX_AUX_BYTES``), and
    one line for each entry left out: weights, sub-folders, links, hidden files, code files
    (unless ``include_code``), files over the size limit."""
    aux: dict[str, Path] = {}
    skipped: list[str] = []
    for f in sorted(path.iterdir()):
        name = f.name
        low = name.casefold()
        if f.is_symlink():
            skipped.append(f"{name} (a symbolic link)")
        elif f.is_dir():
            skipped.append(f"{name}/ (a folder)")
        elif not f.is_file():
            skipped.append(f"{name} (not a regular file)")
        elif low.endswith(WEIGHT_SUFFIXES) or low.endswith(".safetensors.index.json"):
            continue  # the weights themselves
        elif low == "resolution.json":
            skipped.append(f"{name} (the name of the merged model's own record)")
        elif name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name):
            skipped.append(f"{name} (a hidden or oddly named file)")
        elif is_code(name) and not include_code:
            skipped.append(f"{name} (program code; pass --include-code to keep it)")
        elif is_code(name) and f.stat().st_size <= MAX_AUX_BYTES and len(aux) < MAX_SIDE_FILES:
            aux[name] = f  # asked for: kept, and said (ModelSource.code)
        elif f.stat().st_size > MAX_AUX_BYTES:
            if name in AUX_FILES:
                raise InputError(f"{f}: larger than {MAX_AUX_BYTES} bytes")
            skipped.append(f"{name} (larger than {MAX_AUX_BYTES} bytes)")
        elif len(aux) >= MAX_SIDE_FILES:
            skipped.append(f"{name} (more than {MAX_SIDE_FILES} side files)")
        else:
            aux[name] = f
    return aux, skipped


def discover(path: Path, *, allow_pickle: bool = False, include_code: bool = False) -> ModelSource:
    """Find the weight files of PATH (a file or a Hugging Face / PEFT directory), and the
    side files kept with them (:func:`side_files`)."""
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: no such file or directory")
    _no_symlink(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            if _looks_like_safetensors(path):
                raise InputError(
                    f"{path}: is a safetensors file despite its {path.suffix} name; rename it "
                    "to .safetensors"
                )
            if lfs.is_pointer_file(path):
                raise InputError(lfs_pointer_message(path))
            if not allow_pickle:
                raise InputError(
                    f"{path}: pickled checkpoints can run code when loaded; convert it to "
                    "safetensors or pass --allow-pickle (loads with weights_only=True)"
                )
            return ModelSource(path, "full", [path], pickled=True)
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: not a .safetensors file or model directory")
        return ModelSource(path, "full", [path])
    if not path.is_dir():
        raise InputError(f"{path}: not a regular file or directory")
    aux, skipped = side_files(path, include_code=include_code)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        _no_symlink(index)
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = []
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or ".." in shard:
                raise InputError(f"{index}: shard name {shard!r} is not a plain file name")
            f = path / shard
            if not f.is_file():
                raise InputError(f"{index}: shard {shard} is missing")
            _no_symlink(f)
            files.append(f)
        return ModelSource(path, "full", files, aux, skipped=skipped)
    for name, kind in (("model.safetensors", "full"), ("adapter_model.safetensors", "lora")):
        f = path / name
        if f.is_file():
            _no_symlink(f)
            if kind == "lora" and "adapter_config.json" not in aux:
                raise InputError(f"{path}: a LoRA adapter folder needs its adapter_config.json")
            return ModelSource(path, kind, [f], aux, skipped=skipped)
    pickles = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    if pickles:
        if not allow_pickle:
            raise InputError(
                f"{path}: holds only pickled weights ({pickles[0].name}); convert to safetensors "
                "or pass --allow-pickle (loads with weights_only=True)"
            )
        return ModelSource(path, "full", pickles, aux, pickled=True, skipped=skipped)
    raise InputError(
        f"{path}: no model.safetensors, model.safetensors.index.json or adapter_model.safetensors"
    )


def lfs_pointer_message(path: Path) -> str:
    return (
        f"{path}: is a Git LFS pointer file, not the model (its bytes were not downloaded): "
        f"run 'git lfs pull --include={path.name}' (or 'git lfs pull'), then add it again"
    )


def parse_header(buf: bytes | mmap.mmap, path: Path) -> tuple[dict[str, Any], int]:
    """Validate a safetensors header; return (header, offset of the data section)."""
    size = len(buf)
    if size < 8:
        raise InputError(f"{path}: too short to be a safetensors file")
    (hlen,) = struct.unpack("<Q", buf[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
        if bytes(buf[: len(lfs.POINTER_VERSION)]) == lfs.POINTER_VERSION:
            raise InputError(lfs_pointer_message(path))
        if bytes(buf[:4]) == b"PK\x03\x04" or bytes(buf[:1]) == b"\x80":
            raise InputError(
                f"{path}: is a pickled checkpoint (torch.save), not safetensors despite its name; "
                "convert it to safetensors (or rename it .pt and pass --allow-pickle)"
            )
        raise InputError(f"{path}: not a safetensors file (header length {hlen} is invalid)")
    try:
        header = json.loads(bytes(buf[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not an object)")
    start = 8 + hlen
    data_len = size - start
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise InputError(f"{path}: __metadata__ must map strings to strings")
            continue
        check_tensor_name(name)
        try:
            dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPE_SIZES:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InputError(f"{path}: tensor {name!r} has an invalid shape")
        n = 1
        for d in shape:
            n *= d
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= data_len):
            raise InputError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        if hi - lo != n * DTYPE_SIZES[dtype]:
            raise InputError(f"{path}: tensor {name!r} has {hi - lo} bytes for shape {shape}")
        spans.append((lo, hi))
    spans.sort()
    pos = 0
    for lo, hi in spans:
        if lo != pos:
            raise InputError(f"{path}: tensor data overlaps or leaves gaps")
        pos = hi
    if pos != data_len:
        raise InputError(f"{path}: {data_len - pos} trailing bytes after the tensor data")
    return header, start


def _map_readonly(fd: int) -> mmap.mmap:
    """A read-only map of a whole file, pre-faulted where the OS can (MAP_POPULATE): hashing
    then never stops on a page fault, which costs more than the hashing at these speeds."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        try:
            return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
        except OSError:
            pass
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


def iter_safetensors(path: Path) -> Iterator[TensorData]:
    """Yield the tensors of one file as memory-mapped byte views, in file order."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise InputError(f"{path}: empty file")
        mm = _map_readonly(fh.fileno())
    header, start = parse_header(mm, path)
    view = memoryview(mm)
    items = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    for name, info in items:
        lo, hi = info["data_offsets"]
        yield TensorData(
            name,
            info["dtype"],
            list(info["shape"]),
            view[start + lo : start + hi],
            path,
            start + lo,
        )


def file_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return {}
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES:
            return {}
        try:
            meta = json.loads(fh.read(hlen)).get("__metadata__", {})
        except (ValueError, AttributeError):
            return {}
    return meta if isinstance(meta, dict) else {}


def iter_pickled(path: Path) -> Iterator[TensorData]:
    """Load a pickled state dict with ``weights_only=True`` (no arbitrary code)."""
    import torch

    from .tensorio import TORCH_TO_NAME

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or hostile pickle
        msg = f"{path}: cannot load with weights_only=True: {exc}".splitlines()[0]
        raise InputError(msg) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{path}: does not hold a state dict of tensors")
    for name, t in sorted(obj.items()):
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InputError(f"{path}: entry {name!r} is not a tensor")
        check_tensor_name(name)
        t = t.detach().contiguous()
        if t.dtype not in TORCH_TO_NAME:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        yield TensorData(name, TORCH_TO_NAME[t.dtype], list(t.shape), memoryview(raw))


def iter_tensors(source: ModelSource) -> Iterator[TensorData]:
    """All tensors of a model source; a name appearing twice is an error."""
    seen: set[str] = set()
    for f in source.files:
        it = iter_pickled(f) if source.pickled else iter_safetensors(f)
        for t in it:
            if t.name in seen:
                raise InputError(f"{source.path}: tensor {t.name!r} appears in two files")
            seen.add(t.name)
            yield t
    if not seen:
        raise InputError(f"{source.path}: holds no tensors")
