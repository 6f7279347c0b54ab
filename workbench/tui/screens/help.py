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
| F5 | **Recipe**: the whole YAML Save writes; edit, check (Ctrl+K), open (Ctrl+O) and save files |
| Ctrl+S / Ctrl+N | Recipe: save in the file's own format (a mergekit recipe stays mergekit YAML) / save native |
| Tab / Shift+Tab / Escape | in the recipe editor: leave it; F8 / F9 indent / dedent the selected lines |
| F6 | **Run**: run the recipe, with progress and cancel |
| F7 | **Publish**: push the output to the Hugging Face Hub |
| Tab / Shift+Tab | move between fields, in screen order; the field with the focus is highlighted |
| Ctrl+R | Method: check the recipe; Run: start the run |
| Escape | Run: cancel the run; Layers: cancel the heatmap |
| Ctrl+T | Publish: push (a public repo asks first: y / n) |
| Enter | Layers: in Reference, analyse against that model |
| F1 | this help (arrow keys and Page Up/Down scroll it); Escape closes it |
| Ctrl+Q | quit; with unsaved changes it asks first (save / discard / cancel) |
"""


class HelpScreen(ModalScreen[None]):
    """Keys and screens, over whatever screen is showing."""

    CSS_PATH = "help.tcss"
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)

    def on_mount(self) -> None:
        self.query_one("#help", VerticalScroll).focus()  # the keys scroll it on a small terminal
