"""Saving never destroys a user's file, quitting never loses changes, and the recipe editor lets
focus go (issue 28): an opened mergekit recipe is saved as mergekit YAML (which reads back to the
same native recipe) unless the user saves it as native; Ctrl+Q with unsaved changes asks (save /
discard / cancel); Tab, Shift+Tab and Escape leave the editor. The mergekit writer is also tested on
its own: every recipe it writes translates back to the recipe it was given."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from textual.widgets import Input, TextArea
from tui_helpers import linked, settle, shown

from workbench.errors import RecipeError
from workbench.recipe.mergekit_writer import native_data, to_mergekit
from workbench.recipe.schema import load_recipe, parse_recipe
from workbench.registry import Registry
from workbench.tui.app import make_app
from workbench.tui.quit_dialog import QuitDialog

SIZE = (120, 40)
MERGEKIT = (
    "merge_method: ties\nbase_model: base\nmodels:\n"
    "  - model: ft1\n    parameters: {weight: 0.6, density: 0.5}\n"
    "  - model: ft2\n    parameters: {weight: 0.4, density: 0.7}\n"
    "parameters:\n  normalize: true\ndtype: bfloat16\n"
)


@pytest.fixture
def workdir(tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(linked(tiny_family, tmp_path))
    return tmp_path


# -- the mergekit writer, headless -------------------------------------------------------------------

ROUND_TRIPS = {
    "ties": MERGEKIT,
    "slerp": "merge_method: slerp\nbase_model: b\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: [0.0, 0.3]\n",
    "linear": "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.25}\n"
    "  - model: b\n    parameters: {weight: 0.75}\ndtype: float32\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: c\nmodels:\n  - model: a\n"
    "    parameters: {weight: 1.0}\nparameters: {lambda: 0.5}\ndtype: float16\nout_dtype: bfloat16\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources:\n    - model: a\n      layer_range: [0, 2]\n"
    "  - sources:\n    - model: b\n      layer_range: [1, 3]\n",
    "chat_template": "merge_method: linear\nmodels:\n  - model: a\n  - model: b\nchat_template: chatml\n",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_mergekit_written_back_translates_to_the_same_recipe(name: str) -> None:
    original = native_data(parse_recipe(ROUND_TRIPS[name]))
    written = to_mergekit(original)
    assert "merge_method" in yaml.safe_load(written.text) and written.left_out == {}
    assert native_data(parse_recipe(written.text)) == original


def test_workbench_only_settings_are_left_out_by_name() -> None:
    data = native_data(parse_recipe(MERGEKIT)) | {"seed": 3, "output": {"path": "out", "dtype": "bfloat16"}}
    written = to_mergekit(data)
    assert written.left_out == {"seed": 3, "output": {"path": "out"}}
    assert written.left_out_keys == ["seed", "output.path"]
    assert "seed" not in yaml.safe_load(written.text) and "output" not in yaml.safe_load(written.text)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"method": "layer_swap", "models": ["a", "b"]}, "no method 'layer_swap'"),
        ({"method": "linear", "models": ["a", "b"], "dtype": "float16"}, "output's dtype"),
    ],
)
def test_what_mergekit_cannot_say_is_refused(data: dict, why: str) -> None:
    with pytest.raises(RecipeError, match=why):
        to_mergekit(data)


# -- saving from the app -----------------------------------------------------------------------------


async def test_an_opened_mergekit_recipe_is_saved_as_mergekit(workdir: Path, registry: Registry) -> None:
    Path("mk.yml").write_text(MERGEKIT)
    original = native_data(load_recipe("mk.yml"))
    app = make_app(Path("mk.yml"), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f6")  # the output folder: a workbench setting mergekit YAML has no place for
        await settle(pilot)
        app.screen.query_one("#run-output", Input).value = "merged"
        await pilot.press("f5")
        await settle(pilot)
        editor = app.screen.query_one("#recipe-yaml", TextArea)
        assert "merge_method" in yaml.safe_load(editor.text)  # the editor shows what will be written
        assert "output.path" in shown(app, "#recipe-format")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert shown(app, "#recipe-message").startswith("saved mk.yml as mergekit YAML.")
        assert "output.path" in shown(app, "#recipe-message")
        saved = Path("mk.yml").read_text()
        assert saved == editor.text
        assert {"merge_method", "base_model", "models"} <= set(yaml.safe_load(saved))
        assert native_data(load_recipe("mk.yml")) == original
        assert not app.state.changed and app.state.data["output"] == {"path": "merged", "dtype": "bfloat16"}

        # native on request: the output folder is kept in the file and survives a reopen
        app.screen.query_one("#recipe-path", Input).value = "native.yaml"
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert shown(app, "#recipe-message") == "saved native.yaml."
        assert "merge_method" not in yaml.safe_load(Path("native.yaml").read_text())
        assert load_recipe("native.yaml").output.path == "merged"
        assert "merge_method" not in yaml.safe_load(editor.text)


async def test_quit_with_unsaved_changes_asks_first(workdir: Path, registry: Registry) -> None:
    Path("r.yaml").write_text("method: linear\nmodels: [ft1, ft2]\n")
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.state.data["parameters"] = {"normalize": False}  # a change, as any form makes it
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, QuitDialog) and app.return_code is None
        await pilot.press("escape")  # cancel
        await pilot.pause()
        assert not isinstance(app.screen, QuitDialog) and app.return_code is None

        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#quit-save")
        await settle(pilot)
        assert app.return_code == 0
    assert yaml.safe_load(Path("r.yaml").read_text())["parameters"] == {"normalize": False}


async def test_quit_discards_after_confirmation_and_quits_at_once_when_saved(
    workdir: Path, registry: Registry
) -> None:
    Path("r.yaml").write_text("method: linear\nmodels: [ft1, ft2]\n")
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.state.data["models"].pop()
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, QuitDialog)
        await pilot.click("#quit-discard")
        await pilot.pause()
        assert app.return_code == 0
    assert Path("r.yaml").read_text() == "method: linear\nmodels: [ft1, ft2]\n"

    unchanged = make_app(Path("r.yaml"), registry=registry)
    async with unchanged.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert unchanged.return_code == 0


# -- the editor ----------------------------------------------------------------------------------------


async def test_tab_and_escape_leave_the_editor(workdir: Path, registry: Registry) -> None:
    Path("r.yaml").write_text("method: linear\nmodels: [ft1, ft2]\n")
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await settle(pilot)
        editor = app.screen.query_one("#recipe-yaml", TextArea)
        before = editor.text
        assert "Tab" in shown(app, "#recipe-hint") and "Escape" in shown(app, "#recipe-hint")
        editor.focus()
        await pilot.pause()
        await pilot.press("tab")
        await pilot.pause()
        assert app.focused is not editor and editor.text == before
        await pilot.press("shift+tab")
        await pilot.pause()
        assert app.focused is editor
        await pilot.press("shift+tab")
        await pilot.pause()
        assert app.focused is not editor and editor.text == before
        editor.focus()
        await pilot.press("escape")
        await pilot.pause()
        assert app.focused is not editor

        editor.focus()
        editor.move_cursor((1, 0))
        await pilot.press("f8")  # indentation has its own keys
        await pilot.pause()
        assert editor.text.splitlines()[1] == "  models:"
        await pilot.press("f9")
        await pilot.pause()
        assert editor.text == before
        assert not app.state.changed  # the edit was undone: nothing to lose
