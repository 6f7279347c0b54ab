"""The terminal UI (``workbench tui``): compose a recipe from forms, inspect models and layers, run
it and publish the result. Textual is imported here and below only; the core never imports this."""

from __future__ import annotations

from pathlib import Path


def run_tui(recipe: Path | None = None) -> None:
    """Open the app on ``recipe`` (or on an empty composition)."""
    from workbench.tui.app import make_app

    make_app(recipe).run()
