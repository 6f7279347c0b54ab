"""The Recipe screen (F5): the YAML the forms make, editable, checked, opened and saved.

The editor holds text, the state holds data: "Apply" turns the text into the state only once it
parses as a recipe, so a half-typed edit never reaches the other screens. "Check" runs exactly what
``workbench validate`` runs (parse, then plan: opens every input's headers) in a thread worker, and
shows its message. The editor shows the whole file Save writes: "Save" (Ctrl+S) writes what the
editor shows (applied first), through ``RecipeState.save``, which writes beside the target and
renames. A recipe opened from a mergekit file is shown and saved as mergekit YAML; Ctrl+N saves it
as native YAML instead. "Open" reads a native or mergekit recipe into the state, which every screen
shows on its next refresh. Tab, Shift+Tab and Escape leave the editor (see
:mod:`workbench.tui.editor`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Button, Input, Static, TextArea
from textual.worker import get_current_worker

from workbench.errors import WorkbenchError
from workbench.recipe.schema import parse_recipe
from workbench.tui.editor import HINT, RecipeEditor
from workbench.tui.screens.base import WorkbenchScreen
from workbench.tui.state import RecipeState


class RecipeScreen(WorkbenchScreen):
    """A YAML editor over the recipe state, with the file operations."""

    SUB_TITLE = "Recipe"
    CSS_PATH = "recipe.tcss"
    DEFAULT_CSS = """
    RecipeScreen #recipe-hint { height: 1; color: $text-muted; }
    RecipeScreen #recipe-format { height: auto; color: $warning; }
    """
    #: Priority: the editor would otherwise take ctrl+k (delete to the end of the line).
    BINDINGS = [
        Binding("ctrl+k", "check", "Check", priority=True),
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("ctrl+n", "save_native", "Save native", priority=True),
        Binding("ctrl+o", "open", "Open", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown_yaml: str | None = None
        self._shown_path: Path | None = None

    def compose_body(self) -> Iterable[Widget]:
        yield Static(HINT, id="recipe-hint", markup=False)
        yield RecipeEditor(id="recipe-yaml")
        yield Static("", id="recipe-format", markup=False)
        with Horizontal(id="recipe-actions"):
            yield Button("Check", id="check")
            yield Button("Apply", id="apply", variant="primary")
            yield Input(placeholder="recipe file (for Open and Save)", id="recipe-path")
            yield Button("Open", id="open")
            yield Button("Save", id="save")
        yield Static(id="recipe-message")

    def refresh_from_state(self) -> None:
        """Show the state's YAML when it changed elsewhere; edits not yet applied survive otherwise."""
        text = self.state.to_yaml()
        if text != self._shown_yaml:
            self.query_one("#recipe-yaml", TextArea).load_text(text)
            self._shown_yaml = text
            self.state.unapplied_edit = False
        if self.state.path != self._shown_path:
            self.query_one("#recipe-path", Input).value = str(self.state.path) if self.state.path else ""
            self._shown_path = self.state.path
        note = self.state.format_note()
        if self.state.format == "mergekit" and not note:
            note = "mergekit YAML: Ctrl+S keeps this format; Ctrl+N saves native YAML instead."
        format_line = self.query_one("#recipe-format", Static)
        format_line.update(note)
        format_line.display = bool(note)

    @on(TextArea.Changed, "#recipe-yaml")
    def on_editor_changed(self, event: TextArea.Changed) -> None:
        """Remember that the editor holds text the recipe does not (a quit would lose it)."""
        self.state.unapplied_edit = event.text_area.text != self._shown_yaml

    def _say(self, message: str, ok: bool) -> None:
        label = self.query_one("#recipe-message", Static)
        label.update(message)
        label.set_class(ok, "ok")
        label.set_class(not ok, "error")

    @property
    def _text(self) -> str:
        return self.query_one("#recipe-yaml", TextArea).text

    def _path(self) -> Path | None:
        value = self.query_one("#recipe-path", Input).value.strip()
        if not value:
            self._say("error: give a recipe file path first.", ok=False)
            return None
        return Path(value).expanduser()

    def _apply(self) -> bool:
        """The editor's text becomes the state, if it is a recipe; otherwise say why and change nothing."""
        if self._text == self._shown_yaml and not self.state.unapplied_edit:
            return True  # nothing edited: the state already is this text
        try:
            self.state.set_yaml(self._text)
        except WorkbenchError as exc:
            self._say(f"error: {exc}", ok=False)
            return False
        self.refresh_from_state()
        return True

    # -- actions ----------------------------------------------------------------------------------

    @on(Button.Pressed, "#check")
    def action_check(self) -> None:
        """What ``workbench validate`` says about the editor's text."""
        self._say("checking…", ok=True)
        self._check(self._text, self.state.name)

    @work(thread=True, exclusive=True, group="check")
    def _check(self, text: str, name: str) -> None:
        """Planning opens every input's headers (a Hub model's over the network): off the UI thread."""
        from workbench.engine.plan import build_plan

        try:
            recipe = parse_recipe(text, name)
            plan = build_plan(recipe, self.registry, check_output=recipe.output.path is not None)
            try:
                message = (
                    f"ok: {plan.method.name} over {len(plan.inputs)} input(s), {len(plan.tensors)} tensors, "
                    f"{len(plan.files)} output file(s)."
                )
                ok = True
            finally:
                plan.close()
        except WorkbenchError as exc:
            message, ok = f"error: {exc}", False
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._say, message, ok)

    @on(Button.Pressed, "#apply")
    def action_apply(self) -> None:
        if self._apply():
            self._say("applied: every screen now shows this recipe.", ok=True)

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        """Save what the editor shows, in the recipe's format: applied first, so the file and the
        state agree."""
        self.save_recipe()

    def action_save_native(self) -> None:
        """Save in the native format, whatever format the recipe was opened in."""
        self.save_recipe(native=True)

    def save_recipe(self, native: bool = False) -> bool:
        """Save to the path in the path box; False (and the reason shown) if it was not saved."""
        path = self._path()
        if path is None or not self._apply():
            return False
        try:
            note = self.state.save(path, native=native)
        except WorkbenchError as exc:
            self._say(f"error: {exc}", ok=False)
            return False
        self.refresh_from_state()
        self._shown_path = path
        kind = " as mergekit YAML" if self.state.format == "mergekit" else ""
        self._say(f"saved {path}{kind}." + (f" {note}." if note else ""), ok=True)
        return True

    @on(Button.Pressed, "#open")
    def action_open(self) -> None:
        """Read a recipe file (native or mergekit) into the state, in place: every screen shares it."""
        path = self._path()
        if path is None:
            return
        try:
            opened = RecipeState.open(path)
        except WorkbenchError as exc:
            self._say(f"error: {exc}", ok=False)
            return
        self.state.replace(opened)
        self.refresh_from_state()
        self._say(f"opened {path}.", ok=True)
