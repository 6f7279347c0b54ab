"""The Layers screen (F4): where each output layer comes from, and how much fine-tuning changed it.

Left, the layer map (:mod:`workbench.tui.layer_map`: the method's own layout, so it shows what a run
will do); for a method that swaps layers (``layer_swap``) the selected layer's expert can be changed
with ``t`` / ``l``, and the new map is written back as the method's own parameters. Right,
``workbench analyze``'s per-layer × module heatmap of each model's change from the base; it reads
every tensor, so it runs in a thread worker, and only again when the base or the models change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import DataTable, Label, Static
from textual.worker import get_current_worker

from workbench.analysis.deltas import Analysis, analyze
from workbench.analysis.render import cell_text, scale_max, shade, stat_label
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


class LayersScreen(WorkbenchScreen):
    """The layer map and the change heatmap of the recipe's models."""

    SUB_TITLE = "Layers"
    CSS_PATH = "layers.tcss"
    BINDINGS = [
        Binding("t", "set_source('task')", "Layer from task"),
        Binding("l", "set_source('language')", "Layer from language"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._map: LayerMap | None = None
        self._heatmap_key: tuple[str, tuple[str, ...]] | None = None

    def compose_body(self) -> Iterable[Widget]:
        with Vertical(id="layers-body"):
            with Vertical(id="layer-map-pane"):
                yield Label("Layer map", classes="field-label")
                yield Static(id="layer-map-note")
                yield DataTable(id="layer-map", cursor_type="row", zebra_stripes=True)
            with Vertical(id="heatmap-pane"):
                yield Label(f"Change from the base: {stat_label(STAT, 0.01)}, in %", classes="field-label")
                yield Static(id="heatmap-status")
                yield VerticalScroll(id="heatmaps")

    def refresh_from_state(self) -> None:
        self._compute_map(dict(self.state.data))
        base = str(self.state.data.get("base") or "")
        models = tuple(r for r in self.state.references if r != base)
        if (base, models) != self._heatmap_key:
            self._heatmap_key = (base, models)
            self._start_heatmap(base, models)

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
        if not base or not models:
            status.update(
                "The heatmap compares fine-tunes with their base: give the recipe a base and models."
            )
            return
        status.update(f"Analysing {len(models)} model(s) against {base}…")
        self._analyse(base, models)

    @work(thread=True, exclusive=True, group="heatmap")
    def _analyse(self, base: str, models: tuple[str, ...]) -> None:
        """Reads every tensor of every model: never on the UI thread."""
        try:
            result: Analysis | str = analyze(base, list(models), registry=self.registry)
        except WorkbenchError as exc:
            result = f"error: {exc}"
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show_heatmap, result)

    def _show_heatmap(self, analysis: Analysis | str) -> None:
        status = self.query_one("#heatmap-status", Static)
        if isinstance(analysis, str):
            status.update(analysis)
            status.add_class("error")
            return
        status.update(
            f"base {analysis.base}; rows are layers, columns modules; brighter is more change; total: the whole layer."
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
