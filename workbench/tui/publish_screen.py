"""The Publish screen (placeholder until it is built)."""

from __future__ import annotations

from workbench.tui.base import WorkbenchScreen


class PublishScreen(WorkbenchScreen):
    TITLE = "Publish"
