"""Hostile or broken ``config.json`` files: the reference model's (the output's config is copied from
it) is refused when it cannot describe the weights; another input's, which the output does not take,
gets a warning that names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_failures import COMMANDS, WIDE, assert_failed, copy_model, invoke, linear_recipe
from click.testing import CliRunner

from workbench.cli.main import main


def _with_config(tiny_family: dict[str, Path], tmp_path: Path, name: str, text: str) -> Path:
    model = copy_model(tiny_family[name], tmp_path / f"{name}-edited")
    (model / "config.json").write_text(text)
    return model


def _config(tiny_family: dict[str, Path], name: str = "ft1") -> dict:
    return json.loads((tiny_family[name] / "config.json").read_text())


@COMMANDS
@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda c: [1, 2, 3], ["holds a JSON list where a config object"]),
        (lambda c: "llama", ["holds a JSON str where a config object"]),
        (
            lambda c: {**c, "num_hidden_layers": -5},
            ["'num_hidden_layers' is -5, not a positive whole number"],
        ),
        (lambda c: {**c, "hidden_size": "wide"}, ["'hidden_size' is 'wide', not a positive whole number"]),
        (
            lambda c: {**c, "num_hidden_layers": 2},
            ["'num_hidden_layers' is 2, but the weights have layers up to"],
        ),
        (
            lambda c: {**c, "hidden_size": c["hidden_size"] * 2},
            ["'hidden_size' is", "model.embed_tokens.weight is ["],
        ),
    ],
    ids=["list", "string", "negative-layers", "text-size", "too-few-layers", "other-width"],
)
def test_a_reference_config_that_cannot_describe_the_weights_is_refused(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, edit, fragments: list[str]
) -> None:
    assert _config(tiny_family)["num_hidden_layers"] > 2  # the last case needs more layers than 2
    reference = _with_config(tiny_family, tmp_path, "ft1", json.dumps(edit(_config(tiny_family))))
    recipe = linear_recipe(tmp_path, reference, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(reference), *fragments)


def test_a_base_config_that_is_not_an_object_is_refused(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    base = _with_config(tiny_family, tmp_path, "base", "[1, 2, 3]")
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(
        f"method: task_arithmetic\nbase: {json.dumps(str(base))}\n"
        f"models:\n  - {json.dumps(str(tiny_family['ft1']))}\n  - {json.dumps(str(tiny_family['ft2']))}\n"
    )
    out = tmp_path / "out"
    assert_failed(invoke(cli, "validate", recipe, out), out, str(base / "config.json"), "JSON list")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[1]", "holds a JSON list"),
        ('{"num_layers": 0}', "'num_layers' is 0"),
    ],
    ids=["not-json", "list", "zero-layers"],
)
def test_a_broken_config_of_another_input_is_named_in_a_warning(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, text: str, fragment: str
) -> None:
    other = _with_config(tiny_family, tmp_path, "ft2", text)
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], other)
    out = tmp_path / "out"
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert fragment in result.output and str(other) in result.output and "not used" in result.output
    assert (
        json.loads((out / "config.json").read_text())["num_hidden_layers"]
        == _config(tiny_family)["num_hidden_layers"]
    )
