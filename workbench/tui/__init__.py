"""The terminal UI (``workbench tui``): compose a recipe from forms, inspect models and layers, run
it and publish the result. Textual is imported here and below only; the core never imports this."""

from __future__ import annotations

from pathlib import Path


def run_tui(recipe: Path | None = None, exit_when_ready: bool = False) -> None:
    """Open the app on ``recipe`` (or on an empty composition). ``exit_when_ready`` runs it headless
    and leaves as soon as the first screen is up: ``workbench bench`` times the start-up a user
    waits for that way."""
    from textual.pilot import Pilot

    from workbench.tui.app import make_app

    app = make_app(recipe)
    if not exit_when_ready:
        app.run()
        return

    async def leave(pilot: Pilot[object]) -> None:
        await pilot.pause()  # the first screen mounted and laid out
        pilot.app.exit()

    app.run(headless=True, auto_pilot=leave)
