"""Recipes: mergekit's YAML (``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype``) read into the strategy register and contribution weights, and written back.

A recipe is user input and may come from anywhere: it is read bounded (1 MiB), its YAML is
checked event by event before anything is built (no aliases, no tags outside the core schema,
nesting and node counts bounded), then loaded with ``yaml.safe_load``.  Nothing in it is
executed; every key and parameter is checked against the strategy's declaration.

Mapping (docs/recipes.md):

- ``merge_method`` names a registered strategy; mergekit's 20 method names are ours.
- ``models[].model`` is matched to a visible contribution by name, else by the name
  ``add-contribution`` gives that path by default (its last component, without
  ``.safetensors``); the entry equal to ``base_model`` is the base, not a contribution.
- ``models[].parameters.weight`` is the contribution's weight (default 1.0); the other
  per-model parameters become per-contribution values (by name); top-level ``parameters``
  are the strategy's.  Gradients (lists) and ``filter``/``value`` lists become the per-tensor
  form of :mod:`..strategies.layered`.  ``int8_mask`` (only the dtype of mergekit's mask) is
  accepted and ignored.
- ``dtype`` is the merged model's float dtype: the ``output_dtype`` register
  (``git crdt output-dtype``), written only where it changes something (a recipe whose
  ``dtype`` is already every model's dtype leaves the register, and the Merkle root, as they
  are).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import bounded
from ..errors import CrdtError, InputError, ResolveError
from ..replicated import checks, contributions
from ..replicated.contributions import default_name
from ..replicated.manifest import Manifest
from ..replicated.reader import read_descriptor
from ..replicated.repo import Repo
from ..replicated.store import ObjectStore
from ..strategies import layered
from ..vocabulary import OUTPUT_DTYPES

MAX_RECIPE_BYTES = 1024 * 1024
MAX_RECIPE_DEPTH = 16
MAX_RECIPE_NODES = 100_000
MAX_MODELS = 1024
TOP_KEYS = ("base_model", "dtype", "merge_method", "models", "parameters")
MODEL_KEYS = ("model", "parameters")
# mergekit keys this tool knows but does not offer: the reason, shown in the error
UNSUPPORTED_KEYS = {
    "slices": "layer slices (stacking layers) are not supported",
    "tokenizer_source": "the tokenizer comes from the base (see docs/format.md)",
    "tokenizer": "the tokenizer comes from the base (see docs/format.md)",
    "chat_template": "the chat template comes from the base's files",
}
# mergekit parameters with no effect on the merged values: accepted and dropped
IGNORED_PARAMS = {"int8_mask": "only the dtype of mergekit's sign mask"}
DTYPES = tuple(OUTPUT_DTYPES)  # bfloat16, float16, float32, float64
FLOAT_NAMES = {st: name for name, st in OUTPUT_DTYPES.items()}  # "BF16" -> "bfloat16", ...
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
_CORE_TAGS = {
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")
}


@dataclass
class RecipeModel:
    model: str
    weight: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    method: str
    base: str | None
    models: list[RecipeModel]
    params: dict[str, Any]
    dtype: str | None = None
    ignored: list[str] = field(default_factory=list)  # parameters accepted and dropped


def _check_events(text: str, where: str) -> None:
    """Refuse what a recipe never needs before building any object: aliases (the
    exponential "billion laughs"), tags outside the core schema (``!!python/object``), deep
    nesting, too many nodes."""
    depth = nodes = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1 if event.start_mark else 0
            if isinstance(event, yaml.AliasEvent):
                raise InputError(f"{where}:{line}: YAML aliases (*name) are not allowed")
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in _CORE_TAGS and tag != "!":
                raise InputError(f"{where}:{line}: the YAML tag {tag!r} is not allowed")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_RECIPE_DEPTH:
                    raise InputError(f"{where}:{line}: nested deeper than {MAX_RECIPE_DEPTH}")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_RECIPE_NODES:
                    raise InputError(f"{where}: more than {MAX_RECIPE_NODES} YAML nodes")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise InputError(f"{where}{at}: not valid YAML ({problem})") from None


def load_yaml(path: Path) -> Any:
    """The YAML document at ``path``, read bounded and checked (:func:`_check_events`)."""
    where = str(path)
    try:
        data = bounded.read_regular(path.resolve(), MAX_RECIPE_BYTES, where, InputError)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text") from None
    return parse_yaml(text, where)


def parse_yaml(text: str, where: str = "recipe") -> Any:
    if len(text.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise InputError(f"{where} is larger than the limit of {MAX_RECIPE_BYTES} bytes")
    _check_events(text, where)
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise InputError(f"{where}: not a valid recipe ({type(exc).__name__})") from None


def _known(key: Any, valid: tuple[str, ...], what: str) -> str:
    if not isinstance(key, str) or key not in valid:
        raise InputError(f"{what}: unknown key {key!r} (valid: {', '.join(valid)})")
    return key


def _param_value(value: Any, where: str) -> Any:
    """A mergekit parameter value as a register value: a scalar, a gradient (list of
    numbers) or a list of ``{filter, value}`` rules (the per-tensor form)."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        rules = []
        for rule in value:
            for key in rule:
                _known(key, ("filter", "value"), where)
            if "value" not in rule:
                raise InputError(f"{where}: a rule without 'value'")
            rules.append({k: rule[k] for k in ("filter", "value") if k in rule})
        return {layered.LAYERS_KEY: rules}
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return value  # a gradient: canonical_params writes the per-tensor form
    raise InputError(
        f"{where}: a value must be a number, true/false, text, a list of numbers (a gradient) "
        "or a list of {filter, value} rules"
    )


