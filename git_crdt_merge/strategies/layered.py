"""Per-tensor parameter values: gradients over the layers and tensor-name filters.

A parameter of the ``strategy`` register may hold, instead of one value, the per-tensor form
``{"layers": [RULE, ...]}`` (mergekit's gradients and filters).  A rule is
``{"filter": TEXT, "value": V}`` or ``{"value": V}`` (no filter: matches every tensor); V is
a value of the parameter's type or, for a ``float`` parameter, a *gradient*: a list of two or
more numbers spread evenly over the layers.  For a tensor, the first rule whose filter is a
substring of the tensor's name gives the value; when none matches, the parameter's declared
default applies (a required parameter must end its rules with an unfiltered one).

A gradient [g_0, ..., g_{n-1}] is read at the tensor's position p in [0, 1]:
s = p·(n−1), i = ⌊s⌋, f = s − i, value = (1−f)·g_i + f·g_{min(i+1, n−1)} in Python floats
(IEEE double, correctly rounded single operations: the same on every machine), clamped to
[min(g_i, g_{i+1}), max(g_i, g_{i+1})] so that a value between in-range anchors stays in range.

The position: the layer index N of the first ``layers.N.``, ``layer.N.``, ``h.N.``,
``blocks.N.`` or ``block.N.`` in the name, over L = 1 + the largest index in the model:
p = N/(L−1) (p = 1 when L = 1).  A tensor without a layer index takes p = 0 when its name
holds ``embed``, ``wte`` or ``wpe`` (the input embeddings come before the first layer) and
p = 1 otherwise (final norm, output head: after the last layer), as mergekit evaluates the
weights before and after its layer stack.

The canonical form written to the manifest: floats as floats, and a rule list that is one
unfiltered scalar written as that scalar (so it is the same register as the plain value).
Plain scalar parameters are never rewritten: their bytes, and the Merkle roots, stay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ResolveError

LAYERS_KEY = "layers"
MAX_RULES = 64
MAX_ANCHORS = 256
MAX_FILTER_CHARS = 200
_INDEX_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d{1,6})\.")
_BEFORE_LAYERS = ("embed", "wte", "wpe")


def is_per_tensor(value: Any) -> bool:
    """Whether ``value`` is the per-tensor form ``{"layers": [...]}`` (a per-contribution
    mapping has scalar or per-tensor values, never a list)."""
    return (
        isinstance(value, Mapping)
        and set(value) == {LAYERS_KEY}
        and isinstance(value[LAYERS_KEY], list)
    )


@dataclass(frozen=True)
class Rule:
    filter: str | None
    value: Any  # a scalar of the parameter's type, or a tuple of floats (a gradient)


@dataclass(frozen=True)
class PerTensor:
    """A validated per-tensor value; :meth:`at` evaluates it for one tensor."""

    rules: tuple[Rule, ...]
    default: Any  # the parameter's declared default (REQUIRED when it has none)

    def at(self, name: str, position: float) -> Any:
        for rule in self.rules:
            if rule.filter is None or rule.filter in name:
                if isinstance(rule.value, tuple):
                    return gradient_at(rule.value, position)
                return rule.value
        return self.default


def gradient_at(anchors: tuple[float, ...], position: float) -> float:
    """The gradient's value at ``position`` in [0, 1] (module docstring)."""
    scaled = position * (len(anchors) - 1)
    i = min(int(math.floor(scaled)), len(anchors) - 1)
    j = min(i + 1, len(anchors) - 1)
    frac = scaled - i
    a, b = anchors[i], anchors[j]
    value = (1.0 - frac) * a + frac * b
    return min(max(value, min(a, b)), max(a, b))


def layer_index(name: str) -> int | None:
    """The layer index in a tensor name (``model.layers.3.mlp`` -> 3), None if it has none."""
    found = _INDEX_RE.search(name)
    return None if found is None else int(found.group(1))


def layer_count(names: Iterable[str]) -> int:
    """1 + the largest layer index among ``names`` (0 when none has one)."""
    return 1 + max((i for i in map(layer_index, names) if i is not None), default=-1)


def position(name: str, count: int) -> float:
    """The tensor's position p in [0, 1] over ``count`` layers (module docstring)."""
    index = layer_index(name)
    if index is None:
        lowered = name.lower()
        return 0.0 if any(k in lowered for k in _BEFORE_LAYERS) else 1.0
    if count <= 1:
        return 1.0
    return min(index, count - 1) / (count - 1)


