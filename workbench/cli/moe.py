"""``workbench moe``: a mixture of experts from dense fine-tunes of one base (mergekit-moe configs)."""

from __future__ import annotations

from pathlib import Path

import click

from workbench.cli.common import escape, handle_errors, load_registry, terminal, warn


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder of the MoE model."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete)."
)
@click.option(
    "--device", default="cpu", show_default=True, help="Where the base runs the prompts: cpu, cuda or auto."
)
@click.option(
    "--router-dtype",
    type=click.Choice(["bfloat16", "float32", "float16"]),
    default="bfloat16",
    show_default=True,
    help="dtype the base runs in for hidden-state gates (bfloat16 as in mergekit).",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of random gates and of experts' noise_scale."
)
@click.option(
    "--expert-layout",
    type=click.Choice(["fused", "per-expert"]),
    default="fused",
    show_default=True,
    help=(
        "fused: mlp.experts.gate_up_proj/down_proj, as transformers 5 and mergekit 0.1.5 hold them; "
        "per-expert: one tensor per expert (block_sparse_moe.experts.N.w1 ...), for transformers 4, vLLM, "
        "llama.cpp."
    ),
)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output file, e.g. 2GB.")
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_all_same",
    is_flag=True,
    help="Build even when every expert is the same model (for training the MoE afterwards).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@handle_errors
def moe(
    config: Path,
    out: Path,
    overwrite: bool,
    device: str,
    router_dtype: str,
    seed: int,
    expert_layout: str,
    shard_size: str,
    allow_all_same: bool,
    quiet: bool,
) -> None:
    """Build a Mixtral (or Qwen2-MoE / Qwen3-MoE) model from a mergekit-moe CONFIG: attention, norms,
    embeddings and LM head from base_model, one expert per entry of experts (its MLP), routers from the
    prompts (gate_mode hidden, cheap_embed or random)."""
    from workbench.engine.progress import RichProgress
    from workbench.errors import RecipeError
    from workbench.moe.build import build_moe
    from workbench.moe.config import load_config
    from workbench.recipe.schema import parse_size

    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise RecipeError(f"--shard-size: {exc}.") from None
    loaded = load_config(config)
    registry = load_registry()
    result = build_moe(
        loaded,
        registry,
        out,
        overwrite=overwrite,
        device=device,
        router_dtype=router_dtype,
        seed=seed,
        per_expert=expert_layout == "per-expert",
        shard_size=shard_bytes,
        allow_all_same=allow_all_same,
        on_progress=RichProgress(enabled=False if quiet else None, label="writing"),
        warn=lambda message: warn([message]),
    )
    if not quiet:
        size = result.bytes_written
        shown = f"{size / 1e9:.3f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
        terminal().print(
            f"[green]wrote[/] {escape(result.out_dir)}: {result.architecture} with {result.experts} experts, "
            f"{result.tensors} tensors, {shown} in {result.seconds:.2f} s"
        )
