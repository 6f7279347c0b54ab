"""The Run screen (F6): run the composed recipe as ``workbench run`` would, with progress and cancel.

The merge runs in a thread worker through the CLI's own functions (``build_plan`` then
``engine.execute``), so the output, its checks and every message are the CLI's. Cancelling makes the
progress callback raise ``KeyboardInterrupt`` in the merge thread: ``execute`` already turns a
Ctrl-C into a clean stop (partial files removed, ``RunInterrupted`` with what was kept), so a
cancelled run behaves exactly like an interrupted CLI run and leaves nothing at the output path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Log, ProgressBar, Static, Switch
from textual.worker import Worker, get_current_worker

from workbench.engine.progress import ProgressEvent
from workbench.errors import RunInterrupted, WorkbenchError
from workbench.tui.screens.base import WorkbenchScreen

if TYPE_CHECKING:
    from workbench.engine.run import RunResult
    from workbench.recipe.schema import Recipe

#: Tensor events reach the screen at most this often (each one waits for the UI thread).
UI_INTERVAL_S = 0.1


def size_text(nbytes: int) -> str:
    """A size as the CLI's summary line writes it."""
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def summary_line(result: RunResult) -> str:
    """The CLI's closing line of ``workbench run``, word for word."""
    rate = result.bytes_read / max(result.seconds, 1e-9) / 1e9
    return (
        f"wrote {result.out_dir}: {result.tensors} tensors, {size_text(result.bytes_written)} in {result.seconds:.2f} s"
        f" ({rate:.2f} GB/s of input)"
    )


def rate_text(event: ProgressEvent, elapsed: float) -> str:
    """Tensors done, input GB/s and the time left, from the bytes read so far."""
    if elapsed <= 0 or event.bytes_read <= 0:
        return f"{event.done}/{event.total} tensors"
    speed = event.bytes_read / elapsed
    left = max(event.total_bytes - event.bytes_read, 0) / speed
    return f"{event.done}/{event.total} tensors   {speed / 1e9:.2f} GB/s   ETA {left:.0f} s"


#: What the status line says between the start of a merge and its first tensor: the CPU kernels of a
#: method are compiled by Numba on their first use (several seconds, much longer on a busy machine)
#: and loaded from the disk cache afterwards.
FIRST_TENSOR = "merging the first tensor (a method's CPU kernels compile on first use, then load from cache)"


def tui_message(message: str) -> str:
    """An engine message with the CLI's flags replaced by this screen's controls."""
    return message.replace(
        "pass --overwrite to replace it", "turn on 'replace an existing output folder' above to replace it"
    )


def recipe_models(recipe: Recipe) -> list[str]:
    """The model references a recipe reads (base first), for the planning line."""
    refs = [recipe.base] if recipe.base is not None else []
    refs += [entry.model for entry in recipe.models]
    for piece in recipe.slices or []:
        refs += [source.model for source in piece.sources]
    return list(dict.fromkeys(refs))


class _Listener:
    """The progress callback of one run, called in the merge thread.

    It stops the run when the worker is cancelled (see the module docstring), and forwards events to
    the screen through ``call_from_thread``, thinning tensor events so a model with thousands of
    small tensors is not slowed down by the UI.
    """

    def __init__(self, screen: RunScreen, worker: Worker[None]) -> None:
        self.screen = screen
        self.worker = worker
        self.start = time.perf_counter()
        self.last = 0.0

    def check(self) -> None:
        """Stop here if the run was cancelled (between the planning steps)."""
        if self.worker.is_cancelled:
            raise KeyboardInterrupt

    def __call__(self, event: ProgressEvent) -> None:
        if (
            self.worker.is_cancelled and event.kind != "finish"
        ):  # "finish" is sent from a finally: never raise there
            raise KeyboardInterrupt
        now = time.perf_counter()
        if event.kind == "start":
            self.start = now
        elif event.kind == "tensor" and event.done < event.total and now - self.last < UI_INTERVAL_S:
            return
        self.last = now
        self.screen.app.call_from_thread(self.screen.show_progress, event, now - self.start)


