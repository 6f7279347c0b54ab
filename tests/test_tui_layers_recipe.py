"""The Layers screen (F4) and the Recipe screen (F5), driven through the app with a pilot.

Expected layer maps are written out by hand from each recipe's parameters; the heatmap is checked
against the relative change ‖Δ‖/‖W_base‖ computed here from the tensors (read with safetensors);
the Check message against ``workbench validate`` itself. The models are symlinked into the working
folder and named by relative paths, so the snapshots show no temporary paths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static, TextArea
from tui_helpers import settle

from workbench.cli.main import main
from workbench.errors import RecipeError
from workbench.recipe.schema import load_recipe, parse_recipe
from workbench.registry import Registry
from workbench.tui.app import WorkbenchApp, make_app
from workbench.tui.state import recipe_data

SIZE = (120, 40)
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?(.+?)(?:\.weight|\.bias)?$")


@pytest.fixture
def workdir(tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with ``base``, ``ft1``, ``ft2`` linked in (the shared models stay read-only)."""
    for key, path in tiny_family.items():
        (tmp_path / key).symlink_to(path, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, data: dict[str, Any] | str) -> Path:
    path = Path(name)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def column(table: DataTable, index: int) -> list[str]:
    return [str(table.get_row_at(row)[index]) for row in range(table.row_count)]


def message(app: WorkbenchApp) -> tuple[str, set[str]]:
    label = app.screen.query_one("#recipe-message", Static)
    return str(label.render()), set(label.classes)


SWAP = {
    "method": "layer_swap",
    "models": [
        {"model": "ft1", "parameters": {"role": "language"}},
        {"model": "ft2", "parameters": {"role": "task"}},
    ],
    "parameters": {
        "bottom": 1,
        "transition_bottom": 1,
        "transition_weight": 0.25,
        "top": 1,
        "non_layer": "task",
    },
}


