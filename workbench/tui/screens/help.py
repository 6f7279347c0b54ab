"""The help overlay (F1): the keys of the app and of the screen it was opened from."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# Merge Workbench

Compose a merge recipe from forms, check it, run it and publish the result. Everything here is
what `workbench validate / run / push` do on the command line, with the same messages.

| key | |
|---|---|
| F2 | **Models**: the models to merge, with their architecture |
| F3 | **Method**: the method and its parameters |
| F4 | **Layers**: which model each output layer comes from; how much each layer changed |
| F5 | **Recipe**: the YAML the forms make; edit, check, open and save files |
| F6 | **Run**: run the recipe, with progress and cancel |
| F7 | **Publish**: push the output to the Hugging Face Hub |
| Tab / Shift+Tab | move between fields |
| F1 | this help; Escape closes it |
| Ctrl+Q | quit |
"""


class HelpScreen(ModalScreen[None]):
    """Keys and screens, over whatever screen is showing."""

    CSS_PATH = "help.tcss"
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)
