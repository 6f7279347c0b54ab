"""MoLA proper: LoRA experts and routers trained together on a frozen base, with a layer-wise
allocation of experts (Gao et al. 2024).

Every targeted linear layer of layer l gets E_l experts (A kaiming-uniform with a = √5, B = 0, so
training starts exactly at the base; scale alpha / r) and a kaiming-uniform router; all of them
train with AdamW on the language-model loss of the data, plus optionally the Switch-style
load-balancing loss L_aux = Σ_modules E · Σ_e f_e P_e (f_e: share of the top-k assignments that go
to expert e, P_e: its mean router probability), weighted by ``aux_loss`` (MoLA: 0.001 when
enabled, off by default). The result is the folder ``workbench.modeling.mola`` runs: the base's
files plus ``mola/``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import RecipeError

if TYPE_CHECKING:
    import torch

    from workbench.modeling.mola import ExpertSet

#: MoLA's default targets: every projection of a Llama layer.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MolaTraining:
    out_dir: Path
    experts_per_layer: list[int]
    parameters: int  # trainable: every expert's A and B and every router
    losses: list[float]


def load_balancing_loss(probs: "torch.Tensor", chosen: "torch.Tensor") -> "torch.Tensor":
    """E · Σ_e f_e P_e over tokens: ``probs`` [tokens, E] router probabilities, ``chosen`` [tokens, E]
    1 where the expert is in the token's top-k. 1 when routing is perfectly uniform."""
    experts = probs.shape[-1]
    share = chosen.float().mean(dim=0) / chosen.float().sum(dim=-1).mean()  # f_e, sums to 1
    return experts * (share * probs.mean(dim=0)).sum()


def new_experts(
    model: "torch.nn.Module",
    counts: Sequence[int],
    rank: int,
    alpha: float,
    top_k: int,
    targets: Sequence[str],
    seed: int,
) -> dict[str, "ExpertSet"]:
    """Fresh experts for every targeted linear layer: A and router kaiming-uniform, B zero."""
    import torch

    from workbench import architecture
    from workbench.modeling.mola import ExpertSet

    generator = torch.Generator().manual_seed(seed)
    experts = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        layer = architecture.place(f"{name}.weight").layer_index
        if layer is None:
            continue
        count = counts[layer]
        out, inp = module.weight.shape
        a, router = torch.empty(count, rank, inp), torch.empty(count, inp)
        for e in range(count):
            torch.nn.init.kaiming_uniform_(a[e], a=math.sqrt(5), generator=generator)
        torch.nn.init.kaiming_uniform_(router, a=math.sqrt(5), generator=generator)
        experts[name] = ExpertSet(
            a, torch.zeros(count, out, rank), torch.full((count,), alpha / rank), router, min(top_k, count)
        )
    if not experts:
        raise RecipeError(f"no linear layer named {', '.join(targets)} inside the model's layers.")
    return experts


def train_mola(
    base: Path,
    out_dir: Path,
    batches: Iterator[dict[str, "torch.Tensor"]],
    allocation: str | list[int],
    *,
    steps: int,
    lr: float = 3e-4,
    rank: int = 8,
    alpha: float = 16,
    top_k: int = 2,
    targets: Sequence[str] = TARGET_MODULES,
    aux_loss: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> MolaTraining:
    """Train experts and routers on ``batches`` (input_ids, attention_mask, labels) and publish the
    runnable folder at ``out_dir`` (whole or not at all)."""
    import torch
    from transformers import AutoModelForCausalLM

    from workbench import architecture
    from workbench.checkpoint.output_folder import building
    from workbench.modeling.allocation import per_layer
    from workbench.modeling.mola import save_experts, wrap
    from workbench.modeling.training import train

    if out_dir.exists() and not overwrite:
        raise RecipeError(f"{out_dir} exists; choose another folder or pass --overwrite.")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    layers = architecture.layer_count([name for name, _ in model.named_parameters()], model.config.to_dict())
    counts = per_layer(allocation, layers)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = wrap(model, new_experts(model, counts, rank, alpha, top_k, targets, seed))
    trainable = [p for layer in wrapped.values() for p in (layer.lora_A, layer.lora_B, layer.router)]
    parameters = sum(int(p.numel()) for p in trainable)
    if aux_loss > 0:
        batches = _with_balance(model, wrapped, batches, aux_loss)
    losses = train(
        model, batches, steps, lr, seed=seed, parameters=trainable, weight_decay=0.0, log=log, label="mola"
    )
    with building(out_dir, replace=overwrite) as partial:
        for source in Path(base).iterdir():
            if source.is_file() and not source.name.startswith("."):
                shutil.copy2(source, partial / source.name)
        config = {
            "source": "mola_train",
            "base": str(Path(base).resolve()),
            "allocation": {"requested": allocation, "per_layer": counts},
            "rank": rank,
            "alpha": alpha,
            "steps": steps,
            "lr": lr,
            "aux_loss": aux_loss,
            "seed": seed,
            "parameters": parameters,
        }
        save_experts(partial, {name: layer.experts() for name, layer in wrapped.items()}, config)
    return MolaTraining(out_dir, counts, parameters, losses)


def _with_balance(
    model: "torch.nn.Module", wrapped: dict, batches: Iterator[dict], weight: float
) -> Iterator[dict]:
    """Batches whose loss gets ``weight`` · L_aux added (through a forward hook on the model)."""

    def add_aux(module: torch.nn.Module, args: tuple, output: object) -> object:
        total = sum(
            load_balancing_loss(
                layer.last_probs.reshape(-1, layer.last_probs.shape[-1]),
                layer.last_gates.reshape(-1, layer.last_gates.shape[-1]) > 0,
            )
            for layer in wrapped.values()
        )
        output.loss = output.loss + weight * total  # type: ignore[attr-defined]
        return output

    model.register_forward_hook(add_aux)
    yield from batches
