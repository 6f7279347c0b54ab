"""Waits in the terminal UI say what they are doing within a second: the layer heatmap (which
models, which tensor, how far; Escape cancels it) and a first run (the step under way, with its
time), and a model path that does not exist is never announced as added."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Static
from tui_helpers import linked, settle, shown

from workbench.registry import Registry
from workbench.tui.app import make_app


@pytest.fixture
def here(tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(linked(tiny_family, tmp_path))
    return tmp_path


async def seen_within(pilot: Pilot[Any], selector: str, words: tuple[str, ...], seconds: float) -> str:
    """The widget's text once it holds every word; fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        now = shown(pilot.app, selector)
        if all(w in now for w in words):
            return now
        assert time.monotonic() < deadline, f"{selector} still says {now!r}"
        await pilot.pause(0.02)


async def test_the_heatmap_says_which_tensor_and_how_far(here: Path, registry: Registry) -> None:
    (here / "r.yaml").write_text("method: ties\nbase: base\nmodels: [ft1, ft2]\n")
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=(80, 24)) as pilot:
        progress: list[str] = []
        original = app.call_from_thread

        def spy(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(callback, "__name__", "") == "_show_progress":
                progress.append(args[1])
            return original(callback, *args, **kwargs)

        app.call_from_thread = spy  # type: ignore[method-assign]
        start = time.monotonic()
        await pilot.press("f4")
        await settle(pilot)
        assert progress and time.monotonic() - start < 5
        assert any("ft1, ft2" in line and "/" in line and "model." in line for line in progress), progress
        assert shown(app, "#heatmap-status").startswith("reference base;")


async def test_the_heatmap_can_be_cancelled(here: Path, registry: Registry) -> None:
    (here / "r.yaml").write_text("method: ties\nbase: base\nmodels: [ft1, ft2]\n")
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await pilot.press("escape")
        await settle(pilot)
        status = shown(app, "#heatmap-status")
        assert status.startswith("Heatmap cancelled") or status.startswith("reference base;")


async def test_layer_swap_gets_a_heatmap_against_a_reference_that_is_not_its_base(
    here: Path, registry: Registry
) -> None:
    (here / "r.yaml").write_text("method: layer_swap\nmodels: [ft1, ft2]\n")
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await settle(pilot)
        assert "type the models' common base in Reference" in shown(app, "#heatmap-status")
        field = app.screen.query_one("#heatmap-reference", Input)
        field.focus()
        field.value = "base"
        await pilot.press("enter")
        await settle(pilot)
        assert shown(app, "#heatmap-status").startswith("reference base;")
        assert app.screen.query("#heatmap-0")
        assert "base" not in app.state.data  # the recipe stays a valid layer_swap recipe


async def test_a_first_run_says_what_it_is_doing_within_a_second(here: Path, registry: Registry) -> None:
    (here / "r.yaml").write_text("method: ties\nbase: base\nmodels: [ft1, ft2]\noutput: {path: out}\n")
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f6")
        await pilot.pause()
        screen: Any = app.screen
        steps: list[tuple[float, str, str]] = []
        original = screen._phase

        def spy(step: str) -> None:
            original(step)
            steps.append((time.monotonic(), step, shown(app, "#run-stats")))

        screen._phase = spy
        start = time.monotonic()
        await pilot.press("ctrl+r")
        await settle(pilot)
        while screen.busy:
            await pilot.pause(0.05)
        assert shown(app, "#run-status") == "done"
        assert steps and steps[0][0] - start < 1.0
        said = [step for _, step, _ in steps]
        assert any("planning" in step and "base, ft1, ft2" in step for step in said), said
        assert any("merging the first tensor" in step for step in said), said
        # tensor events are thinned to a few a second: a fast merge may show only its last tensor
        assert any(step.startswith("merged ") for step in said), said
        assert all("Escape cancels" in shown for _, _, shown in steps[:-1]), steps


async def test_the_overwrite_message_names_the_switch(here: Path, registry: Registry) -> None:
    (here / "r.yaml").write_text("method: ties\nbase: base\nmodels: [ft1, ft2]\noutput: {path: out}\n")
    (here / "out").mkdir()
    app = make_app(Path("r.yaml"), registry=registry)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f6")
        await pilot.press("ctrl+r")
        await settle(pilot)
        while app.screen.busy:  # type: ignore[attr-defined]
            await pilot.pause(0.05)
        error = shown(app, "#run-error")
        assert "--overwrite" not in error and "replace an existing output folder" in error


async def test_a_missing_model_path_is_not_announced_as_added(here: Path, registry: Registry) -> None:
    app = make_app(None, registry=registry)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.screen.query_one("#model-ref", Input).value = "no/such/folder/here"
        await pilot.press("enter")
        note = app.screen.query_one("#add-message", Static)
        assert not str(note.render()).startswith("Added") and not note.has_class("ok")
        await settle(pilot)
        assert "cannot be opened" in str(note.render()) and note.has_class("error")
        app.screen.query_one("#model-ref", Input).value = "ft1"
        await pilot.press("enter")
        await settle(pilot)
        assert str(note.render()) == "Added ft1." and note.has_class("ok")
