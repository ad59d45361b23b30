"""Per-tensor parameter values (strategies/layered.py): the layer index, the position rule,
gradients, filters, range checks and the canonical form."""

from __future__ import annotations

import pytest

from git_crdt_merge.errors import ResolveError
from git_crdt_merge.strategies import layered, registry


def test_layer_index_is_read_from_the_usual_names() -> None:
    assert layered.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layered.layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layered.layer_index("blocks.0.mlp.fc1.weight") == 0
    assert layered.layer_index("encoder.layer.7.output.dense.bias") == 7
    assert layered.layer_index("model.embed_tokens.weight") is None
    assert layered.layer_index("model.layers.x.weight") is None


def test_position_of_tensors_without_a_layer_index_is_the_documented_rule() -> None:
    assert layered.position("model.embed_tokens.weight", 4) == 0.0
    assert layered.position("transformer.wte.weight", 4) == 0.0
    assert layered.position("model.norm.weight", 4) == 1.0
    assert layered.position("lm_head.weight", 4) == 1.0
    assert layered.position("model.layers.0.mlp.weight", 4) == 0.0
    assert layered.position("model.layers.3.mlp.weight", 4) == 1.0
    assert layered.position("model.layers.1.mlp.weight", 4) == 1 / 3
    assert layered.position("model.layers.0.mlp.weight", 1) == 1.0


def test_gradient_interpolates_linearly_between_anchors() -> None:
    assert layered.gradient_at((0.0, 0.5, 1.0), 0.0) == 0.0
    assert layered.gradient_at((0.0, 0.5, 1.0), 0.25) == 0.25
    assert layered.gradient_at((0.0, 0.5, 1.0), 1.0) == 1.0
    assert layered.gradient_at((1.0, 0.0), 0.75) == 0.25
    # between two equal in-range anchors the value never leaves them by rounding
    assert layered.gradient_at((0.1, 0.1), 1 / 3) == 0.1


def _slerp_t(value: object) -> object:
    strategy = registry.get_strategy("slerp")
    return registry.resolve_params(strategy, {"t": value}, [("a" * 64, "m")])["t"]


def test_first_matching_filter_wins_then_the_default() -> None:
    value = _slerp_t(
        {
            "layers": [
                {"filter": "self_attn", "value": [0.0, 1.0]},
                {"filter": "attn", "value": 0.9},
                {"value": 0.5},
            ]
        }
    )
    params = {"t": value}
    at = lambda name: layered.for_tensor(params, name, 3)["t"]  # noqa: E731
    assert at("model.layers.1.self_attn.q.weight") == 0.5
    assert at("model.layers.2.self_attn.q.weight") == 1.0
    assert at("model.layers.2.cross_attn.q.weight") == 0.9
    assert at("model.layers.2.mlp.weight") == 0.5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"layers": [{"value": [0.0, 2e6]}]}, "parameter t: rule 1[1] must be <= 1e+06"),
        ({"layers": [{"filter": "mlp", "value": 0.5}]}, "end its rules with one without"),
        ({"layers": []}, "list of 1 to 64 rules"),
        ({"layers": "x"}, "must be a number"),
        ({"layers": [{"value": 0.5, "when": 1}]}, "must be {'filter'"),
        ({"layers": [{"filter": "", "value": 0.5}]}, "filter must be 1 to 200"),
        ({"layers": [{"value": list(range(300))}]}, "1 to 256 values"),
    ],
)
def test_bad_per_tensor_values_are_refused_in_one_line(value: object, message: str) -> None:
    with pytest.raises(ResolveError) as info:
        _slerp_t(value)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_canonical_form_keeps_plain_values_and_normalises_per_tensor_ones() -> None:
    slerp = registry.get_strategy("slerp")
    assert registry.canonical_params(slerp, {"t": 1}) == {"t": 1}  # plain: bytes kept
    assert registry.canonical_params(slerp, {"t": [0, 1]}) == {
        "t": {"layers": [{"value": [0.0, 1.0]}]}
    }
    assert registry.canonical_params(slerp, {"t": {"layers": [{"value": 0.5}]}}) == {"t": 0.5}
    ties = registry.get_strategy("ties")
    assert registry.canonical_params(ties, {"density": {"a": [1, 0.5]}}) == {
        "density": {"a": {"layers": [{"value": [1.0, 0.5]}]}}
    }


def test_strategies_with_a_whole_model_pass_refuse_per_tensor_values() -> None:
    strategy = next(s for s in registry.all_strategies() if s.model_pass is not None)
    param = next(p for p in strategy.params if p.type is float)
    with pytest.raises(ResolveError, match="per-tensor values are not offered"):
        registry.resolve_params(
            strategy, {param.name: {"layers": [{"value": [0.1, 0.2]}]}}, [("a" * 64, "m")]
        )


def test_a_contribution_named_layers_is_still_a_per_contribution_mapping() -> None:
    ties = registry.get_strategy("ties")
    pairs = [("a" * 64, "layers"), ("b" * 64, "other")]
    density = registry.resolve_params(ties, {"density": {"layers": 0.5}}, pairs)["density"]
    assert density == [0.5, 1.0]
    density = registry.resolve_params(
        ties, {"density": {"layers": {"layers": [{"value": [0.2, 0.4]}]}}}, pairs
    )["density"]
    assert isinstance(density[0], layered.PerTensor) and density[1] == 1.0