class RunScreen(WorkbenchScreen):
    """Output folder, overwrite, Run and Cancel; a progress bar, speed, ETA and the run's log."""

    SUB_TITLE = "Run"
    CSS_PATH = "run.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "run", "Run"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self) -> None:
        super().__init__()
        #: True from Run until the merge thread has finished (a cancelled worker's thread may still be cleaning up).
        self.busy = False
        self._worker: Worker[None] | None = None
        #: The step under way, since when, and when the run started (the status line while busy).
        self._doing = ""
        self._doing_since = 0.0
        self._run_start = 0.0
        #: The last counts line (tensors, speed, ETA), kept beside the step.
        self._stats = ""
        #: The folder the last successful run wrote (pushed when the recipe has ``output.push``).
        self._written: Path | None = None

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(0.5, self._tick)

    def compose_body(self) -> Iterable[Widget]:
        with Vertical(id="run-form"):
            with Horizontal(id="run-output-row"):
                yield Label("Output folder", id="run-output-label")
                yield Input(
                    placeholder="folder the merged model is written to (output.path)", id="run-output"
                )
            with Horizontal(id="run-options"):
                yield Button("Run", variant="primary", id="run-start")
                yield Button("Cancel", variant="error", id="run-cancel", disabled=True)
                yield Switch(value=False, id="run-overwrite")
                yield Label(
                    "replace an existing output folder (only once the new one is complete)",
                    id="run-overwrite-label",
                )
            with Horizontal(id="run-progress-row"):
                yield Static("", id="run-status", markup=False)
                yield ProgressBar(total=1, show_eta=False, id="run-progress")
            yield Static("", id="run-stats", markup=False)
            yield Static("", id="run-error", classes="error", markup=False)
        yield Log(id="run-log", highlight=False)

    def refresh_from_state(self) -> None:
        if self.busy:
            return
        output = self.state.data.get("output")
        path = output.get("path") if isinstance(output, dict) else None
        field = self.query_one("#run-output", Input)
        if field.value != (path or ""):
            field.value = str(path or "")

    # -- the form ---------------------------------------------------------------------------------

    @on(Input.Changed, "#run-output")
    def on_output_changed(self, event: Input.Changed) -> None:
        """Write the folder back into the recipe, so Recipe and Publish show the same output."""
        value = event.value.strip()
        output = self.state.data.get("output")
        if not isinstance(output, dict):
            if not value:
                return
            output = self.state.data["output"] = {}
        if value:
            output["path"] = value
        else:
            output.pop("path", None)

    @on(Button.Pressed, "#run-start")
    def on_run_pressed(self) -> None:
        self.action_run()

    @on(Button.Pressed, "#run-cancel")
    def on_cancel_pressed(self) -> None:
        self.action_cancel()

    # -- actions ----------------------------------------------------------------------------------

    def action_run(self) -> None:
        """Check the recipe here (instant feedback), then plan and merge in the worker."""
        if self.busy:
            return
        self._reset()
        try:
            recipe = self.state.validate()
        except WorkbenchError as exc:
            message = tui_message(str(exc))
            self._ended("failed", f"error: {message}", error=message)
            return
        self.query_one("#run-progress", ProgressBar).update(
            total=None, progress=0
        )  # indeterminate while planning
        out_text = self.query_one("#run-output", Input).value.strip()
        overwrite = self.query_one("#run-overwrite", Switch).value
        self._set_busy(True)
        self._run_start = time.perf_counter()
        self._stats = ""
        self._status("planning...")
        self._phase("starting")
        self._log(f"run {self.state.name}: {recipe.method}" + (f" into {out_text}" if out_text else ""))
        self._worker = self._merge(recipe, Path(out_text) if out_text else None, overwrite)

    def action_cancel(self) -> None:
        """Stop the merge at its next tensor; the engine removes what it had written."""
        if self.busy and self._worker is not None and not self._worker.is_cancelled:
            self._worker.cancel()
            self._status("cancelling...")
            self._log("cancelling...")

    # -- the merge thread -------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="merge", exit_on_error=False)
    def _merge(self, recipe: Recipe, out: Path | None, overwrite: bool) -> None:
        """Plan and execute as ``workbench run`` does; every outcome is reported, none raised."""
        worker: Worker[None] = get_current_worker()
        ui: Callable[..., Any] = self.app.call_from_thread
        try:
            lines = self._run_recipe(recipe, out, overwrite, _Listener(self, worker))
        except RunInterrupted as exc:
            ui(self._ended, "stopped", f"stopped: {exc}")
        except KeyboardInterrupt:  # cancelled before the engine had started writing
            where = f" at {out}" if out else ""
            ui(self._ended, "stopped", f"stopped: nothing was written{where}.")
        except WorkbenchError as exc:
            message = tui_message(str(exc))
            ui(self._ended, "failed", f"error: {message}", message)
        except Exception as exc:  # noqa: BLE001  (a bug, not bad input: show its type, as a traceback would)
            ui(self._ended, "failed", f"error: {type(exc).__name__}: {exc}", f"{type(exc).__name__}: {exc}")
        else:
            ui(self._log_all, lines[:-1])
            ui(self._ended, "done", lines[-1])
            if recipe.output.push is not None and self._written is not None:  # as `workbench run` does
                ui(self._push_output, self._written, recipe)

    def _run_recipe(
        self, recipe: Recipe, out: Path | None, overwrite: bool, listener: _Listener
    ) -> list[str]:
        """The body of ``workbench run`` (plan, execute, evaluate); returns the closing lines, the summary last."""
        ui: Callable[..., Any] = self.app.call_from_thread
        ui(self._phase, "loading the merge engine (torch, the method's plugin)")
        from workbench.engine.plan import build_plan
        from workbench.engine.run import run_plan
        from workbench.registry import require_plugins

        require_plugins(self.registry)
        listener.check()
        ui(
            self._phase,
            f"planning: opening the headers of {', '.join(recipe_models(recipe)) or 'the models'}",
        )
        plan = build_plan(
            recipe,
            self.registry,
            out=out,
            overwrite=overwrite,
            check_output=out is not None or recipe.output.path is not None,
        )
        try:
            self.app.call_from_thread(self._log_all, [f"warning: {w}" for w in plan.warnings])
            if listener.worker.is_cancelled:
                raise KeyboardInterrupt
            self.app.call_from_thread(self._status, "merging...")
            ui(self._phase, FIRST_TENSOR)
        except BaseException:
            plan.close()
            raise
        result = run_plan(plan, self.registry, on_progress=listener)
        lines = [f"warning: {w}" for w in result.warnings if w not in plan.warnings]
        for evaluator, metrics in result.evaluations.items():
            lines += [
                f"{evaluator} {metric}: {value:.4f}"
                if isinstance(value, float)
                else f"{evaluator} {metric}: {value!r}"
                for metric, value in metrics.items()
            ]
        self._written = result.out_dir
        return [*lines, summary_line(result)]

    # -- UI updates (main thread) -----------------------------------------------------------------

    def show_progress(self, event: ProgressEvent, elapsed: float) -> None:
        """One progress event: notes go to the log, counts to the bar and the speed line."""
        if event.kind == "note" and event.note:
            self._log(event.note)
            self._phase(event.note)
            return
        if event.kind == "tensor" and event.tensor:
            self._phase(f"merged {event.tensor}")
        bar = self.query_one("#run-progress", ProgressBar)
        bar.update(total=max(event.total, 1), progress=event.done)
        if event.kind == "start":
            self._log(f"merging {event.total} tensors ({size_text(event.total_bytes)} of input)")
        self._stats = rate_text(event, elapsed)
        self.query_one("#run-stats", Static).update(self._stats)

    def _phase(self, text: str) -> None:
        """What the run is doing now (shown with the time it has taken, refreshed by ``_tick``)."""
        self._doing = text
        self._doing_since = time.perf_counter()
        self._tick()

    def _tick(self) -> None:
        """The status line while busy: the step, its seconds so far, and how to stop."""
        if not self.busy or not self._doing:
            return
        seconds = time.perf_counter() - self._doing_since
        total = time.perf_counter() - self._run_start
        line = f"{self._doing} ({seconds:.1f} s; {total:.1f} s in all) - Escape cancels"
        self.query_one("#run-stats", Static).update(f"{self._stats}   {line}" if self._stats else line)

    def _push_output(self, folder: Path, recipe: Recipe) -> None:
        """``output.push`` after a successful run, as ``workbench run`` does it (a public repo is
        confirmed first: the TUI never publishes without asking)."""
        target = recipe.output.push
        assert target is not None
        if target.private:
            self._push(folder, recipe)
            return
        from workbench.checkpoint.hub_client import endpoint
        from workbench.tui.confirm import ConfirmScreen
        from workbench.tui.hub_status import visibility_question

        def answer(yes: bool | None) -> None:
            if yes:
                self._push(folder, recipe)
            else:
                self._log(f"output.push: not pushed ({target.repo} would be public; not confirmed).")

        self.app.push_screen(
            ConfirmScreen(visibility_question(str(folder), target.repo, endpoint()), yes="Push publicly"),
            answer,
        )

    @work(thread=True, exclusive=True, group="push", exit_on_error=False)
    def _push(self, folder: Path, recipe: Recipe) -> None:
        """Push the finished output off the UI thread; the result (or the error) goes to the log."""
        from workbench.checkpoint.hub_client import current_token, scrub
        from workbench.hub.push import push_folder
        from workbench.tui.screens.publish import result_line

        target = recipe.output.push
        assert target is not None
        ui: Callable[..., Any] = self.app.call_from_thread
        ui(
            self._log,
            f"output.push: pushing {folder} to {target.repo}{' (private)' if target.private else ''}...",
        )
        try:
            result = push_folder(
                folder,
                target.repo,
                private=target.private,
                revision=target.revision,
                create_pr=target.create_pr,
            )
        except Exception as exc:  # noqa: BLE001  (every outcome is shown, scrubbed of the token)
            text = str(exc) if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {exc}"
            ui(self._log, f"output.push failed: {scrub(text, current_token())}")
            ui(self._status, "done; push failed")
        else:
            ui(self._log, result_line(result))
            ui(self._status, "done and pushed")

    def _ended(self, outcome: str, line: str, error: str = "") -> None:
        """The run is over (the merge thread has returned): show why, and allow the next one."""
        self._set_busy(False)
        self._doing = ""
        self.query_one("#run-stats", Static).update(self._stats)  # the counts, without the step
        bar = self.query_one("#run-progress", ProgressBar)
        if bar.total is None:  # failed while planning: no pulsing bar left behind
            bar.update(total=1, progress=0)
        self._status(outcome)
        self._log(line)
        self.query_one("#run-error", Static).update(error)

    def _reset(self) -> None:
        self.query_one("#run-log", Log).clear()
        self.query_one("#run-error", Static).update("")
        self.query_one("#run-stats", Static).update("")
        self.query_one("#run-progress", ProgressBar).update(total=1, progress=0)

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.query_one("#run-start", Button).disabled = busy
        self.query_one("#run-cancel", Button).disabled = not busy
        self.query_one("#run-output", Input).disabled = busy
        self.query_one("#run-overwrite", Switch).disabled = busy

    def _status(self, text: str) -> None:
        self.query_one("#run-status", Static).update(text)

    def _log(self, line: str) -> None:
        self.query_one("#run-log", Log).write_line(line)

    def _log_all(self, lines: list[str]) -> None:
        for line in lines:
            self._log(line)
