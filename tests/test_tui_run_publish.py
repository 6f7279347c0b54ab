"""The Run and Publish screens of the TUI, driven with Textual's pilot: a run writes exactly what
`workbench run` writes, bad input shows the CLI's message and writes nothing, Cancel stops a merge
and leaves nothing at the output path, and a push round-trips byte-identically through the stand-in
Hub without ever showing the token. Snapshots pin both screens' layout (relative paths only)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from fake_hub import FakeHub, hub_fixture, sha256_tree  # noqa: F401  (hub_fixture provides `hub`)
from safetensors.torch import load_file
from textual.pilot import Pilot
from textual.widgets import Input, Log, ProgressBar, Static, Switch
from tui_helpers import until

from workbench.cli.main import main
from workbench.registry import load_registry
from workbench.tui.app import WorkbenchApp, make_app

WIDE = {"COLUMNS": "1000"}
SIZE = (120, 40)

SLOW_METHOD = """
    import threading

    from workbench import hookimpl
    from workbench.method import MergeMethod

    STARTED = threading.Event()  # set when the first tensor is being merged
    RELEASE = threading.Event()  # the test lets the merge go on once it has pressed Cancel


    class Slow(MergeMethod):
        name = "fake_slow"
        summary = "The first model, after waiting for the test."
        min_models = 1

        def apply(self, tensors, base, params, model_params, ctx):
            STARTED.set()
            RELEASE.wait(20)
            return tensors[0]


    @hookimpl
    def register_methods(register):
        register(Slow)
"""


def write_recipe(
    tiny_family: dict[str, Path], method: str = "linear", out: str | None = "out", extra: str = ""
) -> Path:
    """``recipe.yaml`` in the current folder (tests chdir to tmp_path); the output path is relative."""
    models = json.dumps([str(tiny_family["ft1"]), str(tiny_family["ft2"])])
    output = f"output: {{path: {out}{extra}}}\n" if out else ""
    path = Path("recipe.yaml")
    path.write_text(f"method: {method}\nmodels: {models}\n{output}")
    return path


def text(app: WorkbenchApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def log_lines(app: WorkbenchApp) -> list[str]:
    return list(app.screen.query_one("#run-log", Log).lines)


async def run_and_wait(pilot: Pilot[Any]) -> None:
    await pilot.press("ctrl+r")
    await pilot.pause()
    await until(pilot, lambda: not pilot.app.screen.busy)  # type: ignore[attr-defined]


def cli_error(*args: str) -> str:
    """The CLI's message for the same failure, as one line."""
    result = CliRunner().invoke(main, list(args), env=WIDE)
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split()).removeprefix("error: ")


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (tmp_path also holds the fake plugins' and Hub's files)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# -- Run --------------------------------------------------------------------------------------------


