"""PEFT LoRA adapters on disk: read one (its factors and scales), write one.

A folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``use_rslora``,
``target_modules``, per-module ``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out``) and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` [r, in] and
``…lora_B.weight`` [out, r]. The change it makes to the weight ``<module>.weight`` is
ΔW = scale · B @ A with scale = alpha / r, or alpha / √r with rsLoRA; transposed when
``fan_in_fan_out`` (GPT-2's Conv1D stores weights as (in, out)). peft itself is not needed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: a key matches a module path that ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank change: ΔW = scale · B @ A (transposed if ``transposed``)."""

    weight: str  # the base tensor it changes, '<module>.weight'
    a: "torch.Tensor"  # [r, in]
    b: "torch.Tensor"  # [out, r]
    scale: float
    transposed: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        """ΔW in float32 in the base tensor's layout (rows ``[start, stop)`` of it if given)."""
        a, b = self.a.float(), self.b.float()
        if self.transposed:  # stored (in, out): ΔWᵀ = Aᵀ Bᵀ
            a_t = a.T if rows is None else a.T[rows[0] : rows[1]]
            return (a_t @ b.T).mul_(self.scale)
        b_rows = b if rows is None else b[rows[0] : rows[1]]
        return (b_rows @ a).mul_(self.scale)

    def added_to(
        self,
        weight: "torch.Tensor",
        rows: tuple[int, int] | None = None,
        out_dtype: "torch.dtype | None" = None,
    ) -> "torch.Tensor":
        """``weight`` + ΔW (``weight`` being rows ``[start, stop)`` of the base tensor if given), in
        ``out_dtype`` (``weight``'s by default). The LoRA delta kernel computes it in float32
        without materialising ΔW or a float32 copy of the weight; the factors are sliced as views."""
        from workbench_kernels.lora_delta import lora_delta_add

        a, b = self.a.to(weight.device), self.b.to(weight.device)  # the adapter is read on the CPU
        if rows is not None:  # rows of ΔW are rows of B, or columns of A when ΔW is transposed
            a, b = (a[:, rows[0] : rows[1]], b) if self.transposed else (a, b[rows[0] : rows[1]])
        return lora_delta_add(weight, b, a, self.scale, self.transposed, out_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        return (inp, out) if self.transposed else (out, inp)


class LoraAdapter:
    """A PEFT LoRA adapter folder, read eagerly (adapters are small next to their base)."""

    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.path = Path(path)
        config_file, weights_file = self.path / CONFIG_NAME, self.path / WEIGHTS_NAME
        if not config_file.is_file():
            raise CheckpointError(f"{self.path} is not a PEFT adapter folder: it has no {CONFIG_NAME}.")
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file}: not valid JSON ({exc}).") from None
        kind = self.config.get("peft_type", "LORA")
        if kind != "LORA":
            raise CheckpointError(
                f"{config_file}: peft_type '{kind}' is not LORA; only LoRA adapters are supported."
            )
        if self.config.get("use_dora"):
            raise CheckpointError(
                f"{config_file}: DoRA adapters (use_dora) are not supported; their change is not a low-rank ΔW alone."
            )
        if not weights_file.is_file():
            raise CheckpointError(f"{self.path}: {WEIGHTS_NAME} is missing.")
        tensors = load_file(str(weights_file))
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _FACTOR.match(key)
            if not match:
                raise CheckpointError(
                    f"{weights_file}: tensor '{key}' is not a LoRA factor (lora_A / lora_B of a linear "
                    "layer); embedding LoRA, biases and modules_to_save are not supported."
                )
            pieces.setdefault(match[1], {})[match[2]] = tensor
        self.factors: dict[str, LoraFactors] = {}
        alpha, rslora = (
            float(self.config.get("lora_alpha", self.config.get("r", 8))),
            bool(self.config.get("use_rslora")),
        )
        for module, pair in sorted(pieces.items()):
            if set(pair) != {"A", "B"}:
                raise CheckpointError(
                    f"{weights_file}: module '{module}' has lora_{next(iter(pair))} but not its partner."
                )
            a, b = pair["A"], pair["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"{weights_file}: module '{module}': lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)} do not make B @ A."
                )
            rank = a.shape[0]
            module_alpha = float(_pattern_value(self.config.get("alpha_pattern"), module, alpha))
            scale = module_alpha / (math.sqrt(rank) if rslora else rank)
            self.factors[f"{module}.weight"] = LoraFactors(
                f"{module}.weight", a, b, scale, bool(self.config.get("fan_in_fan_out"))
            )
        if not self.factors:
            raise CheckpointError(f"{weights_file} holds no LoRA factors.")

    @property
    def base_reference(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def files(self) -> list[Path]:
        return [self.path / CONFIG_NAME, self.path / WEIGHTS_NAME]


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def write_adapter(
    directory: Path,
    factors: dict[str, tuple["torch.Tensor", "torch.Tensor"]],
    *,
    scale: float,
    base_model: str,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write ``{weight name: (A, B)}`` as a PEFT LoRA folder whose every module changes its weight
    by ``scale`` · B @ A. The config's ``r`` is the most common rank; modules of another rank get
    ``rank_pattern`` and ``alpha_pattern`` entries (alpha = scale · r), as PEFT writes them."""
    from safetensors.torch import save_file

    if not factors:
        raise ValueError("an adapter needs at least one module")
    ranks = {name.removesuffix(".weight"): int(a.shape[0]) for name, (a, _) in factors.items()}
    counts = list(ranks.values())
    rank = max(set(counts), key=counts.count)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in factors.items():
        module = name.removesuffix(".weight")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().clone()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    other = {
        module: r for module, r in ranks.items() if r != rank
    }  # keys are full module paths: PEFT matches a key against a path's end
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": _number(scale * rank),
        "lora_dropout": 0.0,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in ranks}),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": other,
        "alpha_pattern": {module: _number(scale * r) for module, r in other.items()},
        "inference_mode": True,
        "revision": None,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def add_to_module(model: "torch.nn.Module", adapter: LoraAdapter) -> "torch.nn.Module":
    """Add the adapter's ΔW to a loaded transformers model's weights, in place (``base+adapter``
    for evaluation)."""
    import torch

    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, factors in adapter.factors.items():
            if name not in weights:
                raise CheckpointError(f"{adapter.path}: the model has no weight '{name}' for this adapter.")
            target = weights[name]
            if tuple(target.shape) != factors.shape:
                raise CheckpointError(
                    f"{adapter.path}: '{name}' is {tuple(target.shape)} in the model but the adapter's ΔW "
                    f"is {factors.shape}."
                )
            target.copy_(factors.added_to(target))
    return model
