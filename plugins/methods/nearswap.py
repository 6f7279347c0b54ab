"""NearSwap (mergekit's ``nearswap``): keep the base where the two models differ, and take the other
model's value where they nearly agree.

Per element, with a the base and b the other model: ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and
``out = w·b + (1 − w)·a``. Where |a − b| ≤ t the other model's value is taken whole (w = 1); further
apart, the result moves from b back towards a as t/|a − b| shrinks. Computed in the compute dtype, as
mergekit computes it in its merge dtype; the 1e-6 floor is mergekit's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, Param, TensorContext, merge_function

if TYPE_CHECKING:
    import torch

#: mergekit's floor on |a - b| (the weight of identical elements is then t / 1e-6, clamped to 1).
DIFFERENCE_FLOOR = 1e-6

WHEN_TO_USE = (
    "Moving a base a small step towards one other model without overwriting what the two disagree on: "
    "elements where they nearly agree take the other model's value, large differences keep the base's. "
    "A very small t (mergekit's examples use 0.0001) changes only near-identical weights. "
    "Exact semantics: [methods.md](../methods.md#nearswap)."
)


@merge_function(
    "nearswap",
    summary="Per element, the other model's value where it lies within t of the base's, a blend further off.",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    when_to_use=WHEN_TO_USE,
    mode="elementwise",
    min_models=1,
    max_models=1,
)
def nearswap(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    t: float = Param(description="Distance within which the other model's value is taken whole.", ge=0.0),
    *,
    ctx: TensorContext,
) -> torch.Tensor:
    a = base.to(ctx.compute_dtype)
    b = tensors[0].to(ctx.compute_dtype)
    weight = (t / (a - b).abs().clamp(min=DIFFERENCE_FLOOR)).clamp(min=0.0, max=1.0)
    return (weight * b + (1 - weight) * a).to(ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(nearswap)
