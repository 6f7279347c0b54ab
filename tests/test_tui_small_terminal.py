"""The terminal UI at 80x24: every screen keeps its action keys, its status and its essential
fields on screen (snapshots of all six, plus the help), and focus is always visible."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from tui_helpers import linked, settle

from workbench.registry import Registry
from workbench.tui.app import WorkbenchApp, make_app

SIZE = (80, 24)
RECIPE = "method: ties\nbase: base\nmodels: [ft1, ft2, nowhere]\noutput: {path: out}\n"


@pytest.fixture
def here(tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the tiny family linked in under short relative names, and a recipe."""
    linked(tiny_family, tmp_path)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    from huggingface_hub import constants

    # the Publish screen names the endpoint and the token's source: the same in every run
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_TestTokenNotSentAnywhere000000000")
    return tmp_path


def app_on(registry: Registry) -> WorkbenchApp:
    return make_app(Path("recipe.yaml"), registry=registry)


def still(pilot: Pilot[Any]) -> None:
    """No blinking cursor in the picture."""
    for widget in pilot.app.screen.query("Input, TextArea"):
        widget.cursor_blink = False  # type: ignore[attr-defined]


def shows(key: str) -> Any:
    async def show(pilot: Pilot[Any]) -> None:
        await pilot.press(key)
        await settle(pilot)
        still(pilot)
        await pilot.pause()

    return show


@pytest.mark.parametrize(
    "key",
    ["f2", "f3", "f4", "f5", "f6", "f7"],
    ids=["models", "method", "layers", "recipe", "run", "publish"],
)
def test_every_screen_at_80x24(key: str, here: Path, registry: Registry, snap_compare: Any) -> None:
    assert snap_compare(app_on(registry), terminal_size=SIZE, run_before=shows(key))


def test_help_at_80x24(here: Path, registry: Registry, snap_compare: Any) -> None:
    async def show(pilot: Pilot[Any]) -> None:
        await pilot.press("f2")
        await settle(pilot)
        await pilot.press("f1")
        await pilot.pause()
        await pilot.press("end")  # the help scrolls to its last rows
        await pilot.pause()

    assert snap_compare(app_on(registry), terminal_size=SIZE, run_before=show)


def visible(app: WorkbenchApp, text: str) -> bool:
    return any(text in strip.text for strip in app.screen._compositor.render_strips())


async def test_the_essentials_are_on_screen_at_80x24(here: Path, registry: Registry) -> None:
    app = app_on(registry)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert visible(app, "cannot open")  # the Models status column
        assert visible(app, "f7 Publish")  # the footer keeps the screen keys
        await pilot.press("f5")
        await settle(pilot)
        assert app.screen.query_one("#recipe-path").size.width >= 24
        assert visible(app, "f7 Publish") and visible(app, "^s Save")
        await pilot.press("f6")
        await settle(pilot)
        assert app.screen.query_one("#run-log").size.height >= 8
        assert visible(app, "^r Run") and visible(app, "f7 Publish")
        await pilot.press("f7")
        await settle(pilot)
        push = app.screen.query_one("#publish-push")
        push.scroll_visible(animate=False)
        await pilot.pause()
        assert push.region.height > 0 and app.screen.region.contains_region(push.region)
        assert visible(app, "^t Push")


def focus_look(widget: Any) -> tuple[Any, ...]:
    styles = widget.styles
    return (styles.background, styles.background_tint, styles.border, styles.outline, styles.tint)


async def test_tab_from_the_method_dropdown_lands_on_a_visibly_focused_widget(
    here: Path, registry: Registry
) -> None:
    app = app_on(registry)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await settle(pilot)
        app.screen.query_one("#method-select").focus()
        for _ in range(4):  # every stop along the way shows that it has the focus
            await pilot.press("tab")
            await pilot.pause()
            focused = app.focused
            assert focused is not None
            look = focus_look(focused)
            app.set_focus(None)
            await pilot.pause()
            assert focus_look(focused) != look, f"{focused} shows no focus"
            focused.focus()
            await pilot.pause()
