"""Parameter values over layers and tensors (mergekit semantics); expected values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.params import (
    MethodParameters,
    Param,
    ParameterSet,
    anchors,
    evaluate_gradient,
    filter_matches,
    is_filter_list,
    layer_position,
    resolve,
    varies,
)
from workbench.recipe.schema import parse_recipe

LAYER = "model.layers.{}.mlp.up_proj.weight"


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "expected"), [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)])
def test_two_anchors_over_five_layers(layer: int, expected: float) -> None:
    assert resolve([0, 1], LAYER.format(layer), layer, 5) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("layer", "expected"), [(0, 0.0), (1, 1.0), (2, 0.0)])
def test_peak_in_the_middle_over_three_layers(layer: int, expected: float) -> None:
    assert resolve([0, 1, 0], LAYER.format(layer), layer, 3) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("layer", "expected"), [(0, 0.0), (1, 0.5), (2, 1.0), (3, 0.5), (4, 0.0)])
def test_peak_in_the_middle_over_five_layers(layer: int, expected: float) -> None:
    # t = layer/4, scaled = t*2: 0, .5, 1, 1.5, 2
    assert resolve([0, 1, 0], LAYER.format(layer), layer, 5) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("layer", "expected"),
    # 4 layers, anchors [0.2, 0.8, 0.4]: t = 0, 1/3, 2/3, 1; scaled = 0, 2/3, 4/3, 2
    [(0, 0.2), (1, 0.2 + (0.8 - 0.2) * 2 / 3), (2, 0.8 + (0.4 - 0.8) * 1 / 3), (3, 0.4)],
)
def test_uneven_anchor_spacing(layer: int, expected: float) -> None:
    assert resolve([0.2, 0.8, 0.4], LAYER.format(layer), layer, 4) == pytest.approx(expected, abs=1e-12)


def test_descending_gradient_and_ints() -> None:
    # 3 layers, [10, 0]: 10, 5, 0
    assert [resolve([10, 0], LAYER.format(i), i, 3) for i in range(3)] == pytest.approx([10.0, 5.0, 0.0])


def test_single_anchor_is_constant() -> None:
    assert {resolve([0.3], LAYER.format(i), i, 8) for i in range(8)} == {0.3}


def test_scalar_is_used_everywhere() -> None:
    assert resolve(0.7, "lm_head.weight", None, 12) == 0.7
    assert resolve(0.7, LAYER.format(5), 5, 12) == 0.7
    assert resolve("x", LAYER.format(5), 5, 12) == "x"


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
def test_tensors_outside_layers_take_t0(name: str) -> None:
    assert resolve([0.2, 0.9], name, None, 4) == 0.2
    assert resolve([0.6, 0.0, 1.0], name, None, 32) == 0.6


def test_a_single_layer_model_takes_t0() -> None:
    assert resolve([0.2, 0.9], LAYER.format(0), 0, 1) == 0.2


def test_layer_position() -> None:
    assert layer_position(None, 10) == 0.0
    assert layer_position(0, 1) == 0.0
    assert layer_position(3, 4) == 1.0
    assert layer_position(2, 5) == 0.5
    assert layer_position(7, 4) == 1.0  # clamped


@pytest.mark.parametrize(
    ("layer", "expected"),
    # 5 layers, 3 values: index = int(layer/4 * 2) = 0, 0, 1, 1, 2
    [(0, "a"), (1, "a"), (2, "b"), (3, "b"), (4, "c")],
)
def test_non_numeric_lists_are_indexed(layer: int, expected: str) -> None:
    assert resolve(["a", "b", "c"], LAYER.format(layer), layer, 5) == expected


def test_booleans_are_indexed_not_interpolated() -> None:
    # 4 layers, 2 values: int(t) = 0, 0, 0, 1
    assert [resolve([True, False], LAYER.format(i), i, 4) for i in range(4)] == [True, True, True, False]


def test_evaluate_gradient_directly() -> None:
    assert evaluate_gradient([1.0, 3.0], 0.25) == pytest.approx(1.5)
    assert evaluate_gradient([1.0, 3.0, 7.0], 0.75) == pytest.approx(5.0)
    assert evaluate_gradient([1.0, 3.0, 7.0], 1.0) == 7.0
    assert evaluate_gradient(["x", "y"], 0.99) == "x"


def test_empty_list_is_rejected() -> None:
    with pytest.raises(ValueError):
        resolve([], LAYER.format(0), 0, 4)


# ------------------------------------------------------------------------------------------------
# filters
# ------------------------------------------------------------------------------------------------


def test_filter_list_first_match_wins() -> None:
    value = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "q_proj", "value": 0.2},  # also matches q_proj, but comes second
        {"filter": "mlp", "value": 0.3},
        {"value": 0.9},
    ]
    assert resolve(value, "model.layers.0.self_attn.q_proj.weight", 0, 4) == 0.1
    assert resolve(value, "model.layers.0.mlp.up_proj.weight", 0, 4) == 0.3
    assert resolve(value, "model.layers.0.input_layernorm.weight", 0, 4) == 0.9
    assert resolve(value, "lm_head.weight", None, 4) == 0.9


def test_filter_order_matters() -> None:
    first = [{"filter": "mlp", "value": 1.0}, {"filter": "up_proj", "value": 2.0}]
    second = list(reversed(first))
    name = "model.layers.2.mlp.up_proj.weight"
    assert resolve(first, name, 2, 4) == 1.0
    assert resolve(second, name, 2, 4) == 2.0


def test_star_filter_matches_everything() -> None:
    assert resolve([{"filter": "*", "value": 0.4}], "anything.at.all", None, 4) == 0.4


def test_filter_value_may_be_a_gradient() -> None:
    value = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    # 5 layers: mlp tensors at t = layer / 4
    assert resolve(value, "model.layers.1.mlp.down_proj.weight", 1, 5) == pytest.approx(0.25)
    assert resolve(value, "model.layers.4.mlp.down_proj.weight", 4, 5) == pytest.approx(1.0)
    assert resolve(value, "model.layers.4.self_attn.k_proj.weight", 4, 5) == 0.5


def test_no_matching_filter_uses_the_default_or_fails() -> None:
    value = [{"filter": "mlp", "value": 0.3}]
    assert resolve(value, "model.layers.0.self_attn.q_proj.weight", 0, 4, default=1.0) == 1.0
    with pytest.raises(LookupError) as info:
        resolve(value, "model.layers.0.self_attn.q_proj.weight", 0, 4)
    assert "model.layers.0.self_attn.q_proj.weight" in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("mlp", "model.layers.0.mlp.up_proj.weight", True),  # substring
        ("up_proj", "model.layers.0.mlp.up_proj.weight", True),
        ("attn", "model.layers.0.mlp.up_proj.weight", False),
        ("layers.1.", "model.layers.11.mlp.up_proj.weight", False),  # substring of the delimited index
        ("layers.1.", "model.layers.1.mlp.up_proj.weight", True),
        ("*.mlp.*", "model.layers.0.mlp.up_proj.weight", True),  # glob
        ("mlp*", "model.layers.0.mlp.up_proj.weight", False),  # a glob matches the whole name
        ("model.layers.?.mlp.*", "model.layers.3.mlp.up_proj.weight", True),
        ("model.layers.?.mlp.*", "model.layers.13.mlp.up_proj.weight", False),
        ("model.layers.[0-2].*", "model.layers.2.self_attn.q_proj.weight", True),
        ("model.layers.[0-2].*", "model.layers.3.self_attn.q_proj.weight", False),
        ("*Proj*", "model.layers.0.mlp.up_proj.weight", False),  # case-sensitive
        ("*", "lm_head.weight", True),
        (None, "lm_head.weight", True),
    ],
)
def test_substring_and_glob_filters(pattern: str | None, name: str, matches: bool) -> None:
    assert filter_matches(pattern, name) is matches


def test_glob_filters_in_a_filter_list() -> None:
    value = [{"filter": "*.layers.[0-1].*", "value": 0.0}, {"filter": "*", "value": 1.0}]
    assert [resolve(value, LAYER.format(i), i, 4) for i in range(4)] == [0.0, 0.0, 1.0, 1.0]


def test_helpers() -> None:
    assert is_filter_list([{"filter": "a", "value": 1}])
    assert not is_filter_list([])
    assert not is_filter_list([0.1, 0.2])
    assert not is_filter_list([{"filter": "a", "value": 1}, 0.2])
    assert anchors(0.5) == [0.5]
    assert anchors([0.1, 0.2]) == [0.1, 0.2]
    assert anchors([{"filter": "a", "value": [0.1, 0.3]}, {"value": 0.7}]) == [0.1, 0.3, 0.7]
    assert varies([1]) and not varies(1.0)


# ------------------------------------------------------------------------------------------------
# end to end: a gradient over the tiny family's 4 layers
# ------------------------------------------------------------------------------------------------


def test_gradient_weights_in_a_real_merge(tiny_family: dict[str, Path], registry, tmp_path: Path) -> None:
    """linear, normalize off, models[0] weight [0, 1] over 4 layers, models[1] weight 0:
    layer i gets (i / 3) * ft1; tensors outside layers get t = 0, so weight 0 -> zeros."""
    ft1, ft2 = tiny_family["ft1"], tiny_family["ft2"]
    recipe = parse_recipe(
        "method: linear\n"
        "models:\n"
        f"  - model: {json.dumps(str(ft1))}\n    parameters: {{weight: [0.0, 1.0]}}\n"
        f"  - model: {json.dumps(str(ft2))}\n    parameters: {{weight: 0.0}}\n"
        "parameters: {normalize: false}\n"
        "output: {dtype: float32}\n",
        "g.yaml",
    )
    out = tmp_path / "out"
    run_recipe(recipe, out=out, registry=registry)
    merged = load_file(out / "model.safetensors")
    source = load_file(ft1 / "model.safetensors")
    for layer in range(4):
        name = LAYER.format(layer)
        expected = source[name].double() * (layer / 3)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.count_nonzero(merged[name]) == 0


def test_filters_in_a_real_merge(tiny_family: dict[str, Path], registry, tmp_path: Path) -> None:
    """slerp with t = 0 for attention (first filter), 1 for everything else: tensors are copied
    from one end or the other."""
    ft1, ft2 = tiny_family["ft1"], tiny_family["ft2"]
    recipe = parse_recipe(
        "method: slerp\n"
        f"models: [{json.dumps(str(ft1))}, {json.dumps(str(ft2))}]\n"
        "parameters:\n"
        "  t:\n"
        "    - filter: self_attn\n      value: 0.0\n"
        "    - filter: '*.mlp.*'\n      value: 1.0\n"
        "    - filter: mlp\n      value: 0.0\n"  # never reached: the glob above matched first
        "    - value: 1.0\n",
        "f.yaml",
    )
    out = tmp_path / "out"
    run_recipe(recipe, out=out, registry=registry)
    merged = load_file(out / "model.safetensors")
    a = load_file(ft1 / "model.safetensors")
    b = load_file(ft2 / "model.safetensors")
    for name, tensor in merged.items():
        want = a[name] if "self_attn" in name else b[name]
        assert torch.equal(tensor, want), name


# --------------------------------------------------------------------------------------------------
# Values kept in a file ({file: path}): per-tensor coefficients set by hand or learned elsewhere
# --------------------------------------------------------------------------------------------------


def test_file_of_per_tensor_values_resolves_exact_names_and_falls_back_to_the_default(tmp_path: Path) -> None:
    from workbench.params import resolve

    table = tmp_path / "lambdas.json"
    table.write_text('{"model.layers.0.mlp.up_proj.weight": 0.25, "model.norm.weight": [0.5, 1.0]}')
    ref = {"file": str(table)}
    assert resolve(ref, "model.layers.0.mlp.up_proj.weight", 0, 4, default=1.0) == 0.25
    assert (
        resolve(ref, "model.norm.weight", None, 4, default=1.0) == 0.5
    )  # a gradient outside the layers: t = 0
    assert resolve(ref, "lm_head.weight", None, 4, default=1.0) == 1.0


def test_file_holding_a_filter_list(tmp_path: Path) -> None:
    from workbench.params import resolve

    table = tmp_path / "lambdas.yaml"
    table.write_text("- filter: mlp\n  value: [0.0, 1.0]\n- value: 0.3\n")
    ref = {"file": str(table)}
    assert resolve(ref, "model.layers.2.mlp.up_proj.weight", 2, 3, default=1.0) == 1.0
    assert resolve(ref, "model.layers.1.mlp.up_proj.weight", 1, 3, default=1.0) == 0.5
    assert resolve(ref, "model.layers.1.self_attn.q_proj.weight", 1, 3, default=1.0) == 0.3


def test_task_arithmetic_with_per_tensor_lambdas_from_a_file(
    tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from workbench.engine.run import run_recipe
    from workbench.recipe.schema import parse_recipe

    name = "model.layers.1.mlp.down_proj.weight"
    (tmp_path / "coef.json").write_text(f'{{"{name}": 0.25}}')
    text = (
        f"method: task_arithmetic\nbase: {tiny_family['base']}\nmodels: [{tiny_family['ft1']}]\n"
        f"parameters:\n  lambda: {{file: {tmp_path / 'coef.json'}}}\noutput: {{dtype: float32}}\n"
    )
    run_recipe(parse_recipe(text), out=tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(tiny_family["base"] / "model.safetensors")
    ft = load_file(tiny_family["ft1"] / "model.safetensors")
    for tensor, lam in ((name, 0.25), ("model.layers.0.mlp.down_proj.weight", 1.0)):
        expected = base[tensor].double() + lam * (ft[tensor].double() - base[tensor].double())
        assert (out[tensor].double() - expected).abs().max().item() < 1e-6


def test_missing_or_bad_parameter_file_is_a_located_error(
    tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    from workbench.engine.run import run_recipe
    from workbench.errors import RecipeError
    from workbench.recipe.schema import parse_recipe

    base = (
        f"method: task_arithmetic\nbase: {tiny_family['base']}\nmodels: [{tiny_family['ft1']}]\nparameters:\n"
    )
    with pytest.raises(RecipeError, match=r"recipe.yaml:5: .*missing.json does not exist"):
        run_recipe(
            parse_recipe(base + f"  lambda: {{file: {tmp_path / 'missing.json'}}}\n", "recipe.yaml"),
            out=tmp_path / "o1",
        )
    (tmp_path / "bad.json").write_text('{"model.norm.weight": "high"}')
    with pytest.raises(RecipeError, match="lambda"):
        run_recipe(
            parse_recipe(base + f"  lambda: {{file: {tmp_path / 'bad.json'}}}\n", "recipe.yaml"),
            out=tmp_path / "o2",
        )
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------------
# parameter sets: what check_plan, memory_needed and prepare see
# ------------------------------------------------------------------------------------------------


class _Weights(MethodParameters):
    weight: float = Param(description="a per-layer weight", ge=0.0)
    mode: str = Param("fast", description="a run-wide option", per_layer=False)


def test_a_parameter_set_resolves_a_gradient_per_tensor_and_run_wide_at_t0() -> None:
    params = ParameterSet(_Weights, {"weight": [0.2, 0.8], "mode": "slow"}, layer_count=4)
    # layer 1 of 4 sits at t = 1/3: 0.2 + (0.8 - 0.2) / 3 = 0.4
    assert params.at(LAYER.format(1)).weight == pytest.approx(0.4, abs=1e-12)
    assert params.at(LAYER.format(3)).weight == pytest.approx(0.8, abs=1e-12)
    assert params.at("model.embed_tokens.weight").weight == pytest.approx(0.2, abs=1e-12)
    assert (params.values.weight, params.values.mode) == (0.2, "slow")
    assert isinstance(params.values, _Weights)
    with pytest.raises(TypeError):
        params.raw["weight"] = 1.0  # type: ignore[index]


def test_a_parameter_set_names_the_tensor_whose_values_are_invalid() -> None:
    params = ParameterSet(_Weights, {"weight": [{"filter": "mlp", "value": -1.0}, {"value": 1.0}]}, 4)
    assert params.values.weight == 1.0  # outside the layers no 'mlp' filter matches
    with pytest.raises(RecipeError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' are invalid"):
        params.at(LAYER.format(0))


def test_a_parameter_set_without_a_run_wide_value_says_so_and_still_resolves_per_tensor() -> None:
    params = ParameterSet(_Weights, {"weight": [{"filter": "mlp", "value": 0.5}]}, 4)
    assert params.at(LAYER.format(2)).weight == 0.5
    with pytest.raises(RecipeError, match="no run-wide value.*at\\(name\\)"):
        params.values  # noqa: B018
