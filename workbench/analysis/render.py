"""Showing an :class:`~workbench.analysis.deltas.Analysis`: rich heatmaps, a PNG, CSV and JSON files.

Every chart of one statistic shares one colour scale across models, so a brighter cell means a
larger change whichever model it belongs to. Files are written atomically (a temporary name in the
same folder, then a rename): a failure never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from workbench.analysis.deltas import Analysis, ChangeStats, SwapSuggestion
from workbench.errors import OutputError

#: A sequential palette (viridis at five stops): dark is little change, yellow the most.
_PALETTE = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
CSV_COLUMNS = ("model", "layer", "module", "mean_abs", "relative", "top_share", "count")


def stat_label(stat: str, top_fraction: float) -> str:
    return {
        "relative": "relative change ||Δ|| / ||W_base||",
        "mean_abs": "mean |Δ|",
        "top_share": f"share of the top {top_fraction:.3g} most-changed entries",
    }[stat]


def format_value(stat: str, value: float) -> str:
    return f"{value:.2e}" if stat == "mean_abs" else f"{value:.2%}"


def cell_text(stat: str, value: float) -> str:
    """Narrow enough for a dozen columns in 80 characters: the unit is in the table title."""
    return f"{value:.1e}" if stat == "mean_abs" else f"{100 * value:.1f}"


def scale_max(analysis: Analysis, stat: str) -> float:
    """The top of the colour scale of ``stat``: its largest finite cell value over every model."""
    values = [s.value(stat, m.top_total) for m in analysis.models for s in m.cells.values()]
    return max((v for v in values if math.isfinite(v)), default=0.0)


def shade(fraction: float) -> str:
    """Background colour at ``fraction`` (0..1) of the palette, with a readable foreground."""
    position = min(max(fraction, 0.0), 1.0) * (len(_PALETTE) - 1)
    low = min(int(position), len(_PALETTE) - 2)
    t = position - low
    r, g, b = (round(a + (c - a) * t) for a, c in zip(_PALETTE[low], _PALETTE[low + 1]))
    foreground = "black" if fraction > 0.6 else "white"
    return f"{foreground} on #{r:02x}{g:02x}{b:02x}"


# --------------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------------


@dataclass
class HeatGrid:
    """One heatmap: a value per (layer, column) cell, and optionally a bold total per layer."""

    title: str
    cells: dict[tuple[int, str], float]
    totals: list[float] | None = None


def grid_tables(
    grids: Sequence[HeatGrid],
    layers: int,
    columns: Sequence[str],
    text: Callable[[float], str],
    low: float,
    high: float,
) -> list[Table]:
    """One table per grid: rows are layers, one column per module; colours span ``low``..``high``."""
    span = high - low
    tables = []
    for grid in grids:
        table = Table(title=grid.title, box=None, pad_edge=False, title_justify="left")
        table.add_column("layer", justify="right")
        for column in columns:
            table.add_column(column, justify="right", overflow="fold")
        if grid.totals is not None:
            table.add_column("layer total", justify="right", overflow="fold")
        for layer in range(layers):
            cells: list[Text] = []
            for column in columns:
                value = grid.cells.get((layer, column))
                style = shade((value - low) / span if span > 0 else 0.0) if value is not None else ""
                cells.append(Text("-") if value is None else Text(text(value), style=style))
            if grid.totals is not None:
                cells.append(Text(text(grid.totals[layer]), style="bold"))
            table.add_row(str(layer), *cells)
        tables.append(table)
    return tables


def heatmap_tables(analysis: Analysis, stat: str) -> list[Table]:
    """One table per model: rows are layers, columns modules, the last column the whole layer."""
    unit = "" if stat == "mean_abs" else " (%)"
    grids = [
        HeatGrid(
            f"{model.ref}: {stat_label(stat, analysis.top_fraction)}{unit}",
            {cell: stats.value(stat, model.top_total) for cell, stats in model.cells.items()},
            [total.value(stat, model.top_total) for total in model.layer_totals(analysis.layer_count)],
        )
        for model in analysis.models
    ]
    return grid_tables(
        grids,
        analysis.layer_count,
        analysis.modules,
        lambda value: cell_text(stat, value),
        0.0,
        scale_max(analysis, stat),
    )


def top_set_lines(analysis: Analysis) -> list[Text]:
    return [
        Text(
            f"{m.ref}: top {analysis.top_fraction:.3g} of {m.layer_entries:,} layer entries: |Δ| >= "
            f"{m.top_threshold:.3e}, {m.top_total:,} entries"
        )
        for m in analysis.models
    ]


def non_layer_table(analysis: Analysis) -> Table:
    """Tensors outside the layers (embeddings, final norm, head), one row each."""
    table = Table(title="outside the layers", box=None, pad_edge=False, title_justify="left")
    table.add_column("tensor")
    for model in analysis.models:
        table.add_column(f"{model.ref}\nrelative", justify="right")
        table.add_column("mean |Δ|", justify="right")
    names = list(dict.fromkeys(name for m in analysis.models for name in m.non_layer))
    for name in names:
        row = [name]
        for model in analysis.models:
            stats = model.non_layer[name]
            row += [format_value("relative", stats.relative), format_value("mean_abs", stats.mean_abs)]
        table.add_row(*row)
    return table


def render_analysis(analysis: Analysis, stat: str) -> list[RenderableType]:
    parts: list[RenderableType] = [*heatmap_tables(analysis, stat)]
    if any(m.non_layer for m in analysis.models):
        parts.append(non_layer_table(analysis))
    parts += top_set_lines(analysis)
    return parts


def render_suggestion(suggestion: SwapSuggestion) -> list[RenderableType]:
    """The per-layer profile the rule read, the decision, and the recipe (unless nothing is swapped)."""
    table = Table(
        title="per-layer relative change and each expert's share of it",
        box=None,
        pad_edge=False,
        title_justify="left",
    )
    for header in ("layer", "r task", "r language", "p task", "p language", "d = p_lang - p_task", "from"):
        table.add_column(header, justify="right")
    for row in suggestion.profile:
        table.add_row(
            str(row.layer),
            format_value("relative", row.task_relative),
            format_value("relative", row.language_relative),
            f"{row.task_share:.3f}",
            f"{row.language_share:.3f}",
            f"{row.difference:+.3f}",
            suggestion.source(row.layer),
        )
    parts: list[RenderableType] = [
        table,
        Text(f"task expert: {suggestion.task}; language expert: {suggestion.language}"),
    ]
    if suggestion.bottom == 0 and suggestion.top == 0:
        parts.append(
            Text(
                "bottom = 0, top = 0: neither the first nor the last layer changed more (as a share of the "
                "expert's change) in the language expert than in the task expert, so the profiles suggest "
                "no swap."
            )
        )
        return parts
    parts.append(
        Text(
            f"suggested: bottom = {suggestion.bottom}, top = {suggestion.top} (layers from the language expert)"
        )
    )
    parts.append(
        Text("# layer_swap recipe suggested by `workbench analyze`\n" + suggestion.recipe().rstrip("\n"))
    )
    return parts


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def check_output_paths(paths: Sequence[Path]) -> None:
    """Fail before the analysis, not after it, when an output file cannot be written where asked."""
    for path in paths:
        if path.is_dir():
            raise OutputError(f"{path} is a folder; give a file name.")
        if not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: folder {path.parent} does not exist.")


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``."""
    check_output_paths([path])
    # A plain open (not tempfile, which makes files private) gives the file the usual permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode()))


