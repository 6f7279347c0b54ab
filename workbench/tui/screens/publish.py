"""The Publish screen (F7): push a finished output folder to the Hugging Face Hub, as ``workbench push``.

The form is prefilled from the recipe (``output.path``, which the Run screen keeps in step with the
folder it wrote, and ``output.push``). The folder's model card is previewed and checked with the
same ``check_card`` a push runs first, so a card the Hub would reject shows before anything is sent.
The push itself is ``hub_push.push_folder`` in a thread worker; its messages are already scrubbed of
the token, and anything else shown here is scrubbed too: the token is never displayed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Markdown, ProgressBar, Static, Switch

from workbench.errors import WorkbenchError
from workbench.tui.screens.base import WorkbenchScreen

if TYPE_CHECKING:
    from workbench.hub.push import PushResult


def card_body(text: str) -> str:
    """The card without its metadata block (shown as a summary line instead of raw YAML)."""
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            return text[end + 4 :].lstrip("\n")
    return text


def result_line(result: PushResult) -> str:
    """Where the push went, as ``workbench push`` prints it."""
    where = result.pr_url or (result.url + (f" (branch {result.revision})" if result.revision else ""))
    return f"pushed to {where} ({'private' if result.private else 'public'} repo): {result.commit_url}"


def _safe(text: str) -> str:
    """``text`` with the current token (and anything shaped like one) masked."""
    from workbench.checkpoint.hub_client import current_token, scrub

    return scrub(text, current_token())


class PublishScreen(WorkbenchScreen):
    """Folder, repo id, private, revision, pull request; the card preview; Push with its result."""

    SUB_TITLE = "Publish"
    CSS_PATH = "publish.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+t", "push", "Push")]

    def __init__(self) -> None:
        super().__init__()
        #: True while a push is under way.
        self.busy = False
        #: What the recipe last prefilled, by field id: a field the user changed is left alone.
        self._prefilled: dict[str, Any] = {}

    def compose_body(self) -> Iterable[Widget]:
        with Horizontal(id="publish-main"):
            with VerticalScroll(id="publish-form"):
                yield Static("", id="publish-hub", markup=False)
                yield Label("Output folder", classes="field-label")
                yield Input(placeholder="a finished `workbench run` output", id="publish-folder")
                yield Label("Hub repo (org/name, created if missing)", classes="field-label")
                yield Input(placeholder="org/name", id="publish-repo")
                yield Label("Branch (created from main if missing)", classes="field-label")
                yield Input(placeholder="main", id="publish-revision")
                with Horizontal(classes="publish-switch"):
                    yield Switch(value=False, id="publish-private")
                    yield Label("private repo (refuse an existing public one)")
                with Horizontal(classes="publish-switch"):
                    yield Switch(value=False, id="publish-create-pr")
                    yield Label("open a pull request instead of committing")
                yield Button("Push", variant="primary", id="publish-push")
                yield Static("", id="publish-status", markup=False)
                yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="publish-progress")
                yield Static("", id="publish-result", classes="ok", markup=False)
                yield Static("", id="publish-error", classes="error", markup=False)
            with Vertical(id="publish-preview"):
                yield Static("", id="publish-card-status", markup=False)
                with VerticalScroll(id="publish-card-scroll"):
                    yield Markdown("", id="publish-card")

    def refresh_from_state(self) -> None:
        output = self.state.data.get("output")
        output = output if isinstance(output, dict) else {}
        push = output.get("push")
        push = push if isinstance(push, dict) else {}
        self._prefill("#publish-folder", str(output.get("path") or ""))
        self._prefill("#publish-repo", str(push.get("repo") or ""))
        self._prefill("#publish-revision", str(push.get("revision") or ""))
        self._prefill("#publish-private", bool(push.get("private", False)))
        self._prefill("#publish-create-pr", bool(push.get("create_pr", False)))
        self.show_card()
        self.show_hub()

    def show_hub(self) -> None:
        """The endpoint a push goes to and whether a token is found, before anything is sent."""
        from workbench.tui.hub_status import hub_line

        line, ready = hub_line()
        status = self.query_one("#publish-hub", Static)
        status.update(line)
        status.set_classes("ok" if ready else "error")

    def _prefill(self, selector: str, value: str | bool) -> None:
        """Set a field from the recipe unless the user has changed it since the last prefill."""
        widget = self.query_one(selector)
        assert isinstance(widget, (Input, Switch))
        if selector not in self._prefilled or widget.value == self._prefilled[selector]:
            widget.value = value
        self._prefilled[selector] = value

    # -- the card preview -------------------------------------------------------------------------

    @on(Input.Changed, "#publish-folder")
    def on_folder_changed(self) -> None:
        self.show_card()

    def show_card(self) -> None:
        """Render the folder's README.md and check it as a push would."""
        from workbench.engine.card import CARD_FILE, check_card

        text = self.query_one("#publish-folder", Input).value.strip()
        status = self.query_one("#publish-card-status", Static)
        card = self.query_one("#publish-card", Markdown)
        folder = Path(text) if text else None
        readme = folder / CARD_FILE if folder else None
        try:
            body = card_body(readme.read_text(encoding="utf-8")) if readme and readme.is_file() else ""
        except (OSError, UnicodeDecodeError) as exc:
            body = ""
            status.update(f"cannot read {readme}: {exc}")
        card.update(body)
        if folder is None:
            status.set_classes("error")
            status.update("no output folder: run the recipe first (F6), or type a folder.")
            return
        try:
            meta = check_card(folder)
        except WorkbenchError as exc:
            status.set_classes("error")
            status.update(f"card: {exc}")
            return
        status.set_classes("ok")
        tags = ", ".join(str(t) for t in meta.get("tags") or [])
        status.update(f"card ok: library_name {meta.get('library_name')}; tags {tags}")

    # -- pushing ----------------------------------------------------------------------------------

    @on(Button.Pressed, "#publish-push")
    def on_push_pressed(self) -> None:
        self.action_push()

    def action_push(self) -> None:
        """Read the form and push in the background (the UI stays live while files upload); a public
        push is confirmed first."""
        if self.busy:
            return
        folder = self.query_one("#publish-folder", Input).value.strip()
        repo = self.query_one("#publish-repo", Input).value.strip()
        if folder and repo and not self.query_one("#publish-private", Switch).value:
            from workbench.checkpoint.hub_client import endpoint
            from workbench.tui.confirm import ConfirmScreen
            from workbench.tui.hub_status import visibility_question

            self.app.push_screen(
                ConfirmScreen(visibility_question(folder, repo, endpoint()), yes="Push publicly"),
                self._confirmed,
            )
            return
        self._start_push()

    def _confirmed(self, yes: bool | None) -> None:
        if yes:
            self._start_push()
        else:
            self.query_one("#publish-status", Static).update("not pushed: the public push was not confirmed.")

    def _start_push(self) -> None:
        if self.busy:
            return
        folder = self.query_one("#publish-folder", Input).value.strip()
        repo = self.query_one("#publish-repo", Input).value.strip()
        revision = self.query_one("#publish-revision", Input).value.strip() or None
        private = self.query_one("#publish-private", Switch).value
        create_pr = self.query_one("#publish-create-pr", Switch).value
        self.query_one("#publish-result", Static).update("")
        self.query_one("#publish-error", Static).update("")
        if not folder or not repo:
            self._failed("give the output folder and the Hub repo (org/name) to push to.")
            return
        self._set_busy(True)
        self.query_one("#publish-status", Static).update(
            f"pushing {folder} to {repo}{' (private)' if private else ''}..."
        )
        self._push(Path(folder), repo, private, revision, create_pr)

    @work(thread=True, exclusive=True, group="push", exit_on_error=False)
    def _push(self, folder: Path, repo: str, private: bool, revision: str | None, create_pr: bool) -> None:
        """``push_folder`` off the UI thread; every outcome is reported, none raised."""
        from workbench.hub.push import push_folder

        try:
            result = push_folder(folder, repo, private=private, revision=revision, create_pr=create_pr)
        except WorkbenchError as exc:
            self.app.call_from_thread(self._failed, _safe(str(exc)))
        except Exception as exc:  # noqa: BLE001  (a bug, not bad input: show its type, as a traceback would)
            self.app.call_from_thread(self._failed, _safe(f"{type(exc).__name__}: {exc}"))
        else:
            self.app.call_from_thread(self._pushed, result)

    def _pushed(self, result: PushResult) -> None:
        self._set_busy(False)
        self.query_one("#publish-status", Static).update("done")
        self.query_one("#publish-result", Static).update(result_line(result))
        self.query_one("#publish-result", Static).scroll_visible()  # a small terminal scrolls the form

    def _failed(self, message: str) -> None:
        self._set_busy(False)
        self.query_one("#publish-status", Static).update("failed")
        self.query_one("#publish-error", Static).update(f"error: {message}")
        self.query_one("#publish-error", Static).scroll_visible()

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.query_one("#publish-push", Button).disabled = busy
        self.query_one("#publish-progress", ProgressBar).display = busy
