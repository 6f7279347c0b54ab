"""The Models screen (F2): the models to merge and which one is the base, with what each one is.

Every model is opened in a thread worker (headers only, as ``workbench inspect`` does), so a slow
disk or a Hub lookup never freezes the UI; the facts arrive row by row. A model that cannot be
opened, or whose architecture or tensors differ from the base (or the first model), is flagged
with the reason, before the user gets as far as running the merge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Button, DataTable, Input, Label, Select, Static

from workbench.analysis.model_summary import ModelSummary, incompatibility, summarize
from workbench.tui.screens.base import WorkbenchScreen

COLUMNS = ("model", "role", "architecture", "layers", "parameters", "dtype", "status")
#: Below this width (80x24 terminals) the table drops these columns, so that the status, where the
#: errors show, stays on screen; the model column is capped at ``NARROW_MODEL_WIDTH``.
NARROW_WIDTH = 110
NARROW_DROPS = ("architecture", "parameters")
NARROW_MODEL_WIDTH = 32


def shown_columns(width: int) -> tuple[str, ...]:
    """The table's columns at a screen ``width``."""
    return COLUMNS if width >= NARROW_WIDTH else tuple(c for c in COLUMNS if c not in NARROW_DROPS)


class ModelsScreen(WorkbenchScreen):
    """Add, remove and inspect the recipe's models; pick the base."""

    SUB_TITLE = "Models"
    CSS_PATH = "models.tcss"
    BINDINGS = [Binding("delete", "remove_model", "Remove model")]

    def __init__(self) -> None:
        super().__init__()
        self.summaries: dict[str, ModelSummary] = {}
        self._opening: set[str] = set()
        #: Per-model parameters of a model while it is the base (restored if it stops being one).
        self._stashed: dict[str, dict[str, Any]] = {}
        #: The model just added, announced once it has been opened (not before: it may not exist).
        self._announce: str | None = None
        self._columns: tuple[str, ...] = COLUMNS

    def compose_body(self) -> Iterable[Widget]:
        with Vertical(id="models-body"):
            yield Label(
                "Add a model: a local path, a Hub id (org/name), or BASE+ADAPTER", classes="field-label"
            )
            with Horizontal(id="add-row"):
                yield Input(placeholder="path or org/name", id="model-ref")
                yield Button("Add", id="add-model", variant="primary")
            yield Static("", id="add-message")
            yield Label(
                "Base model (task-vector methods subtract it; none for plain averages)", classes="field-label"
            )
            yield Select[str]([], prompt="none", allow_blank=True, id="base-select")
            table: DataTable[str] = DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
            table.add_columns(*COLUMNS)
            yield table
            with Horizontal(id="models-actions"):
                yield Button("Remove", id="remove-model")
                yield Label("Delete removes the selected model", id="remove-hint")
            yield Static("", id="model-problems", classes="error")

    # -- the recipe's models ---------------------------------------------------------------------

    def _entries(self) -> list[dict[str, Any]]:
        """``data["models"]`` normalised, without creating it in a recipe made of slices."""
        if "models" not in self.state.data and self.state.data.get("slices"):
            return []
        return self.state.models

    def _reference(self) -> tuple[ModelSummary | None, str]:
        """The model others are compared with (the base, else the first model) and its name."""
        base = self.state.data.get("base")
        refs = self.state.references
        if not refs:
            return None, ""
        return self.summaries.get(refs[0]), "base" if base else "the first model"

    def refresh_from_state(self) -> None:
        refs = self.state.references
        select: Select[str] = self.query_one("#base-select", Select)
        base = self.state.data.get("base")
        with self.prevent(Select.Changed):
            select.set_options([(ref, ref) for ref in refs])
            select.value = base if base in refs else Select.NULL
        stale = [
            r for r in refs if r not in self._opening and (r not in self.summaries or self.summaries[r].error)
        ]
        if stale:
            self._opening.update(stale)
            self.open_models(stale)
        self._show_table()

    def _show_table(self) -> None:
        """Rebuild the table and the list of problems from the state and the summaries so far."""
        table: DataTable[str] = self.query_one("#models-table", DataTable)
        cursor = table.cursor_row
        columns = shown_columns(self.size.width or self.app.size.width)
        if columns != self._columns:
            self._columns = columns
            table.clear(columns=True)
            for column in columns:
                narrow = column == "model" and columns != COLUMNS
                table.add_column(column, key=column, width=NARROW_MODEL_WIDTH if narrow else None)
        else:
            table.clear()
        base = self.state.data.get("base")
        model_refs = {entry["model"] for entry in self._entries()}
        reference, where = self._reference()
        problems = []
        for ref in self.state.references:
            role = "base" if ref == base else "model" if ref in model_refs else "slice source"
            summary = self.summaries.get(ref)
            if summary is None:
                self._add_row(table, ref, role=role, status="opening…")
                continue
            reason = summary.error
            if reason is None and reference is not None and summary is not reference:
                reason = incompatibility(summary, reference, where)
            status = "ok" if reason is None else "cannot open" if summary.error else "incompatible"
            if reason:
                problems.append(f"{ref}: {reason}")
            if summary.error:
                self._add_row(table, ref, role=role, status=status)
            else:
                self._add_row(
                    table,
                    ref,
                    role=role,
                    architecture=summary.architecture,
                    layers=str(summary.layers),
                    parameters=f"{summary.parameters:,}",
                    dtype=summary.dtype_label,
                    status=status,
                )
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        self.query_one("#model-problems", Static).update("\n".join(problems))

    def _add_row(self, table: DataTable[str], ref: str, **cells: str) -> None:
        """A row of the columns shown now (the others collapse on a narrow screen)."""
        cells["model"] = ref
        table.add_row(*(cells.get(column, "") for column in self._columns), key=ref)

    def on_resize(self) -> None:
        if shown_columns(self.size.width) != self._columns:
            self._show_table()

    @work(thread=True, group="open-models")
    def open_models(self, refs: list[str]) -> None:
        """Open each model off the UI thread; each summary is shown as soon as it is known."""
        for ref in refs:
            summary = summarize(self.registry, ref)
            self.app.call_from_thread(self._got_summary, summary)

    def _got_summary(self, summary: ModelSummary) -> None:
        self._opening.discard(summary.ref)
        self.summaries[summary.ref] = summary
        if summary.ref == self._announce:
            self._announce = None
            if summary.error:
                self._say(f"{summary.ref} cannot be opened: {summary.error}")
            else:
                self._say(f"Added {summary.ref}.", error=False)
        self._show_table()

    # -- editing ---------------------------------------------------------------------------------

    def _say(self, message: str, error: bool = True) -> None:
        note = self.query_one("#add-message", Static)
        note.update(message)
        note.set_class(error, "error")
        note.set_class(not error and bool(message), "ok")

    def add_model(self, ref: str) -> None:
        """Append ``ref`` to the recipe's models (with no per-model parameters yet)."""
        ref = ref.strip()
        if not ref:
            self._say("Type a path or a Hub id first.")
            return
        if ref in self.state.references:
            self._say(f"{ref} is in the recipe already.")
            return
        self.state.models.append({"model": ref, "parameters": self._stashed.pop(ref, {})})
        self.query_one("#model-ref", Input).value = ""
        self._announce = ref
        self._say(f"Opening {ref}…", error=False)
        self.query_one("#add-message", Static).remove_class("ok")  # not good news yet
        self.refresh_from_state()
        if ref in self.summaries and ref not in self._opening:  # known already: no worker will report
            self._got_summary(self.summaries[ref])

    @on(Input.Submitted, "#model-ref")
    def on_model_ref_submitted(self, event: Input.Submitted) -> None:
        self.add_model(event.value)

    @on(Button.Pressed, "#add-model")
    def on_add_pressed(self) -> None:
        self.add_model(self.query_one("#model-ref", Input).value)

    @on(Button.Pressed, "#remove-model")
    def on_remove_pressed(self) -> None:
        self.action_remove_model()

    def action_remove_model(self) -> None:
        """Drop the selected model from the recipe (the base, or an entry of ``models``)."""
        table: DataTable[str] = self.query_one("#models-table", DataTable)
        if not table.row_count:
            return
        ref = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        self.remove_model(ref)

    def remove_model(self, ref: str) -> None:
        data = self.state.data
        if data.get("base") == ref:
            del data["base"]
        else:
            entries = self._entries()
            kept = [entry for entry in entries if entry["model"] != ref]
            if len(kept) == len(entries):
                self._say(f"{ref} is a slice source: edit the slices on the Recipe screen (F5).")
                return
            entries[:] = kept
        self._say(f"Removed {ref}.", error=False)
        self.refresh_from_state()

    @on(Select.Changed, "#base-select")
    def on_base_changed(self, event: Select.Changed) -> None:
        new = None if event.value is Select.NULL else str(event.value)
        self.set_base(new)

    def set_base(self, ref: str | None) -> None:
        """Make ``ref`` the base (None: no base); the previous base becomes a model again, in the
        place the new base had, with the per-model parameters it had before it was the base."""
        data = self.state.data
        old = data.get("base")
        if ref == old:
            return
        entries = self._entries()
        where = len(entries) if ref is None else 0
        if ref is not None:
            for i, entry in enumerate(entries):
                if entry["model"] == ref:
                    self._stashed[ref] = entry.get("parameters") or {}
                    del entries[i]
                    where = i
                    break
            data["base"] = ref
        else:
            data.pop("base", None)
        if old:
            self.state.models.insert(
                where if ref is not None else 0, {"model": old, "parameters": self._stashed.pop(old, {})}
            )
        self.refresh_from_state()
