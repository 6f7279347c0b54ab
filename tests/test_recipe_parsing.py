"""Recipe parsing: located errors (file:line: field path), shorthand, sizes, dtypes, and the
translation of mergekit recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from workbench.cli.main import main
from workbench.engine.run import run_recipe
from workbench.errors import RecipeError, WorkbenchError
from workbench.recipe.schema import load_recipe, parse_recipe, parse_size

WIDE = {"COLUMNS": "1000"}


def error_of(text: str, name: str = "recipe.yaml") -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, name)
    return str(info.value)


def q(path: Path) -> str:
    return json.dumps(str(path))


# ------------------------------------------------------------------------------------------------
# located errors
# ------------------------------------------------------------------------------------------------


def test_unknown_top_level_key_names_the_line() -> None:
    message = error_of("method: linear\nmodels: [a, b]\nmetod: slerp\n")
    assert "recipe.yaml:3" in message and "metod" in message and "unknown field" in message


def test_unknown_top_level_key_from_a_file_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "my-recipe.yaml"
    path.write_text("method: linear\nmodels: [a, b]\nmetod: slerp\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:3: metod" in str(info.value)


def test_unknown_key_through_the_cli(cli: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("method: linear\nmodels: [a, b]\nmetod: slerp\n")
    result = cli.invoke(main, ["validate", str(path)], env=WIDE)
    assert result.exit_code == 2
    assert f"{path}:3: metod" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        (
            "method: linear\nmodels:\n  - a\n  - model: b\n    parameters: {weight: 2}\n    extra: 1\n",
            "recipe.yaml:6: models[1].extra",
            "unknown field",
        ),
        (
            "method: linear\nmodels: [a]\noutput:\n  path: x\n  sharding: 1\n",
            "recipe.yaml:5: output.sharding",
            "unknown field",
        ),
        ("method: linear\nmodels: [a]\nseed: abc\n", "recipe.yaml:3: seed", "integer"),
        ("method: linear\nmodels: [a, '']\n", "recipe.yaml:2: models[1].model", "empty"),
        ("method: linear\nmodels: []\n", "recipe.yaml:2: models", "at least one model"),
        ("method: linear\n", "recipe.yaml:1: (top level): 'models' is missing", "or give 'slices'"),
        ("models: [a]\n", "method", "required"),
        ("method: linear\nmodels: [a]\nparameters: [1, 2]\n", "recipe.yaml:3: parameters", "dictionary"),
    ],
    ids=[
        "nested-unknown",
        "output-unknown",
        "wrong-type",
        "empty-model",
        "no-models",
        "models-missing",
        "method-missing",
        "parameters-not-a-map",
    ],
)
def test_field_errors_name_the_path_and_line(text: str, where: str, says: str) -> None:
    message = error_of(text)
    assert where in message and says in message


def test_every_problem_is_listed() -> None:
    message = error_of("method: linear\nmodels: [a]\nseed: abc\nbogus: 1\n")
    assert "recipe.yaml:3: seed" in message and "recipe.yaml:4: bogus" in message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("method: linear\nmodels:\n  - a\n   b: c\n", 4),
        ("method: linear\nmodels:\n  - a\n\tseed: 1\n", 4),
        ("method: linear\nmodels: [a, b\nseed: 1\n", 3),
    ],
    ids=["mapping-in-sequence", "tab", "unclosed-bracket"],
)
def test_invalid_yaml_gives_the_line(text: str, line: int) -> None:
    message = error_of(text)
    assert f"recipe.yaml:{line}:" in message and "not valid YAML" in message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("", "NoneType"), ("just text\n", "str")])
def test_a_recipe_must_be_a_mapping(text: str, kind: str) -> None:
    message = error_of(text)
    assert "recipe.yaml" in message and "mapping" in message and kind in message


def test_duplicate_keys_are_errors_not_silently_dropped() -> None:
    message = error_of("method: linear\nmodels: [a]\nmodels: [b]\n")
    assert "recipe.yaml:3: models" in message and "line 2" in message
    nested = error_of(
        "method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      weight: 2\n"
    )
    assert "recipe.yaml:6: models[0].parameters.weight" in nested and "line 5" in nested


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value) and "does not exist" in str(info.value)


def test_parameter_errors_name_the_line(tiny_family: dict[str, Path], registry) -> None:
    from workbench.engine.plan import build_plan

    text = (
        "method: linear\n"
        "models:\n"
        f"  - model: {q(tiny_family['ft1'])}\n"
        "    parameters:\n"
        "      weight:\n"
        "        - filter: mlp\n"
        "          value: [0.5, oops]\n"
        f"  - {q(tiny_family['ft2'])}\n"
    )
    recipe = parse_recipe(text, "p.yaml")
    with pytest.raises(RecipeError) as info:
        build_plan(recipe, registry)
    assert "p.yaml:5: models[0].parameters.weight" in str(info.value) and "'oops'" in str(info.value)


# ------------------------------------------------------------------------------------------------
# shorthand, sizes, dtypes
# ------------------------------------------------------------------------------------------------


def test_models_shorthand_is_a_plain_string() -> None:
    recipe = parse_recipe(
        "method: linear\nmodels:\n  - ./a\n  - model: ./b\n    parameters: {weight: 2}\n  - org/name@main\n"
    )
    assert [m.model for m in recipe.models] == ["./a", "./b", "org/name@main"]
    assert [m.parameters for m in recipe.models] == [{}, {"weight": 2}, {}]


def test_defaults() -> None:
    recipe = parse_recipe("method: linear\nmodels: [a]\n")
    assert recipe.dtype == "float32" and recipe.seed == 0 and recipe.base is None and recipe.parameters == {}
    assert (
        recipe.output.path is None and recipe.output.dtype is None and recipe.output.format == "safetensors"
    )
    assert recipe.output.shard_bytes == 5 * 10**9


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("512MiB", 512 * 1024 * 1024),
        (1000, 1000),
        ("1000", 1000),
        ("1.5GB", 1_500_000_000),
        ("2 gb", 2 * 10**9),
        ("10M", 10 * 10**6),
        ("1KiB", 1024),
        ("3TiB", 3 * 2**40),
        ("64b", 64),
    ],
)
def test_shard_size_parsing(value: object, expected: int) -> None:
    assert parse_size(value) == expected  # type: ignore[arg-type]
    text = f"method: linear\nmodels: [a]\noutput:\n  shard_size: {json.dumps(value)}\n"
    assert parse_recipe(text).output.shard_bytes == expected


@pytest.mark.parametrize("value", ["5XB", "-1GB", 0, -3, "0", "lots", "", "0.1b", "5 GB B", True, [1], None])
def test_bad_shard_sizes_are_rejected(value: object) -> None:
    text = f"method: linear\nmodels: [a]\noutput:\n  shard_size: {json.dumps(value)}\n"
    message = error_of(text)
    assert "recipe.yaml:4: output.shard_size" in message


@pytest.mark.parametrize("value", ["5XB", "-1GB", 0, -3, "0", "lots", "", "0.1b", True])
def test_parse_size_rejects_bad_values(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dtype", ["bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float64", "F32", "BF16"]
)
def test_output_dtype_accepts_float_types(dtype: str) -> None:
    assert parse_recipe(f"method: linear\nmodels: [a]\noutput:\n  dtype: {dtype}\n").output.dtype == dtype


@pytest.mark.parametrize("dtype", ["float17", "int8", "I8", "bool", "U8", "I64", "complex64"])
def test_output_dtype_rejects_unknown_and_non_float_types(dtype: str) -> None:
    message = error_of(f"method: linear\nmodels: [a]\noutput:\n  dtype: {dtype}\n")
    assert "recipe.yaml:4: output.dtype" in message and f"'{dtype}'" in message


@pytest.mark.parametrize("dtype", ["int8", "I8", "bool", "float17"])
def test_compute_dtype_must_be_a_float_type(dtype: str) -> None:
    message = error_of(f"method: linear\nmodels: [a]\ndtype: {dtype}\n")
    assert "recipe.yaml:3: dtype" in message and f"'{dtype}'" in message


def test_recipe_round_trips_through_to_yaml() -> None:
    recipe = parse_recipe(
        "method: linear\nmodels:\n  - a\n  - model: b\n"
        "    parameters: {weight: [0.1, 0.9]}\noutput:\n  dtype: bf16\n  shard_size: 2GB\n"
    )
    again = parse_recipe(recipe.to_yaml())
    assert again.model_dump() == recipe.model_dump()


# ------------------------------------------------------------------------------------------------
# mergekit recipes
# ------------------------------------------------------------------------------------------------


def test_mergekit_linear() -> None:
    recipe = parse_recipe(
        "merge_method: linear\n"
        "models:\n"
        "  - model: org/a\n    parameters: {weight: 0.7}\n"
        "  - model: org/b\n    parameters: {weight: 0.3}\n"
        "parameters: {normalize: false}\n"
    )
    assert recipe.method == "linear" and recipe.base is None
    assert [(m.model, m.parameters) for m in recipe.models] == [
        ("org/a", {"weight": 0.7}),
        ("org/b", {"weight": 0.3}),
    ]
    assert recipe.parameters == {"normalize": False}


def test_mergekit_linear_ignores_base_model() -> None:
    recipe = parse_recipe(
        "merge_method: linear\nbase_model: org/a\nmodels:\n  - model: org/a\n  - model: org/b\n"
    )
    assert recipe.base is None and [m.model for m in recipe.models] == ["org/a", "org/b"]


def test_mergekit_slerp_puts_base_model_at_t0() -> None:
    recipe = parse_recipe(
        "merge_method: slerp\nbase_model: org/b\nmodels:\n  - model: org/a\n  - model: org/b\nparameters:\n  t: 0.3\n"
    )
    assert recipe.method == "slerp" and recipe.base is None
    assert [m.model for m in recipe.models] == ["org/b", "org/a"]
    assert recipe.parameters == {"t": 0.3}


def test_mergekit_slerp_needs_base_among_models() -> None:
    message = error_of(
        "merge_method: slerp\nbase_model: org/c\nmodels:\n  - model: org/a\n  - model: org/b\nparameters: {t: 0.5}\n"
    )
    assert "recipe.yaml:2: base_model" in message


@pytest.mark.parametrize(("t", "expected"), [(0.0, "ft2"), (1.0, "ft1")])
def test_mergekit_slerp_end_points_in_a_real_merge(
    tiny_family: dict[str, Path], registry, tmp_path: Path, t: float, expected: str
) -> None:
    """mergekit's slerp returns its base_model at t=0, whatever the order of `models`."""
    recipe = parse_recipe(
        f"merge_method: slerp\nbase_model: {q(tiny_family['ft2'])}\n"
        f"models:\n  - model: {q(tiny_family['ft1'])}\n  - model: {q(tiny_family['ft2'])}\n"
        f"parameters:\n  t: {t}\n",
        "mk.yaml",
    )
    out = tmp_path / "out"
    run_recipe(recipe, out=out, registry=registry)
    merged = load_file(out / "model.safetensors")
    want = load_file(tiny_family[expected] / "model.safetensors")
    assert set(merged) == set(want)
    for name in want:
        assert torch.equal(merged[name], want[name]), name


