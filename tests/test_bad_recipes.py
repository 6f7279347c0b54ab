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
