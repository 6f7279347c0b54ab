"""The TUI's Models and Method screens, driven with Textual's pilot: models are opened (headers
only) and flagged with the reason when they cannot be merged; the method form is generated from the
method's schema, checks values as they are typed and writes valid ones into the recipe with their
types. Two snapshot tests pin the screens' look (relative model paths, so no tmp path is drawn)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Select, Static, Switch
from tui_helpers import settle

from workbench.registry import Registry, load_registry
from workbench.tui.app import WorkbenchApp, make_app
from workbench.tui.screens.models import ModelsScreen

SIZE = (120, 40)


@pytest.fixture(scope="module")
def models_dir(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with links to the tiny family and one fine-tune whose norm has another shape."""
    root = tmp_path_factory.mktemp("models")
    for key in ("base", "ft1", "ft2"):
        (root / key).symlink_to(tiny_family[key], target_is_directory=True)
    odd = root / "odd"
    shutil.copytree(tiny_family["ft1"], odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:32].clone()
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def builtin_registry() -> Registry:
    return load_registry()


async def add_models(pilot: Pilot[None], *refs: str) -> None:
    field = pilot.app.screen.query_one("#model-ref", Input)
    for ref in refs:
        await pilot.click("#model-ref")
        field.value = ref  # typing a long tmp path key by key only costs time
        await pilot.press("enter")
    await settle(pilot)


def row(app: WorkbenchApp, ref: str) -> list[str]:
    table: DataTable[str] = app.screen.query_one("#models-table", DataTable)
    return [str(cell) for cell in table.get_row(ref)]


async def choose(pilot: Pilot[None], selector: str, value: Any) -> None:
    pilot.app.screen.query_one(selector, Select).value = value
    await settle(pilot)


async def type_into(pilot: Pilot[None], selector: str, text: str) -> None:
    field = pilot.app.screen.query_one(selector, Input)
    field.value = ""
    field.focus()  # scrolls it into view (a click could miss a field below the fold)
    await pilot.pause()
    await pilot.press(*text)
    await pilot.pause()


def error_text(app: WorkbenchApp, field_id: str) -> str:
    error = app.screen.query_one(f"#{field_id}-error", Static)
    assert error.has_class("error")
    return str(error.render()) if error.display else ""


# -- Models ----------------------------------------------------------------------------------------


async def test_added_models_show_their_facts(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, builtin_registry: Registry
) -> None:
    monkeypatch.chdir(models_dir)
    layers = json.loads((models_dir / "base" / "config.json").read_text())["num_hidden_layers"]
    app = make_app(registry=builtin_registry)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, ModelsScreen)
        await add_models(pilot, "base", "ft1")
        for ref in ("base", "ft1"):
            cells = row(app, ref)
            assert cells[2] == "LlamaForCausalLM (llama)"
            assert cells[3] == str(layers)
            assert cells[5] == "BF16" and cells[6] == "ok"
        assert app.state.data["models"] == [
            {"model": "base", "parameters": {}},
            {"model": "ft1", "parameters": {}},
        ]
        await choose(pilot, "#base-select", "base")
        assert app.state.data["base"] == "base"
        assert app.state.data["models"] == [{"model": "ft1", "parameters": {}}]
        assert row(app, "base")[1] == "base"
        await choose(pilot, "#base-select", Select.NULL)  # no base: it is a model again
        assert "base" not in app.state.data and [m["model"] for m in app.state.data["models"]] == [
            "base",
            "ft1",
        ]


async def test_missing_and_incompatible_models_are_flagged(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, builtin_registry: Registry
) -> None:
    monkeypatch.chdir(models_dir)
    app = make_app(registry=builtin_registry)
    async with app.run_test(size=SIZE) as pilot:
        await add_models(pilot, "base", "nowhere", "odd")
        problems = str(app.screen.query_one("#model-problems", Static).render())
        assert row(app, "nowhere")[6] == "cannot open"
        assert "nowhere: model path nowhere does not exist." in problems
        assert row(app, "odd")[6] == "incompatible"
        assert "odd: tensor 'model.norm.weight' has shape [32] here, [64] in the first model" in problems
        await choose(pilot, "#base-select", "base")
        problems = str(app.screen.query_one("#model-problems", Static).render())
        assert "[64] in base" in problems
        # Removing the missing one (cursor on its row, Delete) leaves the recipe without it.
        table: DataTable[str] = app.screen.query_one("#models-table", DataTable)
        table.move_cursor(row=table.get_row_index("nowhere"))
        table.focus()
        await pilot.press("delete")
        await settle(pilot)
        assert [m["model"] for m in app.state.data["models"]] == ["odd"]


async def test_existing_per_model_parameters_are_kept(
    tiny_family: dict[str, Path], tmp_path: Path, builtin_registry: Registry
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: linear\nmodels:\n  - model: {tiny_family['ft1']}\n"
        f"    parameters: {{weight: 0.3}}\n  - {tiny_family['ft2']}\n"
    )
    app = make_app(recipe, registry=builtin_registry)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await add_models(pilot, str(tiny_family["base"]))
        await choose(pilot, "#base-select", str(tiny_family["ft1"]))
        await choose(pilot, "#base-select", Select.NULL)
        entries = {m["model"]: m["parameters"] for m in app.state.data["models"]}
        assert entries[str(tiny_family["ft1"])] == {"weight": 0.3}
        assert len(entries) == 3


# -- Method ----------------------------------------------------------------------------------------


