"""The ``workbench`` command line: run, validate, plan, inspect, verify, convert, eval, tui; the other
command groups live beside it, one module each (methods, tools, zoo, analyze, hub, lora, sweep).

Every command calls the same Python functions the API and the TUI use. Errors caused by input are
printed as one paragraph and exit with status 2; listing methods and ``--help`` never import torch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from workbench.cli.analyze import analyze
from workbench.cli.common import escape, handle_errors, load_registry, terminal, warn
from workbench.cli.hub import push
from workbench.cli.lora import lora
from workbench.cli.methods import methods
from workbench.cli.moe import moe
from workbench.cli.sweep import sweep
from workbench.cli.tools import bench, demo, generate
from workbench.cli.zoo import zoo


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="merge-workbench")
def main() -> None:
    """Merge and edit neural-network checkpoints with plugin methods."""


# ----------------------------------------------------------------------------------------------
# validate / plan / run
# ----------------------------------------------------------------------------------------------


def _recipe_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by validate, plan and run: the output folder and overrides of recipe values."""
    options = [
        click.option(
            "--out", "out", type=click.Path(path_type=Path), help="Output folder (overrides output.path)."
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace an existing output folder (only once the new one is complete).",
        ),
        click.option("--dtype", default=None, help="Compute dtype (overrides the recipe's dtype)."),
        click.option(
            "--out-dtype", default=None, help="Storage dtype of float tensors (overrides output.dtype)."
        ),
        click.option(
            "--shard-size", default=None, help="Largest output file, e.g. 2GB (overrides output.shard_size)."
        ),
        click.option(
            "--memory-limit",
            default=None,
            help=(
                "Most memory a whole-model method may hold, e.g. 16GB (overrides memory_limit; default: "
                "what is available)."
            ),
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _plan(
    recipe_path: Path,
    out: Path | None,
    overwrite: bool,
    dtype: str | None,
    out_dtype: str | None,
    shard_size: str | None,
    memory_limit: str | None,
) -> Any:
    from workbench.engine.plan import build_plan
    from workbench.recipe.schema import load_recipe, with_overrides
    from workbench.registry import require_plugins

    registry = load_registry()
    require_plugins(registry)
    recipe = with_overrides(
        load_recipe(recipe_path),
        dtype=dtype,
        out_dtype=out_dtype,
        shard_size=shard_size,
        memory_limit=memory_limit,
    )
    return registry, build_plan(
        recipe,
        registry,
        out=out,
        overwrite=overwrite,
        check_output=out is not None or recipe.output.path is not None,
    )


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_recipe_options
@handle_errors
def validate(
    recipe: Path,
    out: Path | None,
    overwrite: bool,
    dtype: str | None,
    out_dtype: str | None,
    shard_size: str | None,
    memory_limit: str | None,
) -> None:
    """Check a recipe without reading tensor data: files, headers, shapes, parameters."""
    _, plan = _plan(recipe, out, overwrite, dtype, out_dtype, shard_size, memory_limit)
    try:
        warn(plan.warnings)
        terminal().print(
            f"[green]ok[/]: {plan.method.name} over {len(plan.inputs)} input(s), {len(plan.tensors)} tensors,"
            f" {len(plan.files)} output file(s)."
        )
    finally:
        plan.close()


@main.command(name="plan")
@click.argument("recipe", type=click.Path(path_type=Path))
@_recipe_options
@handle_errors
def plan_command(
    recipe: Path,
    out: Path | None,
    overwrite: bool,
    dtype: str | None,
    out_dtype: str | None,
    shard_size: str | None,
    memory_limit: str | None,
) -> None:
    """Print what a recipe will read and write, and its estimated peak memory."""
    from rich.table import Table

    from workbench.checkpoint.remote import is_downloaded

    _, plan = _plan(recipe, out, overwrite, dtype, out_dtype, shard_size, memory_limit)
    console = terminal()
    try:
        warn(plan.warnings)
        console.print(
            f"method: [bold]{plan.method.name}[/]   layers: {plan.layer_count}   compute dtype: {plan.compute_dtype}"
        )
        inputs = Table("input", "reference", "path", "files", "size", box=None, pad_edge=False)
        for model in plan.inputs:
            if is_downloaded(model.reader):
                files = model.reader.files()
                inputs.add_row(
                    model.label,
                    model.ref,
                    str(model.path),
                    str(len(files)),
                    _gb(sum(f.stat().st_size for f in files)),
                )
            else:  # planned from the Hub's headers: nothing is downloaded to plan
                size = sum(model.reader.info(name).nbytes for name in model.reader.tensor_names())
                inputs.add_row(model.label, model.ref, "(on the Hub, not downloaded yet)", "", _gb(size))
        console.print(inputs)
        merged = sum(t.merge for t in plan.tensors)
        console.print(
            f"tensors: {len(plan.tensors)} ({merged} merged, {len(plan.tensors) - merged} copied from "
            f"{plan.reference.label})"
        )
        outputs = Table("output file", "tensors", "size", box=None, pad_edge=False)
        for file in plan.files:
            outputs.add_row(file.name, str(len(file.tensors)), _gb(file.nbytes))
        console.print(outputs)
        if plan.out_dir is None:
            console.print("output: (none: pass --out)")
        else:
            from workbench.checkpoint.output_folder import free_space

            folder, free = free_space(plan.out_dir)
            console.print(
                f"output: {escape(plan.out_dir)} ({_gb(free)} free on the disk holding {escape(folder)})"
            )
        console.print(
            f"reads {_gb(plan.input_bytes)}, writes {_gb(plan.output_bytes)}; estimated peak memory "
            f"{_gb(plan.estimate_peak_bytes())}"
        )
        if plan.prepare_memory is not None:
            console.print(
                f"{plan.method.name} holds about {_gb(plan.prepare_memory.nbytes)} before merging: "
                f"{escape(plan.prepare_memory.what)}"
            )
    finally:
        plan.close()


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_recipe_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--executor", default="local", show_default=True, help="Where shard jobs run (see registered executors)."
)
@click.option(
    "--address", help="The cluster of a remote executor (e.g. ray: host:port); default: start a local one."
)
@click.option(
    "--prefetch",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Work units read ahead of the computation.",
)
@click.option(
    "--stats-json", type=click.Path(path_type=Path), help="Write timings and sizes of the run to this file."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue a stopped run of the same recipe: keep the output files it finished.",
)
@handle_errors
def run(
    recipe: Path,
    out: Path | None,
    overwrite: bool,
    dtype: str | None,
    out_dtype: str | None,
    shard_size: str | None,
    memory_limit: str | None,
    device: str,
    executor: str,
    address: str | None,
    prefetch: int,
    stats_json: Path | None,
    quiet: bool,
    resume: bool,
) -> None:
    """Run a recipe (native or mergekit YAML) headless."""
    from workbench.engine.progress import RichProgress
    from workbench.engine.run import run_plan

    registry, plan = _plan(recipe, out, overwrite, dtype, out_dtype, shard_size, memory_limit)
    try:
        if address and not registry.executor(executor).remote:
            raise click.UsageError(
                f"--address names a cluster, but the '{executor}' executor runs in this process; use --executor ray."
            )
        warn(plan.warnings)
    except BaseException:
        plan.close()  # run_plan closes it from here on
        raise
    result = run_plan(
        plan,
        registry,
        device=device,
        executor=executor,
        prefetch=prefetch,
        on_progress=RichProgress(enabled=False if quiet else None),
        resume=resume,
        executor_options={"address": address} if address else None,
    )
    warn([w for w in result.warnings if w not in plan.warnings])
    if plan.recipe.evaluators:
        _print_results(result.evaluations)
    if stats_json:
        stats = {
            "seconds": result.seconds,
            "bytes_read": result.bytes_read,
            "bytes_written": result.bytes_written,
            "tensors": result.tensors,
            "input_gb_per_s": result.bytes_read / result.seconds / 1e9 if result.seconds else None,
        }
        stats_json.write_text(json.dumps(stats, indent=2) + "\n")
    if not quiet:
        terminal().print(
            f"[green]wrote[/] {escape(result.out_dir)}: {result.tensors} tensors, "
            f"{_gb(result.bytes_written)} in {result.seconds:.2f} s "
            f"({result.bytes_read / max(result.seconds, 1e-9) / 1e9:.2f} GB/s of input)"
        )
    if plan.recipe.output.push is not None:  # only after a complete, evaluated output
        from workbench.cli.hub import push_output

        target = plan.recipe.output.push
        push_output(
            result.out_dir,
            target.repo,
            private=target.private,
            revision=target.revision,
            create_pr=target.create_pr,
        )


@main.command()
@click.argument("recipe", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--exit-when-ready",
    is_flag=True,
    hidden=True,
    help="Run headless and exit once the first screen is up (start-up benchmarks).",
)
@handle_errors
def tui(recipe: Path | None, exit_when_ready: bool) -> None:
    """Compose, inspect, run and publish a merge in the terminal (opens RECIPE if given; a new path is
    where the composed recipe is saved)."""
    from workbench.tui import run_tui

    run_tui(recipe, exit_when_ready=exit_when_ready)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@handle_errors
def verify(folder: Path) -> None:
    """Check a merged folder against its manifest: every file present, sizes and sha256 as written."""
    from workbench.engine.manifest import verify_folder

    problems = verify_folder(folder)
    for problem in problems:
        terminal(stderr=True).print(f"[bold red]bad:[/] {escape(problem)}")
    if problems:
        sys.exit(1)
    terminal().print(f"[green]ok[/]: every file of {escape(folder)} matches its manifest.")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(path_type=Path),
    help="Write the native recipe here (default: print it).",
)
@handle_errors
def convert(recipe: Path, output: Path | None) -> None:
    """Translate a mergekit recipe into the equivalent native recipe."""
    from workbench.recipe.schema import load_recipe

    text = load_recipe(recipe).to_yaml()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        terminal().print(f"wrote {output}")


