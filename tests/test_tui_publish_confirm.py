"""Publishing from the terminal UI: the Publish screen names the Hub and whether a token is found
before anything is sent, a public push is confirmed first (Ctrl+T used to push at once), and a
recipe with ``output.push`` is pushed from the Run screen after a successful run."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_hub import FakeHub, hub_fixture  # noqa: F401  (hub_fixture provides `hub`)
from textual.widgets import Log, Static
from tui_helpers import linked, settle, until

from workbench.registry import load_registry
from workbench.tui.app import WorkbenchApp, make_app
from workbench.tui.confirm import ConfirmScreen


@pytest.fixture
def here(tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(linked(tiny_family, work))
    return work


def text(app: WorkbenchApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def recipe(push: str) -> Path:
    path = Path("r.yaml")
    path.write_text(f"method: linear\nmodels: [ft1, ft2]\noutput: {{path: out, push: {push}}}\n")
    return path


async def test_a_public_push_asks_first(hub: FakeHub, here: Path) -> None:
    app = make_app(recipe("{repo: org/public}"), registry=load_registry())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f6")
        await pilot.press("ctrl+r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) or not app.screen.busy)  # type: ignore[attr-defined]
        assert isinstance(app.screen, ConfirmScreen)  # output.push, public: asked first
        await pilot.press("n")
        await settle(pilot)
        assert "org/public" not in hub.repos
        assert any("not pushed" in line for line in app.screen.query_one("#run-log", Log).lines)

        await pilot.press("f7")
        await settle(pilot)
        assert text(app, "#publish-hub") == f"Hub {hub.url} - token found (HF_TOKEN)."
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "PUBLIC" in str(app.screen.query_one("#confirm-question", Static).render())
        await pilot.press("enter")  # the focus is on No: a stray Enter never publishes
        await settle(pilot)
        assert "org/public" not in hub.repos
        assert text(app, "#publish-status").startswith("not pushed")

        await pilot.press("ctrl+t")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: not app.screen.busy)  # type: ignore[attr-defined]
        assert text(app, "#publish-result").startswith(f"pushed to {hub.url}/org/public (public repo)")
        assert not hub.repos["org/public"].private


async def test_output_push_is_pushed_after_a_run(hub: FakeHub, here: Path) -> None:
    app = make_app(recipe("{repo: org/private, private: true}"), registry=load_registry())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f6")
        await pilot.press("ctrl+r")
        await until(
            pilot, lambda: "org/private" in hub.repos and text(app, "#run-status") == "done and pushed"
        )
        lines = list(app.screen.query_one("#run-log", Log).lines)
        assert any(line.startswith(f"pushed to {hub.url}/org/private (private repo)") for line in lines), (
            lines
        )


async def test_no_token_is_said_before_pushing(
    hub: FakeHub, here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    app = make_app(recipe("{repo: org/x, private: true}"), registry=load_registry())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f7")
        await settle(pilot)
        status = app.screen.query_one("#publish-hub", Static)
        assert "no token found" in str(status.render()) and status.has_class("error")
