"""passthrough (mergekit's copy method) and `workbench convert` (mergekit recipe -> native)."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from workbench.cli.main import main
from workbench.engine.run import run_recipe
from workbench.recipe.schema import parse_recipe


def test_passthrough_copies_bit_exactly_and_scales(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    source = load_file(tiny_family["ft1"] / "model.safetensors")
    run_recipe(
        parse_recipe(f"merge_method: passthrough\nmodels:\n  - model: {tiny_family['ft1']}\n"),
        out=tmp_path / "copy",
    )
    copied = load_file(tmp_path / "copy" / "model.safetensors")
    assert all(source[k].dtype == copied[k].dtype and source[k].equal(copied[k]) for k in source)
    text = (
        f"method: passthrough\nmodels:\n  - model: {tiny_family['ft1']}\n    parameters:\n"
        "      scale:\n        - filter: mlp\n          value: 0.5\noutput: {dtype: float32}\n"
    )
    run_recipe(parse_recipe(text), out=tmp_path / "scaled")
    scaled = load_file(tmp_path / "scaled" / "model.safetensors")
    for name, tensor in source.items():
        factor = 0.5 if "mlp" in name else 1.0
        assert scaled[name].equal(tensor.float() * factor)


def test_convert_writes_the_equivalent_native_recipe(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    mergekit = tmp_path / "mk.yml"
    mergekit.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tiny_family['base']}\nmodels:\n"
        f"  - model: {tiny_family['base']}\n  - model: {tiny_family['ft1']}\n    parameters: {{weight: 0.5}}\n"
        "parameters: {lambda: 0.8}\ndtype: bfloat16\n"
    )
    native = tmp_path / "native.yaml"
    result = cli.invoke(main, ["convert", str(mergekit), "-o", str(native)])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(native.read_text())
    assert data["method"] == "task_arithmetic" and data["base"] == str(tiny_family["base"])
    assert data["models"] == [{"model": str(tiny_family["ft1"]), "parameters": {"weight": 0.5}}]
    assert (
        data["parameters"] == {"lambda": 0.8}
        and data["dtype"] == "bfloat16"
        and data["output"]["dtype"] == "bfloat16"
    )
    # Both recipes produce the same merge.
    assert cli.invoke(main, ["run", str(mergekit), "--out", str(tmp_path / "a")]).exit_code == 0
    assert cli.invoke(main, ["run", str(native), "--out", str(tmp_path / "b")]).exit_code == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)


def test_unsupported_mergekit_method_is_named(cli: CliRunner, tmp_path: Path) -> None:
    recipe = tmp_path / "mk.yml"
    recipe.write_text("merge_method: frankenmerge\nmodels:\n  - model: a\n")
    result = cli.invoke(main, ["convert", str(recipe)])
    assert result.exit_code == 2
    assert "'frankenmerge' is not supported" in result.output and "mk.yml:1" in result.output
