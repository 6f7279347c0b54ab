"""LoRA adapters on a frozen zoo model, trained here and written in PEFT's on-disk format.

The folder is written by ``workbench.checkpoint.lora_adapter`` (PEFT's format, without peft):
``PeftModel.from_pretrained`` loads it, and merging is W' = W + (lora_alpha / r) * B @ A.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Every projection of a Llama layer, as MoLA targets them.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_linear_class() -> Any:
    import torch

    class LoRALinear(torch.nn.Module):
        """``base(x) + scale * B(A(x))`` with ``base`` frozen; B starts at zero, so training starts
        exactly at the base model."""

        def __init__(self, base: torch.nn.Linear, r: int, alpha: float) -> None:
            super().__init__()
            self.base = base
            self.scale = alpha / r
            self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features))
            self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r))
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    return LoRALinear


def attach(
    model: "torch.nn.Module", r: int, alpha: float, targets: Sequence[str] = TARGET_MODULES
) -> dict[str, Any]:
    """Freeze ``model`` and wrap every targeted linear layer with a trainable LoRA; returns the
    wrappers by module path (``model.layers.0.self_attn.q_proj``)."""
    import torch

    lora_linear = _lora_linear_class()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped: dict[str, Any] = {}
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            parent_name, _, child = name.rpartition(".")
            wrapper = lora_linear(module, r, alpha)
            setattr(model.get_submodule(parent_name), child, wrapper)
            wrapped[name] = wrapper
    return wrapped


def detach(model: "torch.nn.Module", wrapped: dict[str, Any]) -> None:
    """Put the original linear layers back (the adapters' tensors stay in ``wrapped``)."""
    for name, wrapper in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper.base)


def save_adapter(wrapped: dict[str, Any], directory: Path, *, r: int, alpha: float, base_model: str) -> Path:
    """Write the adapters as a PEFT LoRA folder."""
    from workbench.checkpoint.lora_adapter import write_adapter

    factors = {
        f"{name}.weight": (wrapper.lora_A.detach(), wrapper.lora_B.detach())
        for name, wrapper in wrapped.items()
    }
    return write_adapter(directory, factors, scale=alpha / r, base_model=base_model)


def merge_adapter(model: "torch.nn.Module", directory: Path) -> "torch.nn.Module":
    """Add a PEFT LoRA folder's ``(alpha / r) * B @ A`` to ``model``'s weights in place."""
    from workbench.checkpoint.lora_adapter import LoraAdapter, add_to_module

    return add_to_module(model, LoraAdapter(directory))
