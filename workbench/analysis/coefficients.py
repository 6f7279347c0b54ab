"""``workbench analyze OUTPUT``: learned coefficients (``atlas``) as heatmaps, one per task vector.

A cell is the mean λ of the tensors of one module in one layer (over their partitions, when the
blocks are partitioned); tensors outside the layers get a table of their own. All task vectors
share one colour scale, so the same colour is the same λ in every chart.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from workbench import architecture
from workbench.analysis.deltas import COLUMN_ORDER, module_label
from workbench.analysis.render import HeatGrid, grid_tables, write_grids_png
from workbench.checkpoint.coefficients import CoefficientTable


def _cells(table: CoefficientTable, model: int) -> tuple[dict[tuple[int, str], float], dict[str, float]]:
    """(layer, module) -> mean λ, and tensor -> λ for the tensors outside the layers."""
    gathered: dict[tuple[int, str], list[float]] = {}
    outside: dict[str, float] = {}
    for name in table.tensor_blocks:
        value = statistics.fmean(table.value(model, name))
        place = architecture.place(name)
        if place.layer_index is None:
            outside[name] = value
        else:
            gathered.setdefault((place.layer_index, module_label(place.module)), []).append(value)
    return {cell: statistics.fmean(values) for cell, values in gathered.items()}, outside


def _layout(table: CoefficientTable) -> tuple[int, list[str]]:
    cells = [c for m in range(len(table.models)) for c in _cells(table, m)[0]]
    seen = list(dict.fromkeys(column for _, column in cells))
    return (
        max((layer for layer, _ in cells), default=-1) + 1,
        [m for m in COLUMN_ORDER if m in seen] + [m for m in seen if m not in COLUMN_ORDER],
    )


def _grids(table: CoefficientTable) -> list[HeatGrid]:
    return [
        HeatGrid(f"{ref}: learned λ ({table.granularity} blocks)", _cells(table, m)[0])
        for m, ref in enumerate(table.models)
    ]


def _range(table: CoefficientTable) -> tuple[float, float]:
    values = [v for rows in table.values for block in rows for v in block]
    return min(values), max(values)


def render_coefficients(table: CoefficientTable) -> list[RenderableType]:
    layers, columns = _layout(table)
    low, high = _range(table)
    parts: list[RenderableType] = list(
        grid_tables(_grids(table), layers, columns, lambda v: f"{v:.2f}", low, high)
    )
    outside = Table(title="outside the layers: learned λ", box=None, pad_edge=False, title_justify="left")
    outside.add_column("tensor")
    per_model = [_cells(table, m)[1] for m in range(len(table.models))]
    for ref in table.models:
        outside.add_column(ref, justify="right", overflow="fold")
    for name in per_model[0]:
        outside.add_row(name, *(f"{values[name]:.3f}" for values in per_model))
    if per_model[0]:
        parts.append(outside)
    parts.append(
        Text(
            f"{len(table.models)} task vector(s) × {len(table.blocks)} block(s) × {table.partitions} "
            f"partition(s); λ from {low:.3f} to {high:.3f}"
        )
    )
    return parts


def write_coefficients_png(table: CoefficientTable, path: Path) -> None:
    layers, columns = _layout(table)
    low, high = _range(table)
    write_grids_png(
        _grids(table),
        layers,
        columns,
        low,
        high if high > low else low + 1.0,
        "learned λ",
        "learned task-vector coefficients",
        path,
    )
