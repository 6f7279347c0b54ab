"""``workbench generate``, ``demo`` and ``bench``: generated models, the demo of every recipe, and
the benchmarks."""

from __future__ import annotations

from pathlib import Path

import click

from workbench.checkpoint.synthetic import SIZES as SIZE_NAMES
from workbench.cli.common import handle_errors, terminal


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(list(SIZE_NAMES)), default="tiny", show_default=True)
@click.option("--fine-tunes", default=2, show_default=True, type=click.IntRange(0, 16))
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--seed", default=0, show_default=True)
@handle_errors
def generate(directory: Path, size: str, fine_tunes: int, dtype: str, seed: int) -> None:
    """Generate a Llama-shaped base model and fine-tunes of it (DIRECTORY/base, ft1, ...)."""
    from workbench.checkpoint.synthetic import write_family

    for path in write_family(directory, size, fine_tunes, dtype=dtype, seed=seed):
        terminal().print(f"wrote {path}")


@click.command()
@click.option(
    "--recipes",
    type=click.Path(path_type=Path),
    default=Path("recipes"),
    show_default=True,
    help="Folder of recipes to run.",
)
@handle_errors
def demo(recipes: Path) -> None:
    """Generate tiny models in ./demo/models and run every recipe in RECIPES on them (no downloads)."""
    from workbench.tools.demo import run_demo

    run_demo(recipes, terminal())


@click.command()
@click.option("--size", type=click.Choice(list(SIZE_NAMES)), default="250m", show_default=True)
@click.option(
    "--methods", "method_names", default="linear,task_arithmetic,ties,dare_ties,slerp", show_default=True
)
@click.option("--fine-tunes", default=3, show_default=True)
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=Path("bench-models"),
    show_default=True,
    help="Generated models are kept here between runs.",
)
@click.option("--repeat", default=1, show_default=True, help="Runs per method (the fastest is reported).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the results as JSON.")
@click.option(
    "--mergekit",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="A mergekit-yaml executable: run the same YAML through it and report the speed-up.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Rerun each merge with WORKBENCH_KERNELS=reference and report the distance in bf16 steps.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda, for the workbench's runs.")
@click.option(
    "--ops",
    "ops_only",
    is_flag=True,
    help="Benchmark each kernel against its torch reference instead of whole merges.",
)
@handle_errors
def bench(
    size: str,
    method_names: str,
    fine_tunes: int,
    directory: Path,
    repeat: int,
    json_out: Path | None,
    mergekit: Path | None,
    check: bool,
    device: str,
    ops_only: bool,
) -> None:
    """Benchmark end-to-end merges (wall time, start-up, merge throughput, peak RSS) or, with --ops, each kernel."""
    if ops_only:
        from workbench.tools.bench_ops import run_op_bench

        run_op_bench(device, repeat, json_out, terminal())
        return
    from workbench.tools.bench import run_bench

    methods = [m.strip() for m in method_names.split(",") if m.strip()]
    run_bench(
        size,
        methods,
        fine_tunes,
        directory,
        repeat,
        json_out,
        terminal(),
        mergekit=mergekit,
        check=check,
        device=device,
    )
