"""``workbench zoo``: tiny models trained here, and the reproduction tables measured on them."""

from __future__ import annotations

from pathlib import Path

import click

from workbench.cli.common import handle_errors, load_registry, terminal


@click.group()
def zoo() -> None:
    """Tiny models trained here (no downloads) and the reproduction tables measured on them."""


@zoo.command(name="build")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--scale",
    type=click.Choice(["tiny", "small"]),
    default="tiny",
    show_default=True,
    help="tiny: under a minute; small: about 10 minutes on 2 cores.",
)
@click.option("--seed", default=0, show_default=True)
@handle_errors
def zoo_build(directory: Path, scale: str, seed: int) -> None:
    """Pretrain a base model on synthetic languages, then fine-tune experts, LoRA adapters and an OT pair."""
    from workbench.zoo.build import build_zoo

    console = terminal()
    build_zoo(directory, scale, seed, log=console.print)
    console.print(f"[green]zoo written to[/] {directory} (manifest: {directory / 'zoo.json'})")


@zoo.command(name="report")
@click.argument("directories", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_file",
    type=click.Path(path_type=Path),
    default=Path("docs/reproductions.md"),
    show_default=True,
)
@click.option("--n", default=512, show_default=True, help="Held-out examples per task and split.")
@click.option("--seed", default=99, show_default=True, help="Evaluation seed.")
@click.option(
    "--sections",
    default=None,
    help=(
        "Comma-separated sections to measure (task_vectors, learned, layer_swap, ot_fusion, lora_experts); "
        "default: all."
    ),
)
@handle_errors
def zoo_report(
    directories: tuple[Path, ...], out_file: Path, n: int, seed: int, sections: str | None
) -> None:
    """Measure the reproduction tables on one or more built zoos (one per seed) and write them as Markdown."""
    from workbench.zoo.reports.report import SECTIONS, write_report

    registry = load_registry()
    chosen = tuple(part.strip() for part in sections.split(",")) if sections else SECTIONS
    command = (
        f"workbench zoo report {' '.join(map(str, directories))} --out {out_file} --n {n} --seed {seed}"
        + (f" --sections {sections}" if sections else "")
    )
    text = write_report(
        list(directories),
        out_file,
        registry,
        n,
        seed,
        command,
        log=terminal(stderr=True).print,
        sections=chosen,
    )
    terminal().print(text)