async def test_layer_swap_map_and_editing(workdir: Path, registry: Registry, layers: int) -> None:
    assert layers == 4, "the hand-written map below is for 4 layers"
    app = make_app(write("swap.yaml", SWAP), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        await settle(pilot)
        table = app.screen.query_one("#layer-map", DataTable)
        # bottom 1 (language), 1 transition at 0.25, middle (task), top 1 (language)
        assert column(table, 1) == ["ft1 (language)", "blend", "ft2 (task)", "ft1 (language)"]
        assert column(table, 2) == ["1.00", "0.25", "0.00", "1.00"]
        assert column(table, 3) == ["0.00", "0.75", "1.00", "0.00"]
        status = str(app.screen.query_one("#heatmap-status", Static).render())
        assert "type the models' common base in Reference" in status

        table.move_cursor(row=1)
        await pilot.press("t")
        await settle(pilot)
        # [language, task, task, language] is the plain shape: written back as bottom/top
        assert app.state.data["parameters"] == {"non_layer": "task", "bottom": 1, "top": 1}
        assert column(table, 1) == ["ft1 (language)", "ft2 (task)", "ft2 (task)", "ft1 (language)"]

        table.move_cursor(row=2)
        await pilot.press("l")
        await settle(pilot)
        assert app.state.data["parameters"] == {"non_layer": "task", "bottom": 1, "top": 2}

        table.move_cursor(row=3)
        await pilot.press("t")
        await settle(pilot)
        # [language, task, language, task] has no bottom/top form: an explicit layer_map
        assert app.state.data["parameters"] == {
            "non_layer": "task",
            "layer_map": ["language", "task", "language", "task"],
        }
        assert column(table, 1) == ["ft1 (language)", "ft2 (task)", "ft1 (language)", "ft2 (task)"]
        assert table.cursor_row == 3
        assert app.state.validate().parameters["layer_map"] == ["language", "task", "language", "task"]


async def test_a_layout_the_method_refuses_shows_its_message(workdir: Path, registry: Registry) -> None:
    """The map comes from layer_swap's own checks: 3 + 2 layers of 4 is its error, word for word."""
    recipe = {**SWAP, "parameters": {"bottom": 3, "top": 2}}
    app = make_app(write("swap.yaml", recipe), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        await settle(pilot)
        note = app.screen.query_one("#layer-map-note", Static)
        assert note.render().plain == (
            "error: layer_swap: bottom + transition_bottom + transition_top + top = 3 + 0 + 0 + 2 = 5,"
            " more than the models' 4 layers."
        )
        assert note.has_class("error")
        assert app.screen.query_one("#layer-map", DataTable).row_count == 0
        await pilot.press("t")  # no layer_swap map: the key does nothing
        assert app.state.data["parameters"] == {"bottom": 3, "top": 2}


async def test_slices_show_their_stacking(workdir: Path, registry: Registry) -> None:
    recipe = {
        "method": "passthrough",
        "slices": [
            {"sources": [{"model": "ft1", "layer_range": [0, 3]}]},
            {"sources": [{"model": "ft2", "layer_range": [1, 4]}]},
        ],
    }
    app = make_app(write("stack.yaml", recipe), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        await settle(pilot)
        table = app.screen.query_one("#layer-map", DataTable)
        assert column(table, 0) == ["0", "1", "2", "3", "4", "5"]
        assert column(table, 1) == ["0", "0", "0", "1", "1", "1"]
        assert column(table, 2) == [
            "ft1 layer 0",
            "ft1 layer 1",
            "ft1 layer 2",
            "ft2 layer 1",
            "ft2 layer 2",
            "ft2 layer 3",
        ]


def relative_changes(
    base: dict[str, torch.Tensor], model: dict[str, torch.Tensor]
) -> dict[tuple[int, str], float]:
    """‖ft − base‖ / ‖base‖ per (layer, module), weight and bias together, Δ in float32, sums in float64."""
    sums: dict[tuple[int, str], list[float]] = {}
    for name, tensor in base.items():
        match = LAYER_NAME.match(name)
        if not match or not tensor.is_floating_point():
            continue
        delta = (model[name].float() - tensor.float()).double()
        cell = sums.setdefault((int(match[1]), match[2]), [0.0, 0.0])
        cell[0] += float((delta**2).sum())
        cell[1] += float((tensor.double() ** 2).sum())
    return {key: (d / b) ** 0.5 for key, (d, b) in sums.items()}


GRADIENT = {
    "method": "task_arithmetic",
    "base": "base",
    "models": [{"model": "ft1", "parameters": {"weight": [0.0, 1.0]}}, {"model": "ft2"}],
    "parameters": {"lambda": [1.0, 0.5]},
}


async def test_heatmap_and_gradients(
    workdir: Path, registry: Registry, weights: dict[str, dict[str, torch.Tensor]], layers: int
) -> None:
    app = make_app(write("grad.yaml", GRADIENT), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        await settle(pilot)
        table = app.screen.query_one("#layer-map", DataTable)
        labels = [str(c.label) for c in table.columns.values()]
        assert labels == ["layer", "from", "lambda", "weight[0]"]
        # layer i of 4 sits at t = i/3: lambda 1 → 0.5, ft1's weight 0 → 1
        assert column(table, 2) == ["1", "0.833", "0.667", "0.5"]
        assert column(table, 3) == ["0", "0.333", "0.667", "1"]

        for index, key in enumerate(["ft1", "ft2"]):
            heat = app.screen.query_one(f"#heatmap-{index}", DataTable)
            assert heat.row_count == layers
            modules = [str(key.value) for key in heat.columns][1:-1]
            expected = relative_changes(weights["base"], weights[key])
            assert set(modules) == {module for _, module in expected}
            for layer in range(layers):
                row = heat.get_row_at(layer)
                assert str(row[0]) == str(layer)
                for module, cell in zip(modules, row[1:-1]):
                    assert str(cell) == f"{100 * expected[(layer, module)]:.1f}", (key, layer, module)


async def test_editing_checking_and_applying(workdir: Path, registry: Registry) -> None:
    path = write("recipe.yaml", {"method": "linear", "models": ["ft1", "ft2"]})
    app = make_app(path, registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        editor = app.screen.query_one("#recipe-yaml", TextArea)
        assert yaml.safe_load(editor.text) == app.state.data

        await pilot.press("ctrl+k")
        await settle(pilot)
        validated = CliRunner().invoke(main, ["validate", str(path)])
        assert validated.exit_code == 0, validated.output
        text, classes = message(app)
        assert " ".join(text.split()) == " ".join(validated.output.split())
        assert "ok" in classes

        before = json.loads(json.dumps(app.state.data))
        bad = "method: linear\nmodels: [ft1, ft2]\nparameters: {}\nbogus: 1\n"
        editor.load_text(bad)
        await pilot.click("#apply")
        with pytest.raises(RecipeError) as expected:
            parse_recipe(bad, app.state.name)
        text, classes = message(app)
        assert text == f"error: {expected.value}" and "error" in classes
        assert app.state.data == before

        edited = (
            "method: task_arithmetic\nbase: base\nmodels:\n"
            "  - model: ft1\n    parameters: {weight: 0.5}\n  - ft2\n"
        )
        editor.load_text(edited)
        await pilot.pause(0.25)  # a Button ignores clicks during its 0.2 s press effect
        await pilot.click("#apply")
        assert app.state.data == recipe_data(parse_recipe(edited))
        assert "ok" in message(app)[1]

        # the other screens see it on their next refresh: the layer map now has task_arithmetic's rows
        await pilot.press("f4")
        await settle(pilot)
        assert app.screen.query_one("#layer-map-note", Static).render().plain.startswith("task_arithmetic:")


async def test_saving_and_opening(workdir: Path, registry: Registry) -> None:
    app = make_app(write("recipe.yaml", {"method": "linear", "models": ["ft1", "ft2"]}), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        path_input = app.screen.query_one("#recipe-path", Input)
        assert path_input.value == "recipe.yaml"

        path_input.value = "missing/out.yaml"
        await pilot.press("ctrl+s")
        text, classes = message(app)
        assert text.startswith("error: cannot save the recipe to missing/out.yaml") and "error" in classes
        assert not Path("missing").exists()

        path_input.value = "out.yaml"
        await pilot.press("ctrl+s")
        assert message(app) == ("saved out.yaml.", {"ok"})
        assert recipe_data(load_recipe("out.yaml")) == app.state.data
        assert app.state.path == Path("out.yaml")
        assert sorted(p.name for p in Path().iterdir()) == ["base", "ft1", "ft2", "out.yaml", "recipe.yaml"]

        write(
            "mk.yaml",
            "merge_method: slerp\nbase_model: ft2\nmodels:\n"
            "  - model: ft1\n  - model: ft2\nparameters:\n  t: [0.0, 0.3]\n",
        )
        path_input.value = "mk.yaml"
        await pilot.press("ctrl+o")
        assert message(app) == ("opened mk.yaml.", {"ok"})
        # mergekit's slerp: base_model is the t = 0 end, so it comes first
        assert app.state.data["method"] == "slerp"
        assert [m["model"] for m in app.state.models] == ["ft2", "ft1"]
        assert app.state.data["parameters"] == {"t": [0.0, 0.3]}
        # a mergekit recipe is shown (and saved) as mergekit YAML, which reads back to the same recipe
        shown = app.screen.query_one("#recipe-yaml", TextArea).text
        assert "merge_method" in yaml.safe_load(shown)
        assert recipe_data(parse_recipe(shown)) == app.state.data

        path_input.value = "nothing.yaml"
        await pilot.press("ctrl+o")
        assert message(app)[0] == "error: recipe file nothing.yaml does not exist."
        assert app.state.data["method"] == "slerp"


# -- snapshots ------------------------------------------------------------------------------------


def no_blink(app: WorkbenchApp) -> None:
    for widget in app.screen.query("Input, TextArea"):
        widget.cursor_blink = False  # type: ignore[attr-defined]


def test_layers_snapshot(workdir: Path, registry: Registry, snap_compare: Any) -> None:
    async def show(pilot: Pilot) -> None:
        await pilot.press("f4")
        await settle(pilot)

    assert snap_compare(
        make_app(write("grad.yaml", GRADIENT), registry=registry), terminal_size=SIZE, run_before=show
    )


def test_recipe_snapshot(workdir: Path, registry: Registry, snap_compare: Any) -> None:
    async def show(pilot: Pilot) -> None:
        await pilot.press("f5")
        await pilot.pause()
        no_blink(pilot.app)  # type: ignore[arg-type]
        await pilot.press("ctrl+k")
        await settle(pilot)

    assert snap_compare(
        make_app(write("grad.yaml", GRADIENT), registry=registry), terminal_size=SIZE, run_before=show
    )


def test_help_snapshot(workdir: Path, registry: Registry, snap_compare: Any) -> None:
    async def show(pilot: Pilot) -> None:
        await pilot.press("f4")
        await settle(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(
        make_app(write("swap.yaml", SWAP), registry=registry), terminal_size=SIZE, run_before=show
    )


def test_the_layer_map_is_editable_for_any_method_that_offers_a_swap_layout(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TUI finds an editable map through the contract's LayerSwapLayout, not by a method's name: a
    method class with both class methods gets it, one without does not."""
    from workbench.method import LayerSwapLayout
    from workbench.registry import PluginInfo, Registered
    from workbench.tui.layer_map import swap_layout

    swap = registry.method("layer_swap")
    assert isinstance(swap, LayerSwapLayout)
    assert not isinstance(registry.method("ties"), LayerSwapLayout)

    class Renamed(swap):  # type: ignore[misc, valid-type]
        name = "my_swap"

    monkeypatch.setitem(registry.methods, "my_swap", Registered(Renamed, PluginInfo("test", "test", "0")))
    assert swap_layout({"method": "my_swap"}, registry) is Renamed
    assert swap_layout({"method": "ties"}, registry) is None
    assert swap_layout({"method": "no_such_method"}, registry) is None
    # the renamed method's layout is the plugin's own: 4 layers, bottom 1 and top 1 from the language expert
    weights, task, language = Renamed.layer_layout({"bottom": 1, "top": 1}, [{}, {}], 4)
    assert (weights, task, language) == ([1.0, 0.0, 0.0, 1.0], 0, 1)
