"""``workbench lora``: extract a LoRA from a fine-tune, merge LoRAs on their ΔW."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from workbench.cli.common import handle_errors, load_registry, terminal

if TYPE_CHECKING:
    from workbench.lora.extract import LoraReport


@click.group()
def lora() -> None:
    """LoRA adapters (PEFT format): extract one from a fine-tune, merge several. Anywhere a model is
    expected, BASE+ADAPTER (or an adapter folder alone) is the base with the adapter applied."""


def _summary(report: "LoraReport", verb: str) -> None:
    console = terminal()
    errors = [t.relative_error for t in report.tensors]
    ranks = sorted({t.rank for t in report.tensors})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    console.print(
        f"[green]{verb}[/] {report.out_dir}: {len(report.tensors)} tensors, rank {rank},"
        f" relative error mean {sum(errors) / len(errors):.2e}, max {max(errors):.2e}"
    )
    if report.unchanged:
        console.print(f"{len(report.unchanged)} target tensors did not change and are left out.")
    if report.not_captured:
        worst = max(report.not_captured, key=report.not_captured.get)  # type: ignore[arg-type]
        console.print(
            f"[yellow]warning:[/] {len(report.not_captured)} tensors outside the LoRA targets changed and "
            f"are not in the adapter (largest: '{worst}', max |ΔW| {report.not_captured[worst]:.3g}); see "
            "lora_report.json."
        )


@lora.command(name="extract")
@click.argument("base")
@click.argument("finetune")
@click.option(
    "--rank",
    "-r",
    type=click.IntRange(min=1),
    required=True,
    help="LoRA rank (clamped to each matrix's smaller side).",
)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Adapter folder to write."
)
@click.option(
    "--targets",
    default=None,
    help="Comma-separated module names (e.g. q_proj,v_proj); default: every 2-D weight in the layers.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete)."
)
@handle_errors
def lora_extract(
    base: str, finetune: str, rank: int, out_dir: Path, targets: str | None, overwrite: bool
) -> None:
    """The rank-R LoRA closest to FINETUNE − BASE (truncated SVD of each weight's difference)."""
    from workbench.lora.extract import extract_lora

    chosen = {t.strip() for t in targets.split(",") if t.strip()} if targets else None
    _summary(extract_lora(base, finetune, out_dir, rank, load_registry(), chosen, overwrite), "extracted")


@lora.command(name="merge")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Adapter folder to write."
)
@click.option(
    "--method",
    "-m",
    default="task_arithmetic",
    show_default=True,
    help="Any merge method (see `workbench methods`).",
)
@click.option(
    "-o", "--option", "options", multiple=True, help="KEY=VALUE parameter of the method (repeatable)."
)
@click.option(
    "--weight",
    "-w",
    "weights",
    multiple=True,
    type=float,
    help="Weight of each adapter, in order (repeat once per adapter).",
)
@click.option(
    "--rank",
    "-r",
    type=click.IntRange(min=1),
    default=None,
    help="Rank of the result; default: per tensor, the sum of the adapters' ranks (exact for weighted sums).",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete)."
)
@handle_errors
def lora_merge(
    adapters: tuple[Path, ...],
    out_dir: Path,
    method: str,
    options: tuple[str, ...],
    weights: tuple[float, ...],
    rank: int | None,
    overwrite: bool,
) -> None:
    """Merge ADAPTERS on their ΔW with a merge method, then factor the result into one adapter."""
    from workbench.evaluation.running import parse_options
    from workbench.lora.merge import merge_loras

    report = merge_loras(
        list(adapters),
        out_dir,
        load_registry(),
        method,
        parse_options(options),
        list(weights) or None,
        rank,
        overwrite,
    )
    _summary(report, "merged")


@lora.command(name="mola-train")
@click.argument("base")
@click.option(
    "-e",
    "--evaluator",
    "names",
    multiple=True,
    required=True,
    help="Data source: an evaluator whose data batches are trained on (repeatable; round-robin).",
)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    help="KEY=VALUE option for the evaluators that have KEY (repeatable).",
)
@click.option(
    "--allocation",
    "-a",
    required=True,
    help="Experts per layer: a pattern over equal groups of layers (2-4-6-8) or comma-separated counts, one per layer.",
)
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True, help="AdamW learning rate (MoLA: 3e-4).")
@click.option("--rank", "-r", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--alpha", type=float, default=16, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--aux-loss",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of the load-balancing loss (MoLA: 0.001 when enabled).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete)."
)
@handle_errors
def lora_mola_train(
    base: str,
    names: tuple[str, ...],
    options: tuple[str, ...],
    allocation: str,
    steps: int,
    lr: float,
    rank: int,
    alpha: float,
    top_k: int,
    aux_loss: float,
    seed: int,
    out_dir: Path,
    overwrite: bool,
) -> None:
    """Train LoRA experts and routers together on a frozen BASE (MoLA) with a layer-wise allocation."""
    from itertools import chain, cycle

    from workbench.evaluation.running import make_evaluators, parse_options
    from workbench.lora.mola_train import train_mola
    from workbench.recipe.schema import EvaluatorSpec

    registry = load_registry()
    given = parse_options(options)
    specs = [
        EvaluatorSpec(
            name=n,
            options={k: v for k, v in given.items() if k in registry.evaluator(n).Options.model_fields},
        )
        for n in names
    ]
    evaluators = make_evaluators(specs, registry)
    per_source = -(-steps // len(evaluators))
    streams = [list(e.batches(per_source, seed)) for e in evaluators]
    batches = chain.from_iterable(cycle(zip(*streams)))
    counts: str | list[int] = [int(c) for c in allocation.split(",")] if "," in allocation else allocation
    console = terminal()
    result = train_mola(
        Path(base),
        out_dir,
        batches,
        counts,
        steps=steps,
        lr=lr,
        rank=rank,
        alpha=alpha,
        top_k=top_k,
        aux_loss=aux_loss,
        seed=seed,
        overwrite=overwrite,
        log=console.print,
    )
    console.print(
        f"[green]trained[/] {result.out_dir}: experts per layer {result.experts_per_layer}, "
        f"{result.parameters:,} trainable parameters, final loss "
        f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.3f}"
    )
