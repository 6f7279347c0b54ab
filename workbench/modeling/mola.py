"""Run a layer-wise mixture of LoRA experts (MoLA, Gao et al. 2024) on a transformers model.

Every targeted linear layer keeps its frozen base weight W₀ and gets E experts (A_e: r × in,
B_e: out × r, scale s_e) and its own router W_r (E × in, no bias). Per token x:

    p = softmax(W_r x);  S = top-k(p);  g_e = p_e / Σ_{j∈S} p_j for e ∈ S, 0 otherwise
    y = W₀ x + Σ_e g_e · s_e · B_e A_e x

A folder that runs holds the base weights (``config.json``, safetensors) and ``mola/``:
``mola_config.json`` (format, each module's expert count and top-k, the allocation and where the
experts came from) and ``experts.safetensors`` (per module ``<module>.lora_A`` [E, r, in],
``.lora_B`` [E, out, r], ``.scale`` [E], ``.router`` [E, in]; experts of smaller rank are padded
with zeros, which adds nothing). ``load_mola(folder)`` returns the model ready to generate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import CheckpointError

FOLDER = "mola"
CONFIG_NAME = "mola_config.json"
WEIGHTS_NAME = "experts.safetensors"


@dataclass
class ExpertSet:
    """One module's experts and router (the tensors of ``experts.safetensors``)."""

    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    scale: torch.Tensor  # [E]
    router: torch.Tensor  # [E, in]
    top_k: int

    @property
    def count(self) -> int:
        return int(self.a.shape[0])

    def delta(self, expert: int) -> torch.Tensor:
        """s_e · B_e A_e (float32), the change one expert makes to the weight."""
        return self.scale[expert].float() * (self.b[expert].float() @ self.a[expert].float())


def top_k_renormalised(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k probabilities of each row kept and renormalised to sum 1, the rest 0."""
    top, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return torch.zeros_like(probs).scatter(-1, index, top / top.sum(dim=-1, keepdim=True))


def gates(router: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Routing weights [..., E]: softmax over the experts, the top-k kept and renormalised to sum 1."""
    return top_k_renormalised(torch.softmax(x @ router.T, dim=-1), top_k)


class MoLALinear(torch.nn.Module):
    """A frozen linear layer plus routed LoRA experts. The experts and router are parameters, so
    the same module serves inference and MoLA training."""

    scale: torch.Tensor  # a buffer (register_buffer), which nn.Module's typing does not see

    def __init__(self, base: torch.nn.Linear, experts: ExpertSet) -> None:
        super().__init__()
        self.base = base
        dtype = base.weight.dtype
        self.lora_A = torch.nn.Parameter(experts.a.to(dtype))
        self.lora_B = torch.nn.Parameter(experts.b.to(dtype))
        self.router = torch.nn.Parameter(experts.router.to(dtype))
        self.register_buffer("scale", experts.scale.to(dtype))
        self.top_k = experts.top_k
        # the last forward's router probabilities and gates: for a load-balancing loss and statistics
        self.last_probs: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        self.last_probs = torch.softmax(x @ self.router.T, dim=-1)
        weights = self.last_gates = top_k_renormalised(self.last_probs, self.top_k)
        experts, rank = self.lora_A.shape[0], self.lora_A.shape[1]
        # All experts in two matmuls: h = [A_1; …; A_E] x, each expert's r entries weighted by
        # g_e · s_e, then y += [B_1 … B_E] h (unselected experts have g_e = 0).
        hidden = x @ self.lora_A.reshape(experts * rank, -1).T
        hidden = hidden * (weights * self.scale).repeat_interleave(rank, dim=-1)
        return y + hidden @ self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], experts * rank).T

    def experts(self) -> ExpertSet:
        return ExpertSet(
            self.lora_A.detach(), self.lora_B.detach(), self.scale.detach(), self.router.detach(), self.top_k
        )


def stack(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], router: torch.Tensor, top_k: int
) -> ExpertSet:
    """An ExpertSet from per-expert (A, B, scale), zero-padding smaller ranks to the largest."""
    rank = max(a.shape[0] for a, _, _ in factors)
    out, inp = factors[0][1].shape[0], factors[0][0].shape[1]
    a_all, b_all = torch.zeros(len(factors), rank, inp), torch.zeros(len(factors), out, rank)
    for e, (a, b, _) in enumerate(factors):
        a_all[e, : a.shape[0]], b_all[e, :, : b.shape[1]] = a.float(), b.float()
    return ExpertSet(
        a_all, b_all, torch.tensor([s for _, _, s in factors], dtype=torch.float32), router.float(), top_k
    )


def save_experts(folder: Path, experts: dict[str, ExpertSet], config: dict[str, Any]) -> Path:
    """Write ``folder/mola/`` (config + tensors); ``config`` gets the module table added."""
    from safetensors.torch import save_file

    target = folder / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, found in experts.items():
        tensors |= {
            f"{module}.lora_A": found.a,
            f"{module}.lora_B": found.b,
            f"{module}.scale": found.scale,
            f"{module}.router": found.router,
        }
    save_file(
        {k: v.detach().float().contiguous() for k, v in tensors.items()},
        str(target / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    modules = {module: {"experts": found.count, "top_k": found.top_k} for module, found in experts.items()}
    (target / CONFIG_NAME).write_text(
        json.dumps({"format": 1, **config, "modules": modules}, indent=2) + "\n"
    )
    return target


def is_mola(folder: Path) -> bool:
    return (Path(folder) / FOLDER / CONFIG_NAME).is_file()


def load_experts(folder: Path) -> tuple[dict[str, ExpertSet], dict[str, Any]]:
    from safetensors.torch import load_file

    config = json.loads((folder / FOLDER / CONFIG_NAME).read_text())
    tensors = load_file(str(folder / FOLDER / WEIGHTS_NAME))
    experts = {
        module: ExpertSet(
            tensors[f"{module}.lora_A"],
            tensors[f"{module}.lora_B"],
            tensors[f"{module}.scale"],
            tensors[f"{module}.router"],
            int(entry["top_k"]),
        )
        for module, entry in config["modules"].items()
    }
    return experts, config


def wrap(model: torch.nn.Module, experts: dict[str, ExpertSet]) -> dict[str, MoLALinear]:
    """Replace each targeted linear layer of ``model`` by a MoLALinear; returns them by path."""
    wrapped = {}
    for module, found in experts.items():
        try:
            base = model.get_submodule(module)
        except AttributeError:
            raise CheckpointError(
                f"MoLA target '{module}' is not a module of this {type(model).__name__}."
            ) from None
        if not isinstance(base, torch.nn.Linear):
            raise CheckpointError(f"MoLA target '{module}' is a {type(base).__name__}, not a linear layer.")
        if (found.b.shape[1], found.a.shape[2]) != tuple(base.weight.shape):
            raise CheckpointError(
                f"MoLA target '{module}': experts of shape {(found.b.shape[1], found.a.shape[2])} for a "
                f"{tuple(base.weight.shape)} weight."
            )
        parent, _, child = module.rpartition(".")
        wrapped[module] = MoLALinear(base, found)
        setattr(model.get_submodule(parent), child, wrapped[module])
    return wrapped


def load_mola(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model of a MoLA folder (base weights with its experts and routers), in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    wrap(model, load_experts(folder)[0])
    return model.eval()