def _params(raw: Any, where: str, ignored: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InputError(f"{where} must be a mapping")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise InputError(f"{where}: parameter name {key!r} is not text")
        if key in IGNORED_PARAMS:
            ignored.append(key)
            continue
        out[key] = _param_value(value, f"{where}.{key}")
    return out


def parse_recipe(doc: Any, where: str = "recipe") -> Recipe:
    """A loaded YAML document as a :class:`Recipe` (keys checked, values shaped; the
    parameters themselves are checked against the strategy by :func:`register_value`)."""
    if not isinstance(doc, Mapping):
        raise InputError(f"{where}: a recipe is a mapping with merge_method, models, ...")
    for key in doc:
        if isinstance(key, str) and key in UNSUPPORTED_KEYS:
            raise InputError(f"{where}: '{key}': {UNSUPPORTED_KEYS[key]}")
        _known(key, TOP_KEYS, where)
    method = doc.get("merge_method")
    if not isinstance(method, str) or not method:
        raise InputError(f"{where}: 'merge_method' (the strategy's name) is required")
    base = doc.get("base_model")
    if base is not None and (not isinstance(base, str) or not base):
        raise InputError(f"{where}: 'base_model' must be a model path or name")
    ignored: list[str] = []
    params = _params(doc.get("parameters"), f"{where}: parameters", ignored)
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw or len(models_raw) > MAX_MODELS:
        raise InputError(f"{where}: 'models' must be a list of 1 to {MAX_MODELS} models")
    models: list[RecipeModel] = []
    for n, entry in enumerate(models_raw, 1):
        at = f"{where}: models[{n}]"
        if not isinstance(entry, Mapping):
            raise InputError(f"{at} must be a mapping with 'model' and 'parameters'")
        for key in entry:
            _known(key, MODEL_KEYS, at)
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise InputError(f"{at}: 'model' (a path or name) is required")
        mparams = _params(entry.get("parameters"), f"{at}.parameters", ignored)
        weight = mparams.pop("weight", None)
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)):
            raise InputError(f"{at}: 'weight' must be one number (no per-layer weights)")
        models.append(RecipeModel(model, None if weight is None else float(weight), mparams))
    if "weight" in params:
        raise InputError(f"{where}: 'weight' belongs to each model's parameters")
    dtype = doc.get("dtype")
    if dtype is not None:
        dtype = _DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in DTYPES:
            raise InputError(f"{where}: dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    return Recipe(method, base, models, params, dtype, sorted(set(ignored)))


def contributions_of(recipe: Recipe) -> list[RecipeModel]:
    """The recipe's models that are contributions (the entry naming the base is not)."""
    return [m for m in recipe.models if recipe.base is None or m.model != recipe.base]


def register_value(
    recipe: Recipe, names: list[str], where: str = "recipe"
) -> tuple[dict[str, Any], list[float]]:
    """The ``strategy`` register value and the weights (aligned with ``names``, the
    contribution names of the recipe's models in order), checked against the declaration."""
    from ..strategies import registry

    try:
        strategy = registry.get_strategy(recipe.method)
    except ResolveError as exc:  # the recipe's fault: an input error, with the valid names
        raise InputError(f"{where}: merge_method: {exc}") from None
    models = contributions_of(recipe)
    declared = {p.name: p for p in strategy.params}
    valid = ", ".join(["weight", *sorted(declared)])
    params: dict[str, Any] = {}
    for key, value in recipe.params.items():
        if key not in declared:
            raise InputError(
                f"{where}: strategy {strategy.name} has no parameter {key!r} (valid: {valid})"
            )
        params[key] = value
    per: dict[str, dict[str, Any]] = {}
    for model, name in zip(models, names, strict=True):
        for key, value in model.params.items():
            if key not in declared:
                raise InputError(
                    f"{where}: model {model.model!r}: strategy {strategy.name} has no "
                    f"parameter {key!r} (valid: {valid})"
                )
            if not declared[key].per_contribution:
                raise InputError(
                    f"{where}: model {model.model!r}: parameter {key!r} of {strategy.name} is "
                    "one for all models; put it under the top-level 'parameters'"
                )
            per.setdefault(key, {})[name] = value
    for key, by_name in per.items():
        if key in params:  # the top-level value is every other model's
            for name in names:
                by_name.setdefault(name, params[key])
        params[key] = {n: by_name[n] for n in names if n in by_name}
    params = registry.canonical_params(strategy, params)
    try:  # every value and gradient anchor in range, names known (ids do not matter here)
        registry.resolve_params(strategy, params, [(f"{i:064x}", n) for i, n in enumerate(names)])
    except ResolveError as exc:
        raise InputError(f"{where}: {exc}") from None
    weights = [1.0 if m.weight is None else m.weight for m in models]
    return {"name": strategy.name, "params": params}, weights


def _match(recipe_model: str, visible: list[tuple[str, str]]) -> tuple[str, str] | None:
    for key in (recipe_model, default_name(Path(recipe_model.rstrip("/")))):
        found = [(cid, name) for cid, name in visible if name == key]
        if len(found) == 1:
            return found[0]
    return None


def _models_dtype(store: ObjectStore, manifest: Manifest) -> str | None:
    """The one floating dtype of the visible contributions' tensors (None if mixed/none)."""
    dtypes: set[str] = set()
    for cid, _ in manifest.visible_contributions():
        desc = read_descriptor(store, manifest, cid)
        dtypes |= {FLOAT_NAMES[t.dtype] for t in desc.tensors.values() if t.dtype in FLOAT_NAMES}
    return dtypes.pop() if len(dtypes) == 1 else None


def output_dtype_for(recipe: Recipe, have: str | None, current: str | None) -> str | None:
    """The ``output_dtype`` register value a recipe asks for, or None where nothing is to be
    written: no ``dtype``, the register already holds it, or the register is unset and every
    model already has that dtype (``have``: the models' one float dtype, None if mixed)."""
    if recipe.dtype is None or recipe.dtype == current:
        return None
    if current is None and recipe.dtype == have:
        return None
    return recipe.dtype


@dataclass
class ImportResult:
    strategy: dict[str, Any]
    weights: dict[str, float]  # contribution name -> weight
    changed: list[str]  # what was written
    ignored: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def import_recipe(repo: Repo, path: Path) -> ImportResult:
    """Set the strategy register and the weights of the visible contributions from the recipe
    at ``path``.  Everything is checked before anything is written; a register or weight that
    already has the recipe's value is not written again."""
    from ..strategies import registry

    repo.require_initialized()
    where = str(path)
    recipe = parse_recipe(load_yaml(path), where)
    manifest = repo.read_manifest()
    visible = manifest.visible_contributions()
    models = contributions_of(recipe)
    matched: list[tuple[str, str]] = []
    for m in models:
        found = _match(m.model, visible)
        if found is None:
            shown = ", ".join(n for _, n in visible) or "none"
            raise InputError(
                f"{where}: model {m.model!r} matches no visible contribution by name or path "
                f"(visible: {shown}); add it with 'git crdt add-contribution'"
            )
        if found in matched:
            raise InputError(f"{where}: model {m.model!r} is listed twice")
        matched.append(found)
    unlisted = [n for c, n in visible if (c, n) not in matched]
    if unlisted:
        raise InputError(
            f"{where}: contribution {unlisted[0]!r} is not in the recipe's models; list it or "
            "remove it ('git crdt remove-contribution')"
        )
    names = [n for _, n in matched]
    value, weights = register_value(recipe, names, where)
    strategy = registry.get_strategy(value["name"])
    has_base = manifest.base() is not None
    if recipe.base is not None and not has_base and strategy.base != "ignored":
        raise InputError(
            f"{where}: the recipe's base_model is {recipe.base!r} but the repository has no "
            f"base; set it with 'git crdt set-base {recipe.base}'"
        )
    if recipe.base is None and has_base and strategy.base == "optional":
        raise InputError(
            f"{where}: the repository has a base but the recipe has no base_model: "
            f"{strategy.name} would use the base"
        )
    try:
        registry.check_contract(strategy, len(matched), has_base)
    except ResolveError as exc:
        raise InputError(f"{where}: {exc}") from None
    for weight in weights:
        if not checks.MIN_WEIGHT <= weight <= checks.MAX_WEIGHT:
            raise InputError(
                f"{where}: weight {weight:g} is outside [{checks.MIN_WEIGHT:g}, "
                f"{checks.MAX_WEIGHT:g}]"
            )
    if not strategy.uses_weights:
        try:
            registry.check_weights(strategy, weights, matched)
        except ResolveError as exc:
            raise InputError(f"{where}: {exc}") from None
    dtype = output_dtype_for(
        recipe, _models_dtype(ObjectStore(repo.root), manifest), manifest.output_dtype()
    )
    changed: list[str] = []
    store = ObjectStore(repo.root)
    for (cid, name), weight in zip(matched, weights, strict=True):
        if read_descriptor(store, manifest, cid).weight != weight:
            contributions.set_weight(repo, cid, weight)
            changed.append(f"weight of {name}")
    if repo.read_manifest().strategy() != value:
        contributions.set_register(repo, "strategy", value)
        changed.append("strategy")
    if dtype is not None:
        contributions.set_register(repo, "output_dtype", dtype)
        changed.append("output dtype")
    return ImportResult(value, dict(zip(names, weights, strict=True)), changed, recipe.ignored)


def _export_value(value: Any) -> Any:
    """A register value in mergekit's spelling: a lone unfiltered gradient as a bare list,
    rules as a list of {filter, value}."""
    if layered.is_per_tensor(value):
        rules = value[layered.LAYERS_KEY]
        if len(rules) == 1 and "filter" not in rules[0]:
            return rules[0]["value"]
        return [dict(r) for r in rules]
    return value


def export_recipe(repo: Repo, *, base_model: str = "base") -> str:
    """The current strategy, parameters, weights and base as a mergekit recipe (YAML text).
    Contributions are named by their display names; ``base_model`` names the base (the
    repository does not know the base's path)."""
    from ..strategies import registry

    repo.require_initialized()
    manifest = repo.read_manifest()
    store = ObjectStore(repo.root)
    visible = manifest.visible_contributions()
    value = manifest.strategy()
    strategy = registry.get_strategy(value["name"])
    ids = {cid: name for cid, name in visible}
    declared = {p.name: p for p in strategy.params}
    top: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {name: {} for _, name in visible}
    for key, item in value["params"].items():
        param = declared.get(key)
        if (
            param is not None
            and param.per_contribution
            and isinstance(item, Mapping)
            and not layered.is_per_tensor(item)
        ):
            for who, v in item.items():
                name = ids.get(who, who)
                if name not in per:
                    raise ResolveError(f"parameter {key}: no visible contribution {who!r}")
                per[name][key] = _export_value(v)
        else:
            top[key] = _export_value(item)
    models = []
    for cid, name in visible:
        mparams: dict[str, Any] = {}
        weight = read_descriptor(store, manifest, cid).weight
        if weight != 1.0 or strategy.uses_weights:
            mparams["weight"] = weight
        mparams.update(per[name])
        models.append({"model": name, **({"parameters": mparams} if mparams else {})})
    doc: dict[str, Any] = {"merge_method": strategy.name}
    if manifest.base() is not None:
        doc["base_model"] = base_model
    doc["models"] = models
    if top:
        doc["parameters"] = top
    dtype = manifest.output_dtype()
    if dtype is None:
        try:
            dtype = _models_dtype(store, manifest)
        except CrdtError:
            dtype = None
    if dtype is not None:
        doc["dtype"] = dtype
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
