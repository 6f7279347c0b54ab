"""Shared by the terminal UI's pilot tests: waiting for workers and for a screen's state."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.app import App
from textual.pilot import Pilot
from textual.widgets import Static


def linked(family: dict[str, Path], folder: Path) -> Path:
    """``folder`` with the tiny family linked in under its short names (base, ft1, ...), so that
    recipes and screens name models as a user would; the caller makes it the working directory."""
    for key, path in family.items():
        os.symlink(path, folder / key, target_is_directory=True)
    return folder


def shown(app: App[Any], selector: str) -> str:
    """The text a Static of the current screen shows, whitespace collapsed."""
    return " ".join(str(app.screen.query_one(selector, Static).render()).split())


async def settle(pilot: Pilot[Any]) -> None:
    """Let the thread workers (opening models, building forms, layer maps, checks) finish and the
    results they post be shown; a result may start another worker, hence twice."""
    for _ in range(2):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def until(pilot: Pilot[Any], done: Callable[[], bool], timeout: float = 60) -> None:
    """Wait for ``done()`` (e.g. a merge thread that outlives its cancelled worker)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the screen"
        await pilot.pause(0.05)
