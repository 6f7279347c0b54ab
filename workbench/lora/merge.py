"""Combine LoRA adapters with any merge method on their ΔW, never on A and B separately.

Averaging A's and B's apart is wrong: (B₁ + B₂)(A₁ + A₂) / 4 is not (B₁A₁ + B₂A₂) / 2, and the
factors of independently trained adapters are not even aligned. Here every adapter becomes a lazy
"model" whose tensors are its ΔW = scale · B @ A (zeros where it has no factors), the base is all
zeros (so a task vector is exactly ΔW), the chosen method merges them with the streaming engine
into a temporary float32 folder, and each merged ΔW is factored again by truncated SVD. The default
rank per tensor is the sum of the adapters' ranks there, at which a weighted sum of ΔW is exact
(rank(Σ ΔW_i) ≤ Σ r_i); sparsifying methods (TIES, DARE) give full-rank results that a smaller rank
only approximates; the adapter's ``lora_report.json`` gives each tensor's relative error.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import CheckpointReader, TensorInfo
from workbench.checkpoint.lora_adapter import LoraAdapter, LoraFactors
from workbench.errors import CheckpointError, RecipeError
from workbench.lora.extract import LoraReport, write_factored

if TYPE_CHECKING:
    import torch

    from workbench.registry import Registry

#: The reference that stands for the all-zero base in the internal recipe.
ZERO_BASE = "<zero base>"


class DeltaReader(CheckpointReader):
    """The ΔW of one adapter over the union of every adapter's targets (zeros where it has none;
    no factors at all: the zero base)."""

    def __init__(
        self, path: Path, factors: dict[str, LoraFactors], shapes: dict[str, tuple[int, int]]
    ) -> None:
        self.path = path
        self.factors = factors
        self.shapes = shapes

    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def info(self, name: str) -> TensorInfo:
        if name not in self.shapes:
            raise CheckpointError(f"no tensor '{name}' among the adapters' targets.")
        return TensorInfo(name, "F32", self.shapes[name], self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        import torch

        factors = self.factors.get(name)
        if factors is not None:
            return factors.delta(rows)
        out, inp = self.shapes[name]
        return torch.zeros((out if rows is None else rows[1] - rows[0], inp))

    def files(self) -> list[Path]:
        return []


def merge_loras(
    adapters: list[Path],
    out_dir: Path,
    registry: "Registry",
    method: str = "task_arithmetic",
    parameters: dict[str, Any] | None = None,
    weights: list[float] | None = None,
    rank: int | None = None,
    overwrite: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> LoraReport:
    """``workbench lora merge``: one adapter from several, through any merge method."""
    from workbench.engine.plan import build_plan
    from workbench.engine.run import execute
    from workbench.recipe.schema import Recipe

    if weights is not None and len(weights) != len(adapters):
        raise RecipeError(
            f"{len(weights)} weights for {len(adapters)} adapters; give one --weight per adapter, in order."
        )
    if out_dir.exists() and not overwrite:
        raise RecipeError(f"{out_dir} exists; choose another folder or pass --overwrite.")
    loaded = [LoraAdapter(path) for path in adapters]
    shapes: dict[str, tuple[int, int]] = {}
    ranks: dict[str, int] = {}
    for adapter in loaded:
        for name, factors in adapter.factors.items():
            if shapes.setdefault(name, factors.shape) != factors.shape:
                raise CheckpointError(
                    f"adapter {adapter.path} changes '{name}' as {factors.shape}, another adapter as "
                    f"{shapes[name]}: they are not for one base."
                )
            ranks[name] = ranks.get(name, 0) + factors.rank
    readers = {str(adapter.path): DeltaReader(adapter.path, adapter.factors, shapes) for adapter in loaded}
    readers[ZERO_BASE] = DeltaReader(loaded[0].path, {}, shapes)
    method_cls = registry.method(method)
    unweighted: list[float | None] = [None] * len(loaded)
    models = [
        {"model": str(a.path), **({"parameters": {"weight": w}} if weights is not None else {})}
        for a, w in zip(loaded, weights or unweighted)
    ]
    recipe = Recipe.model_validate(
        {
            "method": method,
            "models": models,
            **({"base": ZERO_BASE} if method_cls.base_model != "unused" else {}),
            "parameters": parameters or {},
            "output": {"dtype": "float32"},
        }
    )
    with tempfile.TemporaryDirectory(
        prefix="workbench-lora-merge-", dir=out_dir.parent if out_dir.parent.exists() else None
    ) as scratch:
        plan = build_plan(
            recipe,
            registry,
            out=Path(scratch) / "deltas",
            opener=lambda ref: (readers[ref].path, readers[ref]),
        )
        try:
            execute(plan, registry)
        finally:
            plan.close()
        with registry.open_checkpoint(Path(scratch) / "deltas") as merged:  # an ordinary safetensors folder
            pairs = ((name, merged.read(name)) for name in merged.tensor_names())
            per_tensor = rank if rank is not None else ranks
            base = loaded[0].base_reference or ""
            return write_factored(pairs, out_dir, per_tensor, base, LoraReport(out_dir), overwrite, on_tensor)