def test_mergekit_task_arithmetic_drops_base_from_models() -> None:
    recipe = parse_recipe(
        "merge_method: task_arithmetic\n"
        "base_model: org/base\n"
        "models:\n"
        "  - model: org/base\n"
        "  - model: org/math\n    parameters: {weight: 0.5}\n"
        "  - model: org/code\n    parameters: {weight: 0.25}\n"
        "parameters: {lambda: 0.8}\n"
    )
    assert recipe.method == "task_arithmetic" and recipe.base == "org/base"
    assert [(m.model, m.parameters) for m in recipe.models] == [
        ("org/math", {"weight": 0.5}),
        ("org/code", {"weight": 0.25}),
    ]
    assert recipe.parameters == {"lambda": 0.8}


def test_mergekit_task_arithmetic_without_base_in_models() -> None:
    recipe = parse_recipe(
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/math\n"
    )
    assert recipe.base == "org/base" and [m.model for m in recipe.models] == ["org/math"]


@pytest.mark.parametrize(
    ("extra", "dtype", "out_dtype"),
    [
        ("dtype: bfloat16\n", "bfloat16", "bfloat16"),
        ("dtype: float32\nout_dtype: float16\n", "float32", "float16"),
        ("out_dtype: bfloat16\n", "float32", "bfloat16"),
        ("", "float32", None),
    ],
    ids=["dtype-only", "both", "out-only", "neither"],
)
def test_mergekit_dtype_and_out_dtype(extra: str, dtype: str, out_dtype: str | None) -> None:
    recipe = parse_recipe("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n" + extra)
    assert recipe.dtype == dtype
    assert recipe.output.dtype == out_dtype


