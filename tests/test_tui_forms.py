"""Form values are never dropped silently (issue 28): an invalid value stays in the recipe as
typed, its field is marked (class ``-invalid`` and the message under it), the recipe check says the
recipe is not ok naming the field, and Run and Save refuse with a message naming it until it is
fixed. Driven through the app with Textual's pilot; relative model paths in a working folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from textual.pilot import Pilot
from textual.widgets import Input, Static
from tui_helpers import linked, settle, shown

from workbench.registry import Registry
from workbench.tui.app import WorkbenchApp, make_app
from workbench.tui.state import RecipeState

SIZE = (120, 40)
TIES = {
    "method": "ties",
    "base": "base",
    "models": [
        {"model": "ft1", "parameters": {"weight": 0.5}},
        {"model": "ft2", "parameters": {"weight": 0.5}},
    ],
}


@pytest.fixture
def workdir(tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(linked(tiny_family, tmp_path))
    Path("ties.yaml").write_text(yaml.safe_dump(TIES, sort_keys=False))
    return tmp_path


async def type_into(pilot: Pilot[None], selector: str, value: str) -> None:
    field = pilot.app.screen.query_one(selector, Input)
    field.value = ""
    field.focus()
    await pilot.pause()
    await pilot.press(*value)
    await pilot.pause()


def marked(app: WorkbenchApp, wid: str) -> str | None:
    """The field's message if it carries the invalid marker, else None."""
    widget = app.screen.query_one(f"#{wid}")
    error = app.screen.query_one(f"#{wid}-error", Static)
    assert widget.has_class("-invalid") == bool(error.display)
    return shown(app, f"#{wid}-error") if widget.has_class("-invalid") else None


async def test_an_invalid_density_blocks_run_and_save(workdir: Path, registry: Registry) -> None:
    app = make_app(Path("ties.yaml"), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await settle(pilot)
        assert shown(app, "#recipe-check").startswith("recipe ok")

        await type_into(pilot, "#model-1-param-density", "1.5")
        # kept as typed, marked, and the recipe is not ok: the check names the field
        assert app.state.data["models"][1]["parameters"]["density"] == 1.5
        assert "parameter 'density' = 1.5 is invalid" in (marked(app, "model-1-param-density") or "")
        check = app.screen.query_one("#recipe-check", Static)
        assert check.has_class("error") and not shown(app, "#recipe-check").startswith("recipe ok")
        assert "recipe not ok: field 'density of model ft2' is invalid" in shown(app, "#recipe-check")

        # the form is rebuilt from the recipe (screen shown again): the marker stays
        await pilot.press("f2")
        await pilot.press("f3")
        await settle(pilot)
        assert marked(app, "model-1-param-density") is not None

        # Run refuses, naming the field; nothing is written
        await pilot.press("f6")
        await settle(pilot)
        app.screen.query_one("#run-output", Input).value = "merged"
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert "density" in shown(app, "#run-error")
        assert not Path("merged").exists()

        # Save refuses too
        await pilot.press("f5")
        await settle(pilot)
        app.screen.query_one("#recipe-path", Input).value = "saved.yaml"
        await pilot.press("ctrl+s")
        await pilot.pause()
        message = shown(app, "#recipe-message")
        assert message.startswith("error:") and "density" in message
        assert not Path("saved.yaml").exists()

        # fixed: no marker, recipe ok, and it saves
        await pilot.press("f3")
        await settle(pilot)
        await type_into(pilot, "#model-1-param-density", "0.5")
        assert marked(app, "model-1-param-density") is None
        assert shown(app, "#recipe-check").startswith("recipe ok")
        await pilot.press("f5")
        await settle(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert shown(app, "#recipe-message") == "saved saved.yaml."
        saved = yaml.safe_load(Path("saved.yaml").read_text())
        assert saved["models"][1]["parameters"] == {"weight": 0.5, "density": 0.5}


async def test_unparsable_and_mistyped_values_are_kept_and_refused(workdir: Path, registry: Registry) -> None:
    app = make_app(Path("ties.yaml"), registry=registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await settle(pilot)
        for typed, kept in (("[0.2, oops", "[0.2, oops"), ("abc", "abc")):
            await type_into(pilot, "#param-lambda", typed)
            assert app.state.data["parameters"]["lambda"] == kept
            assert "parameter 'lambda'" in (marked(app, "param-lambda") or "")
            assert "field 'lambda' is invalid" in shown(app, "#recipe-check")
        await type_into(pilot, "#param-lambda", "")  # cleared: the default applies again
        assert "lambda" not in (app.state.data.get("parameters") or {})
        assert marked(app, "param-lambda") is None
        assert shown(app, "#recipe-check").startswith("recipe ok")


def test_a_rejected_field_makes_the_state_invalid_until_its_value_changes() -> None:
    state = RecipeState({"method": "linear", "models": ["a", "b"], "parameters": {"normalize": "x"}})
    state.reject("normalize", ("parameters", "normalize"), "x", "not a switch.")
    with pytest.raises(Exception, match="field 'normalize' is invalid: not a switch"):
        state.validate()
    state.data["parameters"]["normalize"] = True  # edited elsewhere (the recipe editor)
    assert state.problems() == []
    state.validate()