def parse(
    value: Any,
    *,
    label: str,
    param_type: type,
    default: Any,
    required: bool,
    coerce: Callable[[Any, str], Any],
) -> PerTensor:
    """Validate the per-tensor form ``value`` of one parameter: every scalar and every
    gradient anchor through ``coerce`` (the plain parameter's type and range check)."""
    rules = value[LAYERS_KEY]
    if not isinstance(rules, list) or not 1 <= len(rules) <= MAX_RULES:
        raise ResolveError(f"{label}: 'layers' must be a list of 1 to {MAX_RULES} rules")
    parsed: list[Rule] = []
    for n, rule in enumerate(rules):
        where = f"{label}: rule {n + 1}"
        if not isinstance(rule, Mapping) or "value" not in rule or set(rule) - {"filter", "value"}:
            raise ResolveError(f"{where} must be {{'filter': TEXT, 'value': V}} or {{'value': V}}")
        filt = rule.get("filter")
        if filt is not None and (
            not isinstance(filt, str) or not 0 < len(filt) <= MAX_FILTER_CHARS
        ):
            raise ResolveError(f"{where}: filter must be 1 to {MAX_FILTER_CHARS} characters")
        item = rule["value"]
        if isinstance(item, list):
            if param_type is not float:
                raise ResolveError(f"{where}: a gradient (list) needs a float parameter")
            if not 1 <= len(item) <= MAX_ANCHORS:
                raise ResolveError(f"{where}: a gradient has 1 to {MAX_ANCHORS} values")
            anchors = tuple(coerce(x, f"{where}[{k}]") for k, x in enumerate(item))
            parsed.append(Rule(filt, anchors if len(anchors) > 1 else anchors[0]))
        else:
            parsed.append(Rule(filt, coerce(item, where)))
    if required and parsed[-1].filter is not None:
        raise ResolveError(
            f"{label} is required: end its rules with one without a filter (the default)"
        )
    return PerTensor(tuple(parsed), default)


def canonical(value: Any, param_type: type) -> Any:
    """The form to write for a value given by a user: a bare list (a gradient) becomes the
    per-tensor form; inside the per-tensor form, numbers of a float parameter become floats
    and one unfiltered scalar rule becomes that scalar.  Other values are returned as they
    are (plain scalars keep their bytes).  Validation is :func:`parse`'s."""
    if isinstance(value, list):
        value = {LAYERS_KEY: [{"value": value}]}
    if not is_per_tensor(value) or not isinstance(value[LAYERS_KEY], list):
        return value

    def number(x: Any) -> Any:
        if param_type is float and isinstance(x, int) and not isinstance(x, bool):
            return float(x)
        return x

    rules = []
    for rule in value[LAYERS_KEY]:
        if not isinstance(rule, Mapping):
            return value  # invalid: left for parse to report
        out = dict(rule)
        item = out.get("value")
        if isinstance(item, list):
            item = [number(x) for x in item]
            out["value"] = item[0] if len(item) == 1 else item
        else:
            out["value"] = number(item)
        rules.append(out)
    if len(rules) == 1 and "filter" not in rules[0] and not isinstance(rules[0]["value"], list):
        return rules[0]["value"]
    return {LAYERS_KEY: rules}


def has_per_tensor(params: Mapping[str, Any]) -> bool:
    """Whether resolved parameters hold a per-tensor value (plain or per contribution)."""
    for value in params.values():
        if isinstance(value, PerTensor):
            return True
        if isinstance(value, list) and any(isinstance(v, PerTensor) for v in value):
            return True
    return False


def for_tensor(params: Mapping[str, Any], name: str, count: int) -> dict[str, Any]:
    """The plain parameters of tensor ``name`` (``count`` layers in the model): every
    per-tensor value evaluated, per-contribution lists element by element."""
    p = position(name, count)
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, PerTensor):
            out[key] = value.at(name, p)
        elif isinstance(value, list):
            out[key] = [v.at(name, p) if isinstance(v, PerTensor) else v for v in value]
        else:
            out[key] = value
    return out


def describe(value: Any) -> Any:
    """A per-tensor value as its JSON form (for plans and reports)."""
    if isinstance(value, PerTensor):
        return {
            LAYERS_KEY: [
                {
                    **({"filter": r.filter} if r.filter is not None else {}),
                    "value": list(r.value) if isinstance(r.value, tuple) else r.value,
                }
                for r in value.rules
            ]
        }
    if isinstance(value, list):
        return [describe(v) for v in value]
    return value
