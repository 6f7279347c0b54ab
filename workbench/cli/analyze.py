"""``workbench analyze``: where fine-tunes changed a base, per layer and module, and the
coefficients a data-driven merge learned."""

from __future__ import annotations

from pathlib import Path

import click

from workbench.cli.common import escape, handle_errors, load_registry, terminal


@click.command()
@click.argument("base")
@click.argument("models", nargs=-1)
@click.option(
    "--stat",
    type=click.Choice(["relative", "mean_abs", "top_share"]),
    default="relative",
    show_default=True,
    help="Statistic shown in the terminal heatmap and the PNG.",
)
@click.option(
    "--top-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.01,
    show_default=True,
    help="Fraction of most-changed entries for top_share.",
)
@click.option("--png", "png_out", type=click.Path(path_type=Path), help="Write the heatmaps as a PNG image.")
@click.option(
    "--csv",
    "csv_out",
    type=click.Path(path_type=Path),
    help="Write every cell (model, layer, module) as CSV.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    help="Write everything, with per-layer totals and non-layer tensors, as JSON.",
)
@click.option(
    "--suggest-swap",
    "swap",
    nargs=2,
    metavar="TASK LANG",
    help="Suggest a layer_swap recipe; each is a MODEL as written or its position (1 = first MODEL).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bar and no heatmaps (files and the suggestion are still written).",
)
@handle_errors
def analyze(
    base: str,
    models: tuple[str, ...],
    stat: str,
    top_fraction: float,
    png_out: Path | None,
    csv_out: Path | None,
    json_out: Path | None,
    swap: tuple[str, str] | None,
    quiet: bool,
) -> None:
    """Chart where each MODEL changed from BASE, per layer and module (guides layer swapping).

    With BASE alone, BASE is a merge output with learned coefficients (atlas), and the charts show
    each task vector's λ per layer and module.
    """
    from workbench.analysis import render

    if not models:
        if swap:
            raise click.UsageError("--suggest-swap compares models: give BASE and the MODELs.")
        _analyze_coefficients(Path(base), png_out, csv_out, json_out, quiet)
        return
    from workbench.analysis.deltas import analyze as analyze_models, model_position, suggest_swap
    from workbench.engine.progress import RichProgress

    render.check_output_paths([p for p in (png_out, csv_out, json_out) if p is not None])
    for key in swap or ():
        model_position(models, key)
    progress = RichProgress(enabled=False if quiet else None, label="analysing (3 passes)")
    analysis = analyze_models(
        base, models, top_fraction=top_fraction, registry=load_registry(), on_progress=progress
    )
    suggestion = suggest_swap(analysis, *swap) if swap else None
    console = terminal()
    if not quiet:
        for part in render.render_analysis(analysis, stat):
            console.print(part)
    if png_out is not None:
        render.write_png(analysis, stat, png_out)
    if csv_out is not None:
        render.write_csv(analysis, csv_out)
    if json_out is not None:
        render.write_json(analysis, json_out, suggestion)
    for path in (png_out, csv_out, json_out):
        if path is not None:
            console.print(f"wrote {escape(path)}")
    if suggestion is not None:
        for part in render.render_suggestion(suggestion):
            console.print(part)


def _analyze_coefficients(
    folder: Path, png_out: Path | None, csv_out: Path | None, json_out: Path | None, quiet: bool
) -> None:
    import json

    from workbench.analysis import render
    from workbench.analysis.coefficients import render_coefficients, write_coefficients_png
    from workbench.checkpoint.coefficients import find_table, load_table

    if find_table(folder) is None:
        raise click.UsageError(
            f"{folder} holds no learned coefficients; to chart changes, give BASE and one or more MODELs."
        )
    render.check_output_paths([p for p in (png_out, csv_out, json_out) if p is not None])
    table = load_table(folder)
    console = terminal()
    if not quiet:
        for part in render_coefficients(table):
            console.print(part)
    if png_out is not None:
        write_coefficients_png(table, png_out)
    if csv_out is not None:
        render.write_text(csv_out, table.csv_text())
    if json_out is not None:
        render.write_text(json_out, json.dumps(table.to_dict(), indent=1) + "\n")
    for path in (png_out, csv_out, json_out):
        if path is not None:
            console.print(f"wrote {escape(path)}")
