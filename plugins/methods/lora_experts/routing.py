"""Routers of ``lora_experts``: initialised from task prompts, trained with the experts frozen.

From prompts: run the base model on each adapter's task prompts and record, at every targeted
linear layer, the mean input x over the prompts' tokens (padding left out). Expert e's router row
points from the mean over all tasks to the mean over its adapters' tasks,
W_r[e] = scale · (μ_e − μ) / (‖μ_e − μ‖ · σ), σ the inputs' standard deviation per dimension, so a
token of task e leans to expert e by about ``scale`` logits per standard deviation. Trained: the
same start, then ``steps`` AdamW steps on the language-model loss of all prompts (round-robin over
the adapters), updating the routers only. ``mean_gates`` gives each expert's mean routing weight
over the prompts (used by ``collapse``). One loaded base model serves all three.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import cycle
from pathlib import Path

import torch

from workbench.errors import RecipeError
from workbench.modeling.mola import ExpertSet, MoLALinear

Batches = list[list[dict[str, torch.Tensor]]]  # per adapter, its batches


def by_module(experts: dict[str, ExpertSet]) -> dict[str, ExpertSet]:
    """Keyed by module path (the runtime's keys) instead of weight name."""
    return {name.removesuffix(".weight"): found for name, found in experts.items()}


def load_base(base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def route_from_prompts(
    model: torch.nn.Module,
    experts: dict[str, ExpertSet],
    groups: dict[int, list[list[int]]],
    batches: Batches,
    scale: float,
) -> None:
    """Set every router from the prompts' mean inputs (in place), reading the inputs of ``model``'s
    (not yet wrapped) targeted linear layers."""
    from workbench import architecture

    sums: dict[tuple[str, int], torch.Tensor] = {}
    squares: dict[tuple[str, int], float] = {}
    counts: dict[int, int] = {}
    current: list[int] = [0]
    mask: list[torch.Tensor] = []

    def record(name: str, x: torch.Tensor) -> None:
        tokens = x.detach()[mask[0]].double()
        key = (name, current[0])
        sums[key] = sums.get(key, 0) + tokens.sum(dim=0)  # type: ignore[assignment,operator]
        squares[key] = squares.get(key, 0.0) + float(tokens.square().sum())

    hooks = [
        model.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(
            lambda m, i, n=name: record(n, i[0])
        )
        for name in experts
    ]
    try:
        with torch.no_grad():
            for adapter, adapter_batches in enumerate(batches):
                current[0] = adapter
                for batch in adapter_batches:
                    mask[:] = [batch["attention_mask"].bool()]
                    counts[adapter] = counts.get(adapter, 0) + int(mask[0].sum())
                    model(**_inputs(batch))
    finally:
        for hook in hooks:
            hook.remove()
    total = sum(counts.values())
    for name, found in experts.items():
        adapters = range(len(batches))
        mean = sum(sums[(name, i)] for i in adapters) / total
        variance = (
            sum(squares[(name, i)] for i in adapters) / total - float(mean.square().sum())
        ) / mean.shape[0]
        sigma = max(variance, 1e-12) ** 0.5
        layer = architecture.place(name).layer_index
        for e, group in enumerate(groups[layer]):  # type: ignore[index]
            centre = sum(sums[(name, i)] for i in group) / sum(counts[i] for i in group) - mean
            length = float(centre.norm())
            found.router[e] = (scale * centre / (length * sigma)).float() if length > 0 else 0.0


def mean_gates(
    model: torch.nn.Module, wrapped: dict[str, MoLALinear], batches: Batches
) -> dict[str, torch.Tensor]:
    """Each expert's routing weight averaged over the prompts' tokens, per module (weight name)."""
    totals = {
        f"{module}.weight": torch.zeros(layer.lora_A.shape[0], dtype=torch.float64)
        for module, layer in wrapped.items()
    }
    count = 0
    with torch.no_grad():
        for batch in (b for adapter_batches in batches for b in adapter_batches):
            model(**_inputs(batch))
            keep = batch["attention_mask"].bool()
            count += int(keep.sum())
            for module, layer in wrapped.items():
                assert layer.last_gates is not None
                totals[f"{module}.weight"] += layer.last_gates[keep].double().sum(dim=0)
    return {name: (total / count).float() for name, total in totals.items()}


def _training_batches(batches: Batches) -> Iterator[dict[str, torch.Tensor]]:
    for adapter_batches in zip(*(cycle(b) for b in batches)):
        yield from adapter_batches


def train_routers(
    model: torch.nn.Module,
    wrapped: dict[str, MoLALinear],
    experts: dict[str, ExpertSet],
    batches: Batches,
    steps: int,
    lr: float,
    seed: int,
) -> None:
    """Train the routers of the wrapped ``model`` (experts and base frozen) on the prompts'
    language-model loss; the trained routers are written back into ``experts``."""
    from workbench.modeling.training import train

    if any("labels" not in batch for adapter_batches in batches for batch in adapter_batches):
        raise RecipeError(
            "lora_experts: router 'trained' needs data with labels (an evaluator's batches or a text file)."
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    routers = [layer.router.requires_grad_(True) for layer in wrapped.values()]
    train(model, _training_batches(batches), steps, lr, seed=seed, parameters=routers, weight_decay=0.0)
    for module, layer in wrapped.items():
        experts[f"{module}.weight"].router = layer.router.detach().clone()
