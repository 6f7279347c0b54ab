"""Bad output paths through the CLI: outputs inside inputs and the reverse, existing outputs, failures mid-merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_failures import COMMANDS, assert_failed, copy_model, invoke, linear_recipe, partial_of
from click.testing import CliRunner
from safetensors.torch import load_file

# ------------------------------------------------------------------------------------------------
# the output location
# ------------------------------------------------------------------------------------------------


@COMMANDS
def test_output_inside_an_input_folder(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "input")
    before = sorted(p.name for p in model.iterdir())
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = model / "merged"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(out), "inside input", "models[0]")
    assert result.output.count(str(model)) == 2, result.output  # in the output's path and once for the input
    assert sorted(p.name for p in model.iterdir()) == before


@COMMANDS
def test_output_equal_to_an_input_folder(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "input")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    result = invoke(cli, command, recipe, model, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "inside input" in result.output and str(model) in result.output
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not partial_of(model).exists()


@COMMANDS
def test_input_inside_the_output_folder(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    parent = tmp_path / "parent"
    model = copy_model(tiny_family["ft1"], parent / "input")
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    result = invoke(cli, command, recipe, parent, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "inside the output folder" in result.output and str(parent) in result.output
    assert (model / "model.safetensors").is_file()
    assert not partial_of(parent).exists()


@COMMANDS
def test_existing_output_without_overwrite(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"])
    result = invoke(cli, command, recipe, out)
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and "already exists" in result.output and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "an earlier result"
    assert not partial_of(out).exists()


def test_overwrite_replaces_an_existing_output(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"])
    result = invoke(cli, "run", recipe, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert not partial_of(out).exists()
    assert [p.name for p in tmp_path.iterdir() if ".old" in p.name] == []
    a = load_file(tiny_family["ft1"] / "model.safetensors")["model.norm.weight"].double()
    b = load_file(tiny_family["ft2"] / "model.safetensors")["model.norm.weight"].double()
    merged = load_file(out / "model.safetensors")["model.norm.weight"].double()
    torch.testing.assert_close(merged, (a + b) / 2, rtol=8e-3, atol=1e-6)


def test_failure_during_the_merge_leaves_nothing(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    """Weights that sum to 0 fail inside the method, after the output folder was started."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n    parameters: {{weight: -1.0}}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, "run", recipe, out)
    assert_failed(result, out, "sum to 0", "'model.embed_tokens.weight'")


def test_failure_with_overwrite_keeps_the_old_output(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: 2.0}}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n    parameters: {{weight: -2.0}}\n"
    )
    result = invoke(cli, "run", recipe, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "sum to 0" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not partial_of(out).exists()


@COMMANDS
@pytest.mark.parametrize("odd", ["[/v2]", "[red]x", "[bold]"])
def test_paths_with_brackets_are_shown_verbatim(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, odd: str
) -> None:
    """Messages are not read as rich markup: the path is printed as it is, and nothing crashes."""
    folder = tmp_path / "models" / odd
    folder.mkdir(parents=True)
    recipe = linear_recipe(tmp_path, folder, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(folder), "not a model folder")


@COMMANDS
def test_input_where_the_engine_writes_first(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    """The output is written into ``<out>.partial`` first: an input stored there is refused."""
    out = tmp_path / "merged"
    model = copy_model(tiny_family["ft1"], tmp_path / "merged.partial")
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    result = invoke(cli, command, recipe, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert str(model) in result.output and "written first" in result.output
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert not out.exists()


def test_a_users_folder_named_like_the_scratch_folder_is_never_deleted(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    scratch = tmp_path / "merged.partial"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("mine")
    result = invoke(cli, "run", linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"]), out)
    assert result.exit_code == 2, result.output
    assert "not made by workbench" in result.output
    assert (scratch / "notes.txt").read_text() == "mine"
    assert not out.exists()


def test_replacing_an_output_leaves_neighbouring_folders_alone(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    model = copy_model(tiny_family["ft1"], tmp_path / "merged.old")
    result = invoke(cli, "run", linear_recipe(tmp_path, model, tiny_family["ft2"]), out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".merged", "merged"))) == [
        "merged",
        "merged.old",
    ]


def test_an_output_on_a_virtual_file_system_is_refused_as_such(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"])
    result = invoke(cli, "run", recipe, Path("/proc/workbench-out"))
    assert result.exit_code == 2, result.output
    assert "virtual file system" in result.output and "GB free" not in result.output
