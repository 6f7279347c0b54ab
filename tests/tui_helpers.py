"""Shared by the terminal UI's pilot tests: waiting for workers and for a screen's state."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot


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
