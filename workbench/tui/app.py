"""The Textual app: six screens (one module each, switched with F2-F7) over one recipe state.

Run it with ``workbench tui [RECIPE]``; tests build it with :func:`make_app`. Ctrl+Q asks first
(save, discard or cancel) when the recipe changed since it was opened or last saved.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding

from workbench.registry import Registry, get_registry
from workbench.tui.quit_dialog import Answer, QuitDialog
from workbench.tui.screens.help import HelpScreen
from workbench.tui.screens.layers import LayersScreen
from workbench.tui.screens.method import MethodScreen
from workbench.tui.screens.models import ModelsScreen
from workbench.tui.screens.publish import PublishScreen
from workbench.tui.screens.recipe import RecipeScreen
from workbench.tui.screens.run import RunScreen
from workbench.tui.state import RecipeState


class WorkbenchApp(App[None]):
    """Compose, inspect, run and publish a merge."""

    CSS_PATH = "app.tcss"
    TITLE = "Merge Workbench"
    MODES = {
        "models": ModelsScreen,
        "method": MethodScreen,
        "layers": LayersScreen,
        "recipe": RecipeScreen,
        "run": RunScreen,
        "publish": PublishScreen,
    }
    # priority: the screen keys work from any field (the recipe editor has its own F6/F7)
    BINDINGS = [
        Binding("f1", "help", "Help", priority=True),
        Binding("f2", "switch_mode('models')", "Models", priority=True),
        Binding("f3", "switch_mode('method')", "Method", priority=True),
        Binding("f4", "switch_mode('layers')", "Layers", priority=True),
        Binding("f5", "switch_mode('recipe')", "Recipe", priority=True),
        Binding("f6", "switch_mode('run')", "Run", priority=True),
        Binding("f7", "switch_mode('publish')", "Publish", priority=True),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, state: RecipeState | None = None, registry: Registry | None = None) -> None:
        super().__init__()
        self.state = state if state is not None else RecipeState()
        self.registry = registry if registry is not None else get_registry()

    def on_mount(self) -> None:
        self.switch_mode("models")

    async def action_quit(self) -> None:
        """Quit, asking first (save / discard / cancel) if the recipe has unsaved changes."""
        if not self.state.changed:
            self.exit()
            return
        if isinstance(self.screen, QuitDialog):
            return
        where = str(self.state.path) if self.state.path else "the file named on the Recipe screen (F5)"
        self.push_screen(QuitDialog(self.state.name, where), self._answered)

    async def _answered(self, answer: Answer | None) -> None:
        if answer == "discard":
            self.exit()
        elif answer == "save":
            # saved as Ctrl+S saves, from the Recipe screen: what its editor shows, in the recipe's format;
            # if it cannot be saved, that screen stays up with the reason
            await self.switch_mode("recipe")
            screen = self.screen
            if isinstance(screen, RecipeScreen) and screen.save_recipe():
                self.exit()

    def action_help(self) -> None:
        """Show the keys over the current screen, or close them again."""
        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss()
        else:
            self.push_screen(HelpScreen())


def make_app(recipe: Path | None = None, registry: Registry | None = None) -> WorkbenchApp:
    """The app on ``recipe`` (opened and checked first; a path that does not exist yet starts an
    empty composition that will be saved there), or on an empty composition."""
    if recipe is None:
        state = RecipeState()
    elif recipe.exists():
        state = RecipeState.open(recipe)
    else:
        state = RecipeState(path=recipe)
    return WorkbenchApp(state, registry)