def _stats_dict(stats: ChangeStats, top_total: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"mean_abs": stats.mean_abs, "relative": stats.relative}
    if top_total is not None:
        out["top_share"] = stats.top_share(top_total)
        out["top_count"] = stats.top_count
    out["count"] = stats.count
    return out


def write_csv(analysis: Analysis, path: Path) -> None:
    """Long format: one row per model, layer and module."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for model in analysis.models:
        for (layer, module), stats in sorted(
            model.cells.items(), key=lambda item: (item[0][0], analysis.modules.index(item[0][1]))
        ):
            writer.writerow(
                [
                    model.ref,
                    layer,
                    module,
                    repr(stats.mean_abs),
                    repr(stats.relative),
                    repr(stats.top_share(model.top_total)),
                    stats.count,
                ]
            )
    write_text(path, buffer.getvalue())


def analysis_dict(analysis: Analysis, suggestion: SwapSuggestion | None = None) -> dict[str, Any]:
    """Everything measured: cells, per-layer totals, tensors outside the layers, the top sets."""
    models = []
    for model in analysis.models:
        cells = [
            {"layer": layer, "module": module, **_stats_dict(model.cells[layer, module], model.top_total)}
            for layer in range(analysis.layer_count)
            for module in analysis.modules
            if (layer, module) in model.cells
        ]
        totals = model.layer_totals(analysis.layer_count)
        models.append(
            {
                "model": model.ref,
                "path": str(model.path),
                "layer_entries": model.layer_entries,
                "top_threshold": model.top_threshold,
                "top_count": model.top_total,
                "cells": cells,
                "layers": [
                    {"layer": layer, **_stats_dict(stats, model.top_total)}
                    for layer, stats in enumerate(totals)
                ],
                "non_layer": [
                    {"tensor": name, **_stats_dict(stats, None)} for name, stats in model.non_layer.items()
                ],
            }
        )
    out: dict[str, Any] = {
        "base": analysis.base,
        "layer_count": analysis.layer_count,
        "modules": analysis.modules,
        "top_fraction": analysis.top_fraction,
        "models": models,
    }
    if suggestion is not None:
        out["suggest_swap"] = {
            "task": suggestion.task,
            "language": suggestion.language,
            "bottom": suggestion.bottom,
            "top": suggestion.top,
            "profile": [
                {
                    "layer": p.layer,
                    "task_relative": p.task_relative,
                    "language_relative": p.language_relative,
                    "task_share": p.task_share,
                    "language_share": p.language_share,
                    "difference": p.difference,
                }
                for p in suggestion.profile
            ],
            "recipe": suggestion.recipe(),
        }
    return out


def write_json(analysis: Analysis, path: Path, suggestion: SwapSuggestion | None = None) -> None:
    write_text(path, json.dumps(analysis_dict(analysis, suggestion), indent=2) + "\n")


def write_png(analysis: Analysis, stat: str, path: Path) -> None:
    """One heatmap per model side by side (layer 0 at the top), one colour scale and colour bar."""
    grids = [
        HeatGrid(
            f"{model.ref}\n{stat}",
            {cell: stats.value(stat, model.top_total) for cell, stats in model.cells.items()},
        )
        for model in analysis.models
    ]
    top = scale_max(analysis, stat) or 1.0
    write_grids_png(
        grids,
        analysis.layer_count,
        analysis.modules,
        0.0,
        top,
        stat_label(stat, analysis.top_fraction),
        f"change from {analysis.base}",
        path,
    )


def write_grids_png(
    grids: Sequence[HeatGrid],
    layers: int,
    columns: Sequence[str],
    low: float,
    high: float,
    label: str,
    title: str,
    path: Path,
) -> None:
    """The grids side by side (layer 0 at the top), sharing one colour scale and colour bar."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(grids)
    figure = Figure(
        figsize=(count * (1.6 + 0.45 * len(columns)) + 1.2, 2.2 + 0.28 * layers), layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, count, squeeze=False)[0]
    image = None
    for ax, grid in zip(axes, grids):
        values = np.full((layers, len(columns)), np.nan)
        for (layer, column), value in grid.cells.items():
            values[layer, list(columns).index(column)] = value
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(grid.title, fontsize=9)
        ax.set_xticks(
            range(len(columns)), columns, rotation=60, ha="right", rotation_mode="anchor", fontsize=8
        )
        ax.set_yticks(range(layers), [str(layer) for layer in range(layers)], fontsize=8)
        ax.set_ylabel("layer (0 = first)")
    assert image is not None  # subplots() has refused a figure without grids
    figure.colorbar(image, ax=list(axes), label=label, shrink=0.9)
    figure.suptitle(title, fontsize=10)
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
