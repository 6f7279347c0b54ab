"""Whole flows through the terminal UI, driven by keys and clicks on tiny models: compose a
layer_swap recipe from nothing, save it, run it, and get what ``workbench run`` of the saved file
gives; open a mergekit recipe and run it. (Cancel and push have their own tests in
test_tui_run_publish.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from textual.pilot import Pilot
from textual.widgets import Input, Select
from tui_helpers import settle, until

from workbench.cli.main import main
from workbench.recipe.schema import load_recipe
from workbench.registry import load_registry
from workbench.tui.app import WorkbenchApp, make_app


async def type_into(pilot: Pilot[Any], selector: str, text: str) -> None:
    """Focus a field by clicking it and enter ``text``: short values key by key, paths pasted
    (typing a long path key by key costs ~80 ms a key in a pilot)."""
    field = pilot.app.screen.query_one(selector, Input)
    await pilot.click(selector)
    field.value = ""
    if len(text) <= 4:
        await pilot.press(*text)
    else:
        field.insert_text_at_cursor(text)
    await pilot.pause()


def cli_run(recipe: Path, out: Path) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return load_file(out / "model.safetensors")


async def run_to(pilot: Pilot[Any], out: Path) -> None:
    """Run the state on the Run screen into ``out`` and wait for the merge thread to return."""
    await pilot.press("f6")
    await settle(pilot)
    await type_into(pilot, "#run-output", str(out))
    await pilot.press("ctrl+r")
    await pilot.pause()
    await until(pilot, lambda: not pilot.app.screen.busy)  # type: ignore[attr-defined]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


async def test_compose_a_layer_swap_from_scratch_save_and_run(
    tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    saved = tmp_path / "swap.yaml"
    app: WorkbenchApp = make_app(saved, registry=load_registry())  # a new file: an empty composition
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        for key in ("ft1", "ft2"):  # the task expert first, then the language expert
            await type_into(pilot, "#model-ref", str(tiny_family[key]))
            await pilot.press("enter")
            await settle(pilot)
        assert [m["model"] for m in app.state.models] == [str(tiny_family["ft1"]), str(tiny_family["ft2"])]

        await pilot.press("f3")
        await settle(pilot)
        app.screen.query_one("#method-select", Select).value = "layer_swap"
        await settle(pilot)
        await type_into(pilot, "#param-bottom", "1")
        await type_into(pilot, "#param-top", "1")
        await settle(pilot)
        assert app.state.data["method"] == "layer_swap"
        assert app.state.data["parameters"] == {"bottom": 1, "top": 1}

        await pilot.press("f5")
        await settle(pilot)
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert saved.is_file()

        await run_to(pilot, tmp_path / "from-tui")
        assert (tmp_path / "from-tui" / "model.safetensors").is_file(), app.screen.query_one(
            "#run-error"
        ).render()

    recipe = load_recipe(saved)
    assert (recipe.method, [m.model for m in recipe.models], recipe.parameters) == (
        "layer_swap",
        [str(tiny_family["ft1"]), str(tiny_family["ft2"])],
        {"bottom": 1, "top": 1},
    )
    from_tui = load_file(tmp_path / "from-tui" / "model.safetensors")
    assert_same(from_tui, cli_run(saved, tmp_path / "from-cli"))
    # and it is the swap the recipe asks for: layer 0 and the last layer from ft2 (language),
    # the rest and embeddings from ft1
    layers = json.loads((tiny_family["base"] / "config.json").read_text())["num_hidden_layers"]
    ft1, ft2 = (load_file(tiny_family[k] / "model.safetensors") for k in ("ft1", "ft2"))
    for layer, source in [(0, ft2), (1, ft1), (layers - 2, ft1), (layers - 1, ft2)]:
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(from_tui[name], source[name]), name
    assert torch.equal(from_tui["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"])


async def test_open_a_mergekit_recipe_and_run_it(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    mergekit = tmp_path / "mergekit.yml"
    mergekit.write_text(
        "merge_method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n    parameters: {{weight: 0.75}}\n"
        "dtype: float32\n"
    )
    app: WorkbenchApp = make_app(registry=load_registry())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f5")
        await settle(pilot)
        await type_into(pilot, "#recipe-path", str(mergekit))
        await pilot.press("ctrl+o")
        await settle(pilot)
        assert app.state.method == "linear" and [m["parameters"] for m in app.state.models] == [
            {"weight": 0.25},
            {"weight": 0.75},
        ]
        await run_to(pilot, tmp_path / "from-tui")
    assert_same(
        load_file(tmp_path / "from-tui" / "model.safetensors"), cli_run(mergekit, tmp_path / "from-cli")
    )


async def test_every_screen_key_works_from_any_screen(tiny_family: dict[str, Path]) -> None:
    """Priority keys: even from the recipe editor, which has F6/F7 of its own; F1 opens and closes help."""
    app: WorkbenchApp = make_app(registry=load_registry())
    expected = {
        "f2": "ModelsScreen",
        "f3": "MethodScreen",
        "f4": "LayersScreen",
        "f5": "RecipeScreen",
        "f6": "RunScreen",
        "f7": "PublishScreen",
    }
    async with app.run_test(size=(120, 40)) as pilot:
        for key, screen in expected.items():
            await pilot.press("f5")
            await settle(pilot)
            await pilot.click("#recipe-yaml")
            await pilot.press(key)
            await settle(pilot)
            assert type(app.screen).__name__ == screen
        await pilot.press("f1")
        await pilot.pause()
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("f1")
        await pilot.pause()
        assert type(app.screen).__name__ == "PublishScreen"