# ----------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------


def _print_results(results: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table("evaluator", "metric", "value", box=None, pad_edge=False)
    for evaluator, metrics in results.items():
        for metric, value in metrics.items():
            table.add_row(evaluator, metric, f"{value:.4f}" if isinstance(value, float) else repr(value))
    terminal().print(table)


@main.command(name="eval")
@click.argument("model", required=False)
@click.option("-e", "--evaluator", "names", multiple=True, help="Evaluator to run (repeatable).")
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    help="KEY=VALUE option for the evaluators that have KEY (repeatable).",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the scores as JSON.")
@click.option("--list", "list_only", is_flag=True, help="List the registered evaluators.")
@handle_errors
def eval_command(
    model: str | None,
    names: tuple[str, ...],
    options: tuple[str, ...],
    json_out: Path | None,
    list_only: bool,
) -> None:
    """Score MODEL (a folder, a .gguf file, or 'smollm2') with evaluators."""
    from rich.table import Table

    from workbench.evaluation.running import evaluate, evaluator_specs, make_evaluators

    registry = load_registry()
    if list_only:
        table = Table("evaluator", "plugin", "summary", "options", box=None, pad_edge=False)
        for name, entry in sorted(registry.evaluators.items()):
            table.add_row(
                name, entry.plugin.package, entry.obj.summary, ", ".join(entry.obj.Options.model_fields)
            )
        terminal().print(table)
        return
    if model is None or not names:
        raise click.UsageError("give a MODEL and at least one --evaluator (see --list).")
    results = evaluate(model, make_evaluators(evaluator_specs(registry, names, options), registry))
    _print_results(results)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------


@main.command()
@click.argument("path")
@handle_errors
def inspect(path: str) -> None:
    """Describe a checkpoint (or BASE+ADAPTER): architecture, layers, parameters, dtypes, shards."""
    from collections import Counter

    from rich.table import Table

    from workbench import architecture

    registry = load_registry()
    console = terminal()
    from workbench.checkpoint.resolve import open_reference

    with open_reference(registry, path)[1] as reader:
        names = reader.tensor_names()
        infos = [reader.info(n) for n in names]
        config = reader.config()
        console.print(f"[bold]{path}[/]")
        console.print(f"architecture: {architecture.describe(config)}")
        console.print(f"layers: {architecture.layer_count(names, config)}")
        console.print(f"tensors: {len(names)}   parameters: {sum(i.numel for i in infos):,}")
        dtypes = Counter(i.dtype for i in infos)
        console.print("dtypes: " + ", ".join(f"{d} x{c}" for d, c in dtypes.most_common()))
        kinds = Counter(architecture.place(n).module_kind for n in names)
        console.print("modules: " + ", ".join(f"{k} x{c}" for k, c in kinds.most_common()))
        table = Table("file", "tensors", "size", box=None, pad_edge=False)
        per_file = Counter(i.file for i in infos)
        for file in reader.files():
            table.add_row(file.name, str(per_file[file]), _gb(file.stat().st_size))
        console.print(table)


for command in (methods, generate, demo, bench, zoo, analyze, push, lora, sweep, moe):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main()
