"""A base checkpoint with LoRA adapters applied: ``BASE+ADAPTER`` wherever a model is expected.

Nothing is materialised up front: reading a tensor an adapter changes returns W + scale · B @ A
(computed in float32, stored back in W's dtype), rows at a time if the engine asks for rows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import CheckpointReader, TensorInfo
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint.lora_adapter import LoraAdapter, LoraFactors


class AdaptedReader(CheckpointReader):
    def __init__(self, base: CheckpointReader, adapters: list["LoraAdapter"]) -> None:
        self.base = base
        self.path = base.path
        self.adapters = adapters
        self.changes: dict[str, list[LoraFactors]] = {}
        for adapter in adapters:
            for name, factors in adapter.factors.items():
                if name not in base:
                    raise CheckpointError(
                        f"adapter {adapter.path} changes '{name}', which base {base.path} does not have."
                    )
                shape = base.info(name).shape
                if tuple(shape) != factors.shape:
                    raise CheckpointError(
                        f"adapter {adapter.path}: '{name}' is {tuple(shape)} in base {base.path} but the "
                        f"adapter's ΔW is {factors.shape}."
                    )
                self.changes.setdefault(name, []).append(factors)

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        weight = self.base.read(name, rows)
        changes = self.changes.get(name)
        if not changes:
            return weight
        import torch

        total = weight  # float32 between adapters, rounded once into W's dtype by the last one
        for i, factors in enumerate(changes):
            total = factors.added_to(
                total, rows, out_dtype=weight.dtype if i == len(changes) - 1 else torch.float32
            )
        return total

    def config(self) -> dict[str, Any] | None:
        return self.base.config()

    def files(self) -> list[Path]:
        return self.base.files() + [file for adapter in self.adapters for file in adapter.files()]

    def close(self) -> None:
        self.base.close()
