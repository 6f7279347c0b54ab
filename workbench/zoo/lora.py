"""LoRA adapters on a frozen zoo model, trained here and written in PEFT's on-disk format.

peft is not a dependency, so the format is written directly: ``adapter_config.json`` (``peft_type``
LORA, ``r``, ``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` of shape [r, in] and ``...lora_B.weight`` of shape
[out, r]. ``PeftModel.from_pretrained`` loads such a folder, and merging is
W' = W + (lora_alpha / r) * B @ A.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

#: Every projection of a Llama layer, as MoLA targets them.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


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


def attach(model: "torch.nn.Module", r: int, alpha: float, targets: Sequence[str] = TARGET_MODULES) -> dict[str, Any]:
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


def save_adapter(wrapped: dict[str, Any], directory: Path, *, r: int, alpha: float, base_model: str, targets: Sequence[str] = TARGET_MODULES) -> Path:
    """Write the adapters as a PEFT LoRA folder."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, wrapper in wrapped.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = wrapper.lora_A.detach().contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = wrapper.lora_B.detach().contiguous().clone()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def merge_adapter(model: "torch.nn.Module", directory: Path) -> "torch.nn.Module":
    """Add a PEFT LoRA folder's ``(alpha / r) * B @ A`` to ``model``'s weights in place."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((directory / CONFIG_NAME).read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    tensors = load_file(str(directory / WEIGHTS_NAME))
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for key, lora_a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            lora_b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            weights[f"{module}.weight"] += scale * (lora_b @ lora_a)
    return model
