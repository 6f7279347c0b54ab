"""What every screen of the app shares: the header, the footer with the keys, access to the recipe
state and the registry, and a refresh when the screen is shown again (another screen may have
changed the recipe meanwhile)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Header

from workbench.tui.key_footer import KeyFooter

if TYPE_CHECKING:
    from workbench.registry import Registry
    from workbench.tui.state import RecipeState


@runtime_checkable
class WorkbenchHost(Protocol):
    """What a screen needs of its app (:class:`workbench.tui.app.WorkbenchApp`): the recipe state
    and the registry. A protocol, so that the screens need not import the app, which imports them."""

    state: RecipeState
    registry: Registry


class WorkbenchScreen(Screen[None]):
    """A screen of the app; subclasses yield their body from ``compose_body`` and show the state in
    ``refresh_from_state``."""

    #: The screen's name, shown in the header after the app's title (e.g. "Models").
    SUB_TITLE: ClassVar[str | None] = None

    @property
    def workbench(self) -> WorkbenchHost:
        app = self.app
        assert isinstance(app, WorkbenchHost)
        return app

    @property
    def state(self) -> "RecipeState":
        return self.workbench.state

    @property
    def registry(self) -> "Registry":
        return self.workbench.registry

    def compose(self) -> ComposeResult:
        yield Header()
        yield from self.compose_body()
        yield KeyFooter()  # fits 80 columns: the screen's keys, F1 and the other screens' keys

    def compose_body(self) -> Iterable[Widget]:
        """The screen's own widgets."""
        return ()

    def on_mount(self) -> None:
        self.refresh_from_state()

    def on_screen_resume(self) -> None:
        self.refresh_from_state()

    def refresh_from_state(self) -> None:
        """Show what the recipe state holds now."""
