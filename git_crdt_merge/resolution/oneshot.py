"""``git crdt merge RECIPE.yml -o OUT``: a one-shot merge of loose models, no repository.

The recipe's models (safetensors files, Hugging Face folders) are described exactly as
``add-contribution`` and ``set-base`` would describe them (same chunking, same ids; names
from their paths, weights from the recipe), the registers are those ``recipe import`` would
write, and the set lives in an in-memory manifest over a :class:`LooseStore`.  The same plan
and engine then compute the model, so its bytes, Merkle root and seeds equal those of a
repository holding the same contributions and registers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, ResolveError
from ..replicated import checks, formats
from ..replicated.contributions import default_name, plan_descriptor, store_descriptor
from ..replicated.loose import LooseStore
from ..replicated.manifest import Manifest, add_record, check_name
from ..replicated.repo import new_tag
from ..replicated.store import DEFAULT_CHUNK_SIZE
from ..vocabulary import COMPUTE_DTYPE_NAMES
from . import cache
from .recipe import (
    FLOAT_NAMES,
    contributions_of,
    load_yaml,
    output_dtype_for,
    parse_recipe,
    register_value,
)
from .resolve import check_memory

_REPLICA = "0" * 16  # registers of a set that exists only here; the replica is not in the root


@dataclass
class OneShot:
    root: str
    output: Path | None
    plan: dict[str, Any] | None = None  # the dry run's plan

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merkle_root": self.root}
        if self.output is not None:
            out["output"] = str(self.output)
        if self.plan is not None:
            out["plan"] = self.plan
        return out


def _source(model: str, where: str, allow_pickle: bool) -> formats.ModelSource:
    path = Path(model)
    if not path.exists():
        raise InputError(
            f"{where}: model {model!r} is not a local path (download it first, e.g. with "
            "'huggingface-cli download', and name the folder)"
        )
    return formats.discover(path, allow_pickle=allow_pickle)


def loose_set(
    recipe_path: Path, *, allow_pickle: bool = False, allow_nonfinite: bool = False
) -> tuple[LooseStore, Manifest]:
    """The recipe's models in a :class:`LooseStore` and the manifest of that set."""
    where = str(recipe_path)
    recipe = parse_recipe(load_yaml(recipe_path), where)
    models = contributions_of(recipe)
    names = [default_name(Path(m.model.rstrip("/"))) for m in models]
    for name in names:
        check_name(name, "model name")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{where}: two models have the name {dup!r} (their last path part)")
    value, weights = register_value(recipe, names, where)
    store = LooseStore()
    manifest = Manifest()
    records = []
    dtypes: set[str] = set()
    for model, name, weight in zip(models, names, weights, strict=True):
        source = _source(model.model, where, allow_pickle)
        checks.scan_source(source, allow_nonfinite=allow_nonfinite)
        plan = plan_descriptor(source, weight=weight)
        address, _, _ = store_descriptor(store, plan, chunk_size=DEFAULT_CHUNK_SIZE)
        records.append(add_record(new_tag(), plan.id, name, desc=address))
        dtypes |= {FLOAT_NAMES[t.dtype] for t in plan.tensors if t.dtype in FLOAT_NAMES}
    manifest = manifest.with_records(records)
    manifest = manifest.write_register("strategy", value, _REPLICA)
    if recipe.base is not None:
        source = _source(recipe.base, where, allow_pickle)
        checks.scan_source(source, allow_nonfinite=allow_nonfinite)
        plan = plan_descriptor(source, weight=None)
        address, _, _ = store_descriptor(store, plan, chunk_size=DEFAULT_CHUNK_SIZE)
        manifest = manifest.write_register("base", {"desc": address, "id": plan.id}, _REPLICA)
    dtype = output_dtype_for(recipe, dtypes.pop() if len(dtypes) == 1 else None, None)
    if dtype is not None:  # as 'recipe import' writes it in a repository: the same root
        manifest = manifest.write_register("output_dtype", dtype, _REPLICA)
    return store, manifest


def _replace_output(work: Path, output: Path, force: bool) -> None:
    """Move the finished ``work`` folder to ``output``: a missing or empty folder, or with
    ``force`` an earlier output (a folder holding our ``resolution.json``)."""
    if output.is_symlink():
        raise InputError(f"{output} is a symbolic link; refusing to write through it")
    if output.exists():
        if not output.is_dir():
            raise InputError(f"{output} exists and is not a folder")
        if any(output.iterdir()):
            if not force:
                raise InputError(f"{output} is not empty (pass --force to replace a merge)")
            if not (output / cache.RESOLUTION_FILE).is_file():
                raise InputError(f"{output} holds no {cache.RESOLUTION_FILE}: not a merge output")
            shutil.rmtree(output)
        else:
            output.rmdir()
    os.replace(work, output)


def merge(
    recipe_path: Path,
    output: Path | None,
    *,
    dry_run: bool = False,
    force: bool = False,
    device: str = "cpu",
    compute_dtype: str = "float32",
    max_shard: int = cache.DEFAULT_MAX_SHARD,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> OneShot:
    """Merge the recipe's loose models into ``output`` (or, with ``dry_run``, only plan)."""
    from . import engine
    from .dryrun import describe_plan

    if compute_dtype not in COMPUTE_DTYPE_NAMES:
        raise ResolveError(f"compute dtype must be float32 or float64, not {compute_dtype!r}")
    if max_shard < 1:
        raise ResolveError(f"the maximum shard size must be at least 1 byte, not {max_shard}")
    if output is None and not dry_run:
        raise InputError("give the output folder with -o OUT")
    if device == "cuda" and not engine.torch.cuda.is_available():
        raise ResolveError("--device cuda: no CUDA device is available")
    store, manifest = loose_set(
        recipe_path, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite
    )
    plan = engine.make_plan(store, manifest)
    if dry_run:
        return OneShot(plan.root, None, describe_plan(plan))
    assert output is not None
    check_memory(plan.largest_input(), len(plan.descriptors) + 1)
    if on_start is not None:
        on_start(sum(s.nbytes for s in plan.specs))
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        engine.compute(
            plan, store, work, cache.Settings(device, compute_dtype, max_shard, 1), progress
        )
        _replace_output(work, output, force)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return OneShot(plan.root, output)