async def test_method_form_follows_the_schema_and_checks_values(
    tiny_family: dict[str, Path], tmp_path: Path, builtin_registry: Registry
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: linear\nbase: {tiny_family['base']}\nmodels: [{tiny_family['ft1']}, {tiny_family['ft2']}]\n"
    )
    app = make_app(recipe, registry=builtin_registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await settle(pilot)
        screen = app.screen
        check = screen.query_one("#recipe-check", Static)
        assert check.has_class("error") and "does not use a base model" in str(check.render())
        await choose(pilot, "#method-select", "ties")
        assert app.state.data["method"] == "ties"
        assert "TIES" in str(screen.query_one("#method-info", Static).render())
        assert isinstance(screen.query_one("#param-normalize"), Switch)
        assert isinstance(screen.query_one("#param-rescale_mode"), Select)
        assert screen.query_one("#param-lambda", Input).type == "text"  # per layer: takes a list
        assert {"#model-0-param-weight", "#model-1-param-density"} <= {f"#{w}" for w in screen.fields}
        assert check.has_class("ok")

        await type_into(pilot, "#model-1-param-density", "1.5")
        assert "parameter 'density' = 1.5 is invalid: Input should be less than or equal to 1" in error_text(
            app, "model-1-param-density"
        )
        # kept as typed (never dropped silently): the recipe is not ok until it is fixed
        assert app.state.data["models"][1]["parameters"].get("density") == 1.5
        assert check.has_class("error") and "density" in str(check.render())
        await type_into(pilot, "#model-1-param-density", "0.5")
        assert error_text(app, "model-1-param-density") == ""
        assert app.state.data["models"][1]["parameters"] == {"density": 0.5}

        await type_into(pilot, "#param-lambda", "[0, 0.5, 1]")
        assert app.state.data["parameters"] == {"lambda": [0, 0.5, 1]}
        await type_into(pilot, "#model-0-param-weight", "abc")
        assert "parameter 'weight' = 'abc' is invalid" in error_text(app, "model-0-param-weight")
        await type_into(pilot, "#model-0-param-weight", "2")
        assert app.state.data["models"][0]["parameters"] == {"weight": 2}

        await choose(pilot, "#param-rescale_mode", "inverse_density")
        app.screen.query_one("#param-rescale", Switch).focus()
        await pilot.press("space")
        await pilot.pause()
        assert app.state.data["parameters"] == {
            "lambda": [0, 0.5, 1],
            "rescale_mode": "inverse_density",
            "rescale": True,
        }
        assert check.has_class("ok")


async def test_number_fields_store_numbers(tiny_family: dict[str, Path], builtin_registry: Registry) -> None:
    app = make_app(registry=builtin_registry)
    app.state.data = {"method": "layer_swap", "models": [str(tiny_family["ft1"]), str(tiny_family["ft2"])]}
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await settle(pilot)
        assert app.screen.query_one("#param-bottom", Input).type == "integer"
        await type_into(pilot, "#param-bottom", "2")
        assert app.state.data["parameters"]["bottom"] == 2 and isinstance(
            app.state.data["parameters"]["bottom"], int
        )
        await choose(pilot, "#method-select", "atlas")
        assert app.screen.query_one("#param-init", Input).type == "number"
        await type_into(pilot, "#param-init", "1")
        assert app.state.data["parameters"] == {"init": 1.0} and isinstance(
            app.state.data["parameters"]["init"], float
        )


PLUGIN = """
    from typing import Literal
    from workbench import hookimpl
    from workbench.method import MergeMethod, MethodParameters, Param


    class Params(MethodParameters):
        strength: float = Param(0.5, description="How hard to merge.", ge=0, le=2)
        mode: Literal["soft", "hard"] = Param("soft", description="The flavour.", per_layer=False)


    class Fancy(MergeMethod):
        name = "fancy_merge"
        summary = "A third-party method for the TUI test."
        paper = "https://example.org/fancy"
        Parameters = Params

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    @hookimpl
    def register_methods(register):
        register(Fancy)
"""


async def test_a_third_party_method_gets_a_form(
    make_plugin: Callable[..., str], _no_plugin_env: None
) -> None:
    make_plugin("workbench-fancy", "fancy", PLUGIN)
    app = make_app(registry=load_registry())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await settle(pilot)
        await choose(pilot, "#method-select", "fancy_merge")
        info = str(app.screen.query_one("#method-info", Static).render())
        assert (
            "A third-party method" in info
            and "https://example.org/fancy" in info
            and "workbench-fancy" in info
        )
        await type_into(pilot, "#param-strength", "3")
        assert "parameter 'strength' = 3 is invalid" in error_text(app, "param-strength")
        await type_into(pilot, "#param-strength", "[0, 1]")
        await choose(pilot, "#param-mode", "hard")
        assert app.state.data["parameters"] == {"strength": [0, 1], "mode": "hard"}


# -- Snapshots -------------------------------------------------------------------------------------


def _snapshot_app(models_dir: Path, monkeypatch: pytest.MonkeyPatch, registry: Registry) -> WorkbenchApp:
    monkeypatch.chdir(models_dir)
    return make_app(registry=registry)


def test_models_screen_snapshot(
    snap_compare: Callable[..., bool],
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    builtin_registry: Registry,
) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        await add_models(pilot, "base", "ft1", "odd", "nowhere")
        await choose(pilot, "#base-select", "base")

    app = _snapshot_app(models_dir, monkeypatch, builtin_registry)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_method_screen_snapshot(
    snap_compare: Callable[..., bool],
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    builtin_registry: Registry,
) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, WorkbenchApp)
        app.state.data = {
            "method": "task_arithmetic",
            "base": "base",
            "models": [{"model": "ft1", "parameters": {"weight": 0.7}}, "ft2"],
        }
        await pilot.press("f3")
        await settle(pilot)
        await type_into(pilot, "#model-1-param-weight", "x")
        app.set_focus(None)
        await pilot.pause()

    app = _snapshot_app(models_dir, monkeypatch, builtin_registry)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
