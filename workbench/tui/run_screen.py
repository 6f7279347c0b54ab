"""The Run screen (placeholder until it is built)."""

from __future__ import annotations

from workbench.tui.base import WorkbenchScreen


class RunScreen(WorkbenchScreen):
    TITLE = "Run"