def test_mergekit_tokenizer_source() -> None:
    """tokenizer_source builds the output vocabulary (rows aligned by token), as in mergekit."""
    for value in ("base", "union", "org/other"):
        recipe = parse_recipe(f"merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: {value}\n")
        assert recipe.tokenizer is not None and recipe.tokenizer.source == value
        assert recipe.tokenizer.builds_vocabulary and recipe.output.copy_tokenizer_from is None
    message = error_of("merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: [union]\n")
    assert "recipe.yaml:4: tokenizer_source" in message and "expected union, base" in message


def test_mergekit_slice_options_beyond_sources_are_named() -> None:
    message = error_of(
        "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n    residual_weight: 0.5\n"
    )
    assert (
        "recipe.yaml:3: slices[0]" in message and "slice option 'residual_weight' is not supported" in message
    )
    message = error_of(
        "merge_method: passthrough\nmodels:\n  - model: a\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
    )
    assert "either 'models' or 'slices'" in message


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("modules", "'modules' is not supported"),
        ("tokenizer", "expected a mapping (source, tokens, pad_to_multiple_of)"),
        ("chat_template", "expected a template name or Jinja text"),
    ],
)
def test_mergekit_unsupported_keys_are_named(key: str, expected: str) -> None:
    """modules is refused by name; tokenizer and chat_template are read, and a bad value is named."""
    message = error_of(f"merge_method: linear\nmodels:\n  - model: a\n{key}: []\n")
    assert f"recipe.yaml:4: {key}" in message and expected in message


