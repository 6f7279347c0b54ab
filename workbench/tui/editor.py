"""The recipe editor: a YAML ``TextArea`` that Tab, Shift+Tab and Escape leave, as every other field.

Tab would otherwise indent, and a keyboard user could not get out of the editor. Indentation has
keys of its own instead, function keys because terminals send Ctrl+I as Tab: F8 indents the
cursor's line (or every selected line) by two spaces, F9 takes two away.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import TextArea

INDENT = "  "

#: The line shown above the editor, so nobody has to guess how to leave it.
HINT = "Tab / Shift+Tab or Escape leave the editor · F8 / F9 indent / dedent lines"


class RecipeEditor(TextArea):
    """A YAML code editor that focus leaves on Tab, Shift+Tab and Escape."""

    BINDINGS = [
        Binding("escape", "leave", "Leave editor", show=False),
        Binding("f8", "indent", "Indent", show=False),  # the hint above the editor says them
        Binding("f9", "dedent", "Dedent", show=False),
    ]

    def __init__(self, text: str = "", *, id: str | None = None) -> None:
        super().__init__(
            text,
            language="yaml",
            theme="monokai",
            soft_wrap=False,
            tab_behavior="focus",
            show_line_numbers=True,
            id=id,
        )
        self.indent_width = len(INDENT)

    def action_leave(self) -> None:
        self.screen.focus_next()

    def _rows(self) -> range:
        (start, _), (end, _) = sorted(self.selection)
        return range(start, end + 1)

    def action_indent(self) -> None:
        for row in self._rows():
            self.insert(INDENT, (row, 0))

    def action_dedent(self) -> None:
        for row in self._rows():
            line = self.document.get_line(row)
            width = len(line) - len(line.lstrip(" "))
            cut = min(width, len(INDENT))
            if cut:
                self.delete((row, 0), (row, cut))
