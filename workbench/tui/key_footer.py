"""The footer of every screen, made to fit 80 columns: the screen's own keys first, then F1 and the
keys of the other screens (the one showing is named in the header), without Ctrl+Q and the command
palette (both are in the F1 help). Textual's footer lists every key in binding order, and at 80
columns it cut off F5-F7 and the screen's own actions on the right."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

#: Actions left out of the footer (the help lists them).
HIDDEN_ACTIONS = ("quit", "command_palette")


class KeyFooter(Footer):
    """A compact footer: the screen's keys, then the app's, less the hidden ones."""

    def __init__(self) -> None:
        super().__init__(compact=True, show_command_palette=False)

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        screen = self.screen
        current = f"switch_mode('{getattr(self.app, 'current_mode', '')}')"
        own: list[tuple[Binding, bool, str]] = []
        app_keys: list[tuple[Binding, bool, str]] = []
        seen: set[str] = set()
        for node, binding, enabled, tooltip in screen.active_bindings.values():
            if not binding.show or binding.action in HIDDEN_ACTIONS or binding.action == current:
                continue
            if binding.action in seen:  # one key per action, as Textual's footer shows it
                continue
            seen.add(binding.action)
            (app_keys if node is self.app else own).append((binding, enabled, tooltip))
        self.styles.grid_size_columns = len(own) + len(app_keys)
        for binding, enabled, tooltip in own + app_keys:
            yield FooterKey(
                binding.key,
                self.app.get_key_display(binding),
                binding.description,
                binding.action,
                disabled=not enabled,
                tooltip=tooltip,
            ).data_bind(compact=Footer.compact)