def test_mergekit_unknown_key_is_named() -> None:
    message = error_of("merge_method: linear\nmodels:\n  - model: a\nmerge_options: {}\n")
    assert "recipe.yaml:4: merge_options" in message and "unknown mergekit option" in message


def test_mergekit_bad_model_entry() -> None:
    message = error_of("merge_method: linear\nmodels:\n  - org/a\n")
    assert "recipe.yaml:3: models[0]" in message


def test_mergekit_errors_point_at_the_users_line_after_reordering(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    """Dropping the base (task_arithmetic) or moving it first (slerp) must not shift error lines."""
    path = tmp_path / "mk.yaml"
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {q(tiny_family['base'])}\n"
        "models:\n"
        f"  - model: {q(tiny_family['base'])}\n"
        f"  - model: {q(tiny_family['ft1'])}\n"
        "    parameters:\n"
        "      weight: 0.5\n"
        f"  - model: {q(tiny_family['ft2'])}\n"
        "    parameters:\n"
        "      wieght: 0.5\n"  # line 10
    )
    result = cli.invoke(main, ["validate", str(path)], env=WIDE)
    assert result.exit_code == 2
    assert f"{path}:10:" in result.output and "'wieght'" in result.output

    path.write_text(
        "merge_method: slerp\n"
        f"base_model: {q(tiny_family['ft2'])}\n"
        "models:\n"
        f"  - model: {q(tiny_family['ft1'])}\n"
        "    parameters:\n"
        "      t: 0.5\n"  # line 6: slerp has no per-model parameters
        f"  - model: {q(tiny_family['ft2'])}\n"
        "parameters:\n"
        "  t: 0.5\n"
    )
    result = cli.invoke(main, ["validate", str(path)], env=WIDE)
    assert result.exit_code == 2
    assert f"{path}:6:" in result.output and "unknown parameter 't'" in result.output


def test_mergekit_recipe_runs_through_the_cli(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "mk.yaml"
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {q(tiny_family['base'])}\n"
        f"models:\n  - model: {q(tiny_family['base'])}\n"
        f"  - model: {q(tiny_family['ft1'])}\n    parameters: {{weight: 1.0}}\n"
        "dtype: float32\nout_dtype: float32\n"
    )
    out = tmp_path / "out"
    result = cli.invoke(main, ["run", str(path), "--out", str(out), "-q"], env=WIDE)
    assert result.exit_code == 0, result.output
    merged = load_file(out / "model.safetensors")
    ft1 = load_file(tiny_family["ft1"] / "model.safetensors")
    # base + 1 * (ft1 - base) == ft1; stored as float32 (out_dtype)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, ft1[name].float(), rtol=0, atol=1e-6)


def test_recipe_errors_are_workbench_errors() -> None:
    assert issubclass(RecipeError, WorkbenchError) and RecipeError.exit_code == 2


def test_mergekit_density_on_task_arithmetic_runs_with_a_warning(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    """mergekit gives task_arithmetic a per-model density that changes nothing: the recipe runs, the
    result is the one without density, and the warning names the line."""
    path = tmp_path / "mk.yaml"
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {q(tiny_family['base'])}\n"
        f"models:\n  - model: {q(tiny_family['ft1'])}\n"
        "    parameters: {weight: 1.0, density: 0.5}\n"
        "parameters: {density: 0.3}\n"
        "dtype: float32\nout_dtype: float32\n"
    )
    out = tmp_path / "out"
    result = cli.invoke(main, ["run", str(path), "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "mk.yaml:5: models[0].parameters.density: no effect for task_arithmetic" in result.output
    assert "mk.yaml:6: parameters.density: no effect for task_arithmetic" in result.output
    merged = load_file(out / "model.safetensors")
    ft1 = load_file(tiny_family["ft1"] / "model.safetensors")
    for name, tensor in merged.items():  # base + 1 * (ft1 - base): nothing was dropped
        torch.testing.assert_close(tensor, ft1[name].float(), rtol=0, atol=1e-6)