async def test_run_writes_what_workbench_run_writes(tiny_family: dict[str, Path], here: Path) -> None:
    recipe = write_recipe(tiny_family)
    app = make_app(recipe, registry=load_registry())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f6")
        assert app.screen.query_one("#run-output", Input).value == "out"
        await run_and_wait(pilot)
        assert text(app, "#run-status") == "done", log_lines(app)
        bar = app.screen.query_one("#run-progress", ProgressBar)
        assert bar.total is not None and bar.total > 1 and bar.progress == bar.total
        assert text(app, "#run-stats").startswith(f"{int(bar.total)}/{int(bar.total)} tensors")
        assert log_lines(app)[-1].startswith("wrote out: ") and "GB/s of input" in log_lines(app)[-1]
        assert any(line.startswith("merging ") for line in log_lines(app))
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", "cli-out", "-q"])
    assert result.exit_code == 0, result.output
    ours, theirs = (
        load_file(here / "out" / "model.safetensors"),
        load_file(here / "cli-out" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].equal(tensor), name


async def test_invalid_recipe_shows_the_cli_message_and_writes_nothing(
    tiny_family: dict[str, Path], here: Path
) -> None:
    recipe = write_recipe(tiny_family, method="no_such_method")
    app = make_app(
        Path("new.yaml"), registry=load_registry()
    )  # opening the bad file would fail: compose it instead
    app.state.data = yaml.safe_load(recipe.read_text())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f6")
        await run_and_wait(pilot)
        assert text(app, "#run-status") == "failed"
        shown = " ".join(text(app, "#run-error").split())
    assert "no_such_method" in shown
    assert shown == cli_error("validate", str(recipe)).replace(
        "recipe.yaml", "new.yaml"
    )  # the state is named after its file
    assert sorted(p.name for p in here.iterdir()) == ["recipe.yaml"]


async def test_existing_output_without_overwrite_is_refused(tiny_family: dict[str, Path], here: Path) -> None:
    recipe = write_recipe(tiny_family)
    (here / "out").mkdir()
    (here / "out" / "keep.txt").write_text("mine")
    app = make_app(recipe, registry=load_registry())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f6")
        await run_and_wait(pilot)
        assert text(app, "#run-status") == "failed"
        shown = " ".join(text(app, "#run-error").split())
        # the CLI's message, with its flag named as the switch on this screen
        assert shown == cli_error("run", str(recipe), "-q").replace(
            "pass --overwrite", "turn on 'replace an existing output folder' above"
        )
        assert [p.name for p in (here / "out").iterdir()] == ["keep.txt"] and not (
            here / "out.partial"
        ).exists()
        app.screen.query_one(
            "#run-overwrite", Switch
        ).value = True  # with overwrite the same run goes through
        await run_and_wait(pilot)
        assert text(app, "#run-status") == "done", log_lines(app)
    assert (here / "out" / "model.safetensors").is_file() and not (here / "out" / "keep.txt").exists()


async def test_cancel_stops_the_merge_and_leaves_nothing(
    tiny_family: dict[str, Path], here: Path, make_plugin: Callable[..., str]
) -> None:
    module = importlib.import_module(make_plugin("workbench-slow", "slow", SLOW_METHOD))
    registry = load_registry()
    assert "fake_slow" in registry.methods
    recipe = write_recipe(tiny_family, method="fake_slow")
    app = make_app(recipe, registry=registry)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f6")
            await pilot.press("ctrl+r")
            assert await asyncio.to_thread(module.STARTED.wait, 20)  # the merge is inside its first tensor
            assert app.screen.busy and (here / "out.partial").exists()  # type: ignore[attr-defined]
            await pilot.press("escape")
            await pilot.pause()
            module.RELEASE.set()
            await until(pilot, lambda: not app.screen.busy)  # type: ignore[attr-defined]  # the merge thread has returned
            assert text(app, "#run-status") == "stopped"
            assert log_lines(app)[-1] == "stopped: interrupted; nothing was written at out."
            assert text(app, "#run-error") == ""
            assert all(w.is_finished for w in app.workers if w.group == "merge")
    finally:
        module.RELEASE.set()  # never leave the merge thread waiting if an assertion failed
        sys.modules.pop(module.__name__, None)
    assert sorted(p.name for p in here.iterdir()) == ["recipe.yaml"]  # no out, no out.partial


# -- Publish ----------------------------------------------------------------------------------------


@pytest.fixture
def finished(tiny_family: dict[str, Path], here: Path) -> Path:
    """A finished `workbench run` output at ./out, and then a recipe whose output.push names org/tui
    (written after the run: `workbench run` would push it itself)."""
    result = CliRunner().invoke(main, ["run", str(write_recipe(tiny_family)), "--out", "out", "-q"])
    assert result.exit_code == 0, result.output
    return write_recipe(tiny_family, extra=", push: {repo: org/tui, private: true}")


async def test_push_round_trips_byte_identical(
    hub: FakeHub, finished: Path, here: Path, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    app = make_app(finished, registry=load_registry())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f7")
        await pilot.pause()
        screen = app.screen
        assert screen.query_one("#publish-folder", Input).value == "out"
        assert screen.query_one("#publish-repo", Input).value == "org/tui"
        assert screen.query_one("#publish-private", Switch).value is True
        assert text(app, "#publish-card-status").startswith("card ok: library_name ")
        await pilot.click("#publish-push")
        await until(pilot, lambda: not screen.busy)  # type: ignore[attr-defined]
        assert text(app, "#publish-error") == ""
        assert text(app, "#publish-result").startswith(f"pushed to {hub.url}/org/tui (private repo): ")
    assert len(hub.logged("POST", "/commit/")) == 1  # this push, and only it
    back = sha256_tree(Path(snapshot_download("org/tui", cache_dir=tmp_path / "dl", endpoint=hub.url)))
    back.pop(".gitattributes")
    assert back == sha256_tree(here / "out")
    assert hub.repos["org/tui"].private


async def test_a_refused_token_is_shown_without_the_token(
    hub: FakeHub, finished: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = "hf_NotAcceptedByTheFakeHub0123456789"
    monkeypatch.setenv("HF_TOKEN", bad)
    app = make_app(finished, registry=load_registry())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f7")
        await pilot.press("ctrl+t")
        await until(pilot, lambda: not app.screen.busy)  # type: ignore[attr-defined]
        error = text(app, "#publish-error")
        screen_text = app.export_screenshot()
    assert "org/tui" in error and "refused the token (401 Unauthorized)" in error
    assert bad not in error and bad[3:15] not in error and bad[3:15] not in screen_text
    assert "org/tui" not in hub.repos


# -- Snapshots --------------------------------------------------------------------------------------


def test_snapshot_run_form(snap_compare: Any, tiny_family: dict[str, Path], here: Path) -> None:
    app = make_app(write_recipe(tiny_family), registry=load_registry())

    async def show(pilot: Pilot[Any]) -> None:
        await pilot.press("f6")
        await pilot.pause()
        pilot.app.set_focus(None)  # no blinking cursor in the picture

    assert snap_compare(app, terminal_size=SIZE, run_before=show)


def test_snapshot_run_error(snap_compare: Any, tiny_family: dict[str, Path], here: Path) -> None:
    recipe = write_recipe(tiny_family)
    (here / "out").mkdir()
    app = make_app(recipe, registry=load_registry())

    async def fail(pilot: Pilot[Any]) -> None:
        await pilot.press("f6")
        await run_and_wait(pilot)
        pilot.app.set_focus(None)  # no blinking cursor in the picture

    assert snap_compare(app, terminal_size=SIZE, run_before=fail)


def test_snapshot_publish_form(snap_compare: Any, tiny_family: dict[str, Path], here: Path) -> None:
    recipe = write_recipe(tiny_family, extra=", push: {repo: org/merged, revision: v1}")
    (here / "out").mkdir()
    (here / "out" / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags: [merge, workbench]\n---\n# out\n\nA linear merge of two tiny models.\n"
    )
    app = make_app(recipe, registry=load_registry())

    async def show(pilot: Pilot[Any]) -> None:
        await pilot.press("f7")
        await pilot.pause()
        pilot.app.set_focus(None)

    assert snap_compare(app, terminal_size=SIZE, run_before=show)
