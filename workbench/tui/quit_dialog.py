"""The question Ctrl+Q asks when the recipe changed since it was opened or last saved.

Its answer is one of ``"save"``, ``"discard"`` (quit without saving) or ``"cancel"`` (keep working;
also Escape). The app acts on it (see :meth:`workbench.tui.app.WorkbenchApp.action_quit`).
"""

from __future__ import annotations

from typing import Literal

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

Answer = Literal["save", "discard", "cancel"]


class QuitDialog(ModalScreen[Answer]):
    """Save, discard or cancel, before quitting with unsaved changes."""

    DEFAULT_CSS = """
    QuitDialog { align: center middle; }
    QuitDialog #quit-box {
        width: 64; max-width: 100%; height: auto;
        border: thick $warning; background: $surface; padding: 1 2;
    }
    QuitDialog #quit-buttons { height: auto; margin-top: 1; }
    QuitDialog #quit-buttons Button { margin: 0 1 0 0; width: auto; min-width: 10; }
    """
    BINDINGS = [
        Binding("escape", "answer('cancel')", "Cancel"),
        Binding("s", "answer('save')", "Save", show=False),
        Binding("d", "answer('discard')", "Discard", show=False),
    ]

    def __init__(self, name: str, where: str) -> None:
        super().__init__()
        self._message = (
            f"The recipe {name} has changes that are not saved.\n"
            f"Save writes them to {where}; Discard quits without them; Cancel (Escape) goes back."
        )

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-box"):
            yield Static(self._message, id="quit-message", markup=False)
            with Horizontal(id="quit-buttons"):
                yield Button("Save and quit", variant="primary", id="quit-save")
                yield Button("Discard", variant="error", id="quit-discard")
                yield Button("Cancel", id="quit-cancel")

    def on_mount(self) -> None:
        self.query_one("#quit-cancel", Button).focus()

    def action_answer(self, answer: Answer) -> None:
        self.dismiss(answer)

    @on(Button.Pressed, "#quit-save")
    def on_save(self) -> None:
        self.dismiss("save")

    @on(Button.Pressed, "#quit-discard")
    def on_discard(self) -> None:
        self.dismiss("discard")

    @on(Button.Pressed, "#quit-cancel")
    def on_cancel(self) -> None:
        self.dismiss("cancel")
