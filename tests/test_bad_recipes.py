"""Bad recipes through the CLI: unknown methods and parameters, out-of-range values, a non-float output dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_failures import COMMANDS, assert_failed, invoke, linear_recipe
from click.testing import CliRunner

# ------------------------------------------------------------------------------------------------
# recipe mistakes
# ------------------------------------------------------------------------------------------------


@COMMANDS
@pytest.mark.parametrize(
    ("typo", "meant"), [("lnear", "linear"), ("task_arithmatic", "task_arithmetic"), ("slrep", "slerp")]
)
def test_unknown_method_suggests_the_nearest(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, typo: str, meant: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: {typo}\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n"
        f"  - {json.dumps(str(tiny_family['ft2']))}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"unknown method '{typo}'", f"Did you mean '{meant}'?")


@COMMANDS
def test_unknown_parameter(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    recipe = linear_recipe(
        tmp_path, tiny_family["ft1"], tiny_family["ft2"], extra="parameters:\n  normalise: true\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    # line 6: method, models:, two models, parameters:, then the key
    assert_failed(
        result, out, f"{recipe}:6", "parameters.normalise", "unknown parameter 'normalise'", "'normalize'"
    )


@COMMANDS
def test_unknown_per_model_parameter(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n"
        "    parameters:\n      wieght: 0.5\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:6", "models[1].parameters.wieght", "'weight'")


@COMMANDS
@pytest.mark.parametrize(("value", "shown"), [("1.5", "1.5"), ("[0.0, 1.5]", "1.5"), ("-0.1", "-0.1")])
def test_out_of_range_value(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, value: str, shown: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: slerp\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n"
        f"  - {json.dumps(str(tiny_family['ft2']))}\n"
        f"parameters:\n  t: {value}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:6", "parameters.t", f"= {shown}", "invalid")


@COMMANDS
def test_empty_list_parameter_is_an_error_not_a_crash(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: []}}\n"
        f"  - {json.dumps(str(tiny_family['ft2']))}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:4", "models[0].parameters.weight", "empty list")


@COMMANDS
@pytest.mark.parametrize("dtype", ["bool", "I8", "int8"])
def test_non_float_output_dtype_is_rejected(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, dtype: str
) -> None:
    recipe = linear_recipe(
        tmp_path, tiny_family["ft1"], tiny_family["ft2"], extra=f"output:\n  dtype: {dtype}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:6", "output.dtype", f"'{dtype}'")


@COMMANDS
@pytest.mark.parametrize(
    ("method", "where", "text", "line", "field", "shown", "what"),
    [
        ("task_arithmetic", "top", "lambda: .nan", 7, "parameters.lambda", "nan", "not a number"),
        ("task_arithmetic", "top", "lambda: .inf", 7, "parameters.lambda", "inf", "infinite"),
        ("task_arithmetic", "top", "lambda: -.inf", 7, "parameters.lambda", "-inf", "infinite"),
        ("linear", "model", "weight: 1e308", 4, "models[0].parameters.weight", "1e+308", "float32's range"),
        ("linear", "model", "weight: [.nan, 1.0]", 4, "models[0].parameters.weight", "nan", "not a number"),
        (
            "linear",
            "model",
            "weight: [{filter: mlp, value: .inf}, {value: 1.0}]",
            4,
            "models[0].parameters.weight",
            "inf",
            "infinite",
        ),
        ("ties", "model", "density: .nan", 4, "models[0].parameters.density", "nan", "not a number"),
    ],
)
def test_non_finite_and_overflowing_parameters_are_refused_by_field_and_line(
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    command: str,
    method: str,
    where: str,
    text: str,
    line: int,
    field: str,
    shown: str,
    what: str,
) -> None:
    """NaN, inf and values past float32's range would give an all-NaN model with only per-tensor
    warnings: refused before any tensor is read, naming the field and the recipe's line."""
    ft1, ft2 = (json.dumps(str(tiny_family[name])) for name in ("ft1", "ft2"))
    base = f"base: {json.dumps(str(tiny_family['base']))}\n" if method != "linear" else ""
    if where == "model":
        recipe_text = (
            f"method: {method}\nmodels:\n  - model: {ft1}\n    parameters: {{{text}}}\n  - {ft2}\n{base}"
        )
    else:
        recipe_text = f"method: {method}\nmodels:\n  - {ft1}\n  - {ft2}\n{base}parameters:\n  {text}\n"
        line = recipe_text.count("\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:{line}", field, f"= {shown}", what)


@COMMANDS
@pytest.mark.parametrize(
    ("method", "weights", "extra", "refused"),
    [
        ("linear", ("0.0", "0.0"), "", True),
        ("linear", ("1.0", "-1.0"), "", True),
        ("linear", ("[1.0, 0.0]", "[-1.0, 1.0]"), "", True),  # zero only at t = 0: the embeddings
        ("linear", ("0.0", "0.0"), "parameters: {normalize: false}\n", False),
        ("task_arithmetic", ("0.5", "-0.5"), "parameters: {normalize: true}\n", True),
        ("task_arithmetic", ("0.5", "-0.5"), "", False),  # not normalised: a sum of 0 is fine
    ],
)
def test_weights_that_cannot_be_normalised_are_refused_before_the_run(
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    command: str,
    method: str,
    weights: tuple[str, str],
    extra: str,
    refused: bool,
) -> None:
    base = f"base: {json.dumps(str(tiny_family['base']))}\n" if method == "task_arithmetic" else ""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: {method}\n{base}models:\n"
        + "".join(
            f"  - model: {json.dumps(str(tiny_family[name]))}\n    parameters: {{weight: {w}}}\n"
            for name, w in zip(("ft1", "ft2"), weights)
        )
        + extra
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    if refused:
        assert_failed(result, out, f"{recipe}:", "sum to 0", "cannot be normalised", "tensor '")
    else:
        assert result.exit_code == 0, result.output
