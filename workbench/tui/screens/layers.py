"""The Layers screen (F4): where each output layer comes from, and how much fine-tuning changed it.

Left, the layer map (:mod:`workbench.tui.layer_map`: the method's own layout, so it shows what a run
will do); for a method that swaps layers (``layer_swap``) the selected layer's expert can be changed
with ``t`` / ``l``, and the new map is written back as the method's own parameters. Right,
``workbench analyze``'s per-layer × module heatmap of each model's change from the base; it reads
every tensor, so it runs in a thread worker, and only again when the reference or the models change.
It says which model and tensor it is reading and how far it is, and Escape cancels it.

The heatmap's reference is the recipe's base, or a model typed in the "Reference" field: a method
that takes no base (``layer_swap``) can still be compared with the experts' common base that way,
without putting a base into the recipe (the reference is kept by this screen, never saved).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import DataTable, Input, Label, Static
from textual.worker import Worker, get_current_worker

from workbench.analysis.deltas import Analysis, analyze
from workbench.analysis.render import cell_text, scale_max, shade, stat_label
from workbench.engine.progress import ProgressEvent
from workbench.errors import WorkbenchError
from workbench.tui.layer_map import LayerMap, build_map, swap_layout
from workbench.tui.screens.base import WorkbenchScreen

#: The heatmap's statistic: analyze's default, comparable across modules of different scale.
STAT = "relative"
#: Short column headings, so a Llama layer's nine modules fit 120 columns (the keys stay analyze's).
SHORT = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "input_layernorm": "in_norm",
    "post_attention_layernorm": "post_norm",
}


#: Progress reaches the screen at most this often (each update waits for the UI thread).
UI_INTERVAL_S = 0.1


class HeatmapCancelled(Exception):
    """Raised by the progress callback to stop an analysis the user cancelled (or that is stale)."""


def progress_line(models: tuple[str, ...], event: ProgressEvent, elapsed: float) -> str:
    """Which tensor the analysis has read, how far it is (three passes over the layers), how long."""
    share = event.done / max(event.total, 1)
    left = f", about {elapsed / share - elapsed:.0f} s left" if share > 0.02 and elapsed > 1 else ""
    where = f": read {event.tensor}" if event.tensor else ": opening the tensors"
    return (
        f"Analysing {', '.join(models)}{where} - {event.done}/{event.total} tensor passes ({share:.0%}), "
        f"{elapsed:.1f} s{left}. Escape cancels."
    )


class LayersScreen(WorkbenchScreen):
    """The layer map and the change heatmap of the recipe's models."""

    SUB_TITLE = "Layers"
    CSS_PATH = "layers.tcss"
    BINDINGS = [
        Binding("t", "set_source('task')", "Layer from task"),
        Binding("l", "set_source('language')", "Layer from language"),
        Binding("escape", "cancel_heatmap", "Cancel heatmap"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._map: LayerMap | None = None
        self._heatmap_key: tuple[str, tuple[str, ...]] | None = None
        self._heatmap_worker: Worker[None] | None = None
        #: A reference typed for the heatmap (used where the recipe has no base, or instead of it).
        self.reference = ""

    def compose_body(self) -> Iterable[Widget]:
        with Vertical(id="layers-body"):
            with Vertical(id="layer-map-pane"):
                yield Label("Layer map", classes="field-label")
                yield Static(id="layer-map-note")
                yield DataTable(id="layer-map", cursor_type="row", zebra_stripes=True)
            with Vertical(id="heatmap-pane"):
                yield Label(
                    f"Change from the reference: {stat_label(STAT, 0.01)}, in %", classes="field-label"
                )
                with Horizontal(id="heatmap-reference-row"):
                    yield Label("Reference", id="heatmap-reference-label")
                    yield Input(
                        placeholder="the models' common base (heatmap only, not saved); Enter",
                        id="heatmap-reference",
                    )
                yield Static(id="heatmap-status")
                yield VerticalScroll(id="heatmaps")

    def refresh_from_state(self) -> None:
        self._compute_map(dict(self.state.data))
        self._update_heatmap()

    def _heatmap_inputs(self) -> tuple[str, tuple[str, ...]]:
        """The heatmap's reference (typed, else the recipe's base) and the models compared with it."""
        base = str(self.state.data.get("base") or "")
        reference = self.reference or base
        models = tuple(r for r in self.state.references if r not in (base, reference))
        return reference, models

    def _update_heatmap(self, force: bool = False) -> None:
        key = self._heatmap_inputs()
        if force or key != self._heatmap_key:
            self._heatmap_key = key
            self._start_heatmap(*key)

    @on(Input.Submitted, "#heatmap-reference")
    def on_reference_submitted(self, event: Input.Submitted) -> None:
        self.reference = event.value.strip()
        self._update_heatmap(force=True)

    # -- the layer map ----------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="layer-map")
    def _compute_map(self, data: dict) -> None:
        """Headers only, but a Hub model's headers come over the network: off the UI thread."""
        layer_map = build_map(data, self.registry)
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show_map, layer_map)

    def _show_map(self, layer_map: LayerMap) -> None:
        self._map = layer_map
        note = self.query_one("#layer-map-note", Static)
        note.update(layer_map.note)
        note.set_class(layer_map.error, "error")
        table = self.query_one("#layer-map", DataTable)
        row = table.cursor_row
        table.clear(columns=True)
        table.add_columns(*layer_map.columns)
        for cells in layer_map.rows:
            table.add_row(*cells, key=cells[0])
        if layer_map.rows:
            table.move_cursor(row=min(row, len(layer_map.rows) - 1))
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The t / l keys only where they mean something: a layer_swap map."""
        if action == "set_source":
            return self._map is not None and self._map.swap_weights is not None
        return True

    def action_set_source(self, role: str) -> None:
        """Take the selected layer wholly from one expert, written back in layer_swap's own format."""
        if self._map is None or self._map.swap_weights is None:
            return
        weights = list(self._map.swap_weights)
        weights[self.query_one("#layer-map", DataTable).cursor_row] = 1.0 if role == "language" else 0.0
        method = swap_layout(self.state.data, self.registry)
        if method is None:
            return
        self.state.data["parameters"] = method.with_layout(self.state.data.get("parameters") or {}, weights)
        self._compute_map(dict(self.state.data))

    # -- the heatmap ------------------------------------------------------------------------------

    def _start_heatmap(self, base: str, models: tuple[str, ...]) -> None:
        status = self.query_one("#heatmap-status", Static)
        self.query_one("#heatmaps", VerticalScroll).remove_children()
        status.remove_class("error")
        if self._heatmap_worker is not None:
            self._heatmap_worker.cancel()
        if not models:
            status.update(
                "The heatmap compares models with a reference: add models on the Models screen (F2)."
            )
            return
        if not base:
            status.update(
                "The heatmap needs a reference model: type the models' common base in Reference and press "
                "Enter. It is used only here, so a method that takes no base (layer_swap) stays valid."
            )
            return
        status.update(f"Analysing {', '.join(models)} against {base}: opening the models... Escape cancels.")
        self._heatmap_worker = self._analyse(base, models)

    def action_cancel_heatmap(self) -> None:
        """Stop the analysis at its next tensor."""
        worker = self._heatmap_worker
        if worker is not None and worker.is_running and not worker.is_cancelled:
            worker.cancel()
            self.query_one("#heatmap-status", Static).update(
                "Heatmap cancelled. Press Enter in Reference to analyse again."
            )

    @work(thread=True, exclusive=True, group="heatmap", exit_on_error=False)
    def _analyse(self, base: str, models: tuple[str, ...]) -> None:
        """Reads every tensor of every model: never on the UI thread. Progress is shown as it goes;
        a cancelled worker stops at the next tensor (the callback raises)."""
        worker = get_current_worker()
        start = time.perf_counter()
        last = [0.0]

        def progress(event: ProgressEvent) -> None:
            if worker.is_cancelled and event.kind != "finish":  # "finish" comes from a finally
                raise HeatmapCancelled
            now = time.perf_counter()
            if event.kind == "finish" or (
                event.kind == "tensor" and event.done > 1 and now - last[0] < UI_INTERVAL_S
            ):
                return  # the start and the first tensor always show: the user sees it working at once
            last[0] = now
            self.app.call_from_thread(self._show_progress, worker, progress_line(models, event, now - start))

        try:
            result: Analysis | str = analyze(base, list(models), registry=self.registry, on_progress=progress)
        except HeatmapCancelled:
            return
        except WorkbenchError as exc:
            result = f"error: {exc}"
        if not worker.is_cancelled:
            self.app.call_from_thread(self._show_heatmap, result)

    def _show_progress(self, worker: Worker[None], line: str) -> None:
        if not worker.is_cancelled:
            self.query_one("#heatmap-status", Static).update(line)

    def _show_heatmap(self, analysis: Analysis | str) -> None:
        status = self.query_one("#heatmap-status", Static)
        if isinstance(analysis, str):
            status.update(analysis)
            status.add_class("error")
            return
        status.update(
            f"reference {analysis.base}; rows are layers, columns modules; brighter is more change; "
            "total: the whole layer."
        )
        high = scale_max(analysis, STAT)
        tables: list[Widget] = []
        for index, model in enumerate(analysis.models):
            table: DataTable[str | Text] = DataTable(
                id=f"heatmap-{index}", classes="heatmap", cursor_type="none"
            )
            table.add_column("layer", key="layer")
            for module in analysis.modules:
                table.add_column(SHORT.get(module, module), key=module)
            table.add_column("total", key="total")
            totals = model.layer_totals(analysis.layer_count)
            for layer in range(analysis.layer_count):
                cells = [
                    self._cell(analysis.value(model, layer, module, STAT), high)
                    for module in analysis.modules
                ]
                total = Text(cell_text(STAT, totals[layer].relative), style="bold")
                table.add_row(str(layer), *cells, total, key=str(layer))
            tables += [Label(model.ref, classes="heatmap-title"), table]
        self.query_one("#heatmaps", VerticalScroll).mount_all(tables)

    @staticmethod
    def _cell(value: float | None, high: float) -> Text:
        """A value shaded on analyze's palette (one scale for every model, as the CLI draws it)."""
        if value is None:
            return Text("")
        fraction = value / high if high > 0 and math.isfinite(value) else 1.0 if value > 0 else 0.0
        return Text(cell_text(STAT, value), style=shade(fraction))
