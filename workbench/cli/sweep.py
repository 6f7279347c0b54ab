"""``workbench sweep``: merge and score candidate recipes, print a table sorted by score."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from workbench.cli.common import escape, handle_errors, load_registry, terminal


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="PATH=V1,V2,...",
    help="Values for a dotted recipe path, e.g. parameters.lambda=0.3,0.5, or a range 0.1:1.5 for cma (repeatable).",
)
@click.option(
    "-e",
    "--evaluator",
    "names",
    multiple=True,
    help="Evaluator scoring each candidate (repeatable; see `workbench eval --list`).",
)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    help="KEY=VALUE option for the evaluators that have KEY (repeatable).",
)
@click.option(
    "--metric",
    default=None,
    help="Metric to rank by, EVALUATOR.METRIC or METRIC (default: the first numeric one).",
)
@click.option(
    "--search",
    type=click.Choice(["grid", "random", "cma"]),
    default="grid",
    show_default=True,
    help="How candidates are chosen.",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=None,
    help="Most candidates (random: how many to sample; cma: how many to evaluate).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random and cma searches.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Candidates run at once, one process each.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where candidates run: here (--jobs processes) or as Ray tasks.",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to run on (HOST:PORT or auto; default: a local instance). Needs --executor ray.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Sweep folder: results, best.yaml, candidates/ (rerun to resume).",
)
@click.option(
    "--keep-outputs", is_flag=True, help="Keep every candidate's merged model (default: only the best one's)."
)
@handle_errors
def sweep(
    recipe: Path,
    sets: tuple[str, ...],
    names: tuple[str, ...],
    options: tuple[str, ...],
    metric: str | None,
    search: str,
    budget: int | None,
    seed: int,
    jobs: int,
    executor: str,
    address: str | None,
    out: Path,
    keep_outputs: bool,
) -> None:
    """Merge RECIPE once per combination of --set values, score each with the evaluators, and
    write results.json/results.csv and best.yaml to --out. Rerunning resumes."""
    from rich.table import Table

    from workbench.evaluation.running import evaluator_specs
    from workbench.recipe.schema import load_recipe
    from workbench.sweep.search import CandidateResult, parse_setting, run_sweep

    registry = load_registry()
    if not sets:
        raise click.UsageError("give at least one --set PATH=V1,V2,...")
    if not names:
        raise click.UsageError("give at least one --evaluator (see `workbench eval --list`).")
    base = load_recipe(recipe)
    settings = [parse_setting(text) for text in sets]
    specs = evaluator_specs(registry, names, options)
    err = terminal(stderr=True)

    def progress(row: CandidateResult, done: int, total: int) -> None:
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in row.settings.items())
        outcome = f"score {row.score:.6g}" if row.status == "ok" else f"[red]failed[/]: {escape(row.error)}"
        err.print(f"[{done}/{total}] {row.id} {escape(shown)}: {outcome}", markup=True)

    result = run_sweep(
        base,
        settings,
        specs,
        out,
        registry,
        search=search,
        budget=budget,
        seed=seed,
        jobs=jobs,
        metric=metric,
        keep_outputs=keep_outputs,
        executor=executor,
        address=address,
        on_result=progress,
    )
    labels = [s.label for s in settings]
    direction = "lower is better" if result.lower_is_better else "higher is better"
    table = Table(
        "#", "id", *labels, f"{result.metric or 'score'} ({direction})", "status", box=None, pad_edge=False
    )
    for rank, row in enumerate(result.rows, 1):
        score = f"{row.score:.6g}" if row.score is not None else "-"
        status = "ok" if row.status == "ok" else f"failed: {row.error}"
        table.add_row(
            str(rank),
            row.id,
            *(escape(json.dumps(row.settings.get(label))) for label in labels),
            score,
            escape(status),
        )
    console = terminal()
    console.print(table)
    if result.best_recipe is not None:
        console.print(f"best: {result.best.id if result.best else ''} -> {escape(result.best_recipe)}")
    else:
        console.print("[red]no candidate succeeded[/]; see the errors above.", markup=True)
        sys.exit(1)
