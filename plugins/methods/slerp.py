"""Spherical linear interpolation between two models, tensor by tensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, RowBlocks, TensorContext

if TYPE_CHECKING:
    import torch


class SlerpParameters(MethodParameters):
    t: float = Param(..., description="Position between models[0] (t=0) and models[1] (t=1).", ge=0.0, le=1.0)


class Slerp(MergeMethod):
    name = "slerp"
    summary = (
        "Spherical interpolation of two models per tensor; linear where the tensors are nearly parallel."
    )
    paper = "https://dl.acm.org/doi/10.1145/325165.325242"
    when_to_use = (
        "Blending exactly two models when their weights have similar norms and a plain average would "
        "shrink them (averaging two unit vectors shortens the result; slerp keeps the norm). Popular for "
        "two chat fine-tunes of one base, with t varied per layer and module (a gradient on self_attn "
        "and another on mlp). For three or more models use linear or a task-vector method. "
        "Exact semantics: [methods.md](../methods.md#slerp)."
    )
    Parameters = SlerpParameters
    base_model = "unused"
    min_models = 2
    max_models = 2

    #: The angle comes from the norms and dot product of whole tensors; given it, the result is a
    #: weighted sum of the two, element by element.
    mode = "blockwise"

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: SlerpParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> tuple[float, float]:  # type: ignore[override]
        """The weights of models[0] and models[1] (the endpoints exactly at t = 0 and 1)."""
        from workbench_kernels.slerp import slerp_weights

        if params.t in (0.0, 1.0):
            return 1.0 - params.t, params.t
        return slerp_weights(blocks.flat(), params.t, _angle_dtype(ctx))

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: SlerpParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        from workbench_kernels.weighted_sum import weighted_sum

        weights = self.statistics(tensors, base, params, model_params, ctx)
        return weighted_sum(tensors, list(weights), _angle_dtype(ctx), ctx.out_dtype)


def _angle_dtype(ctx: TensorContext) -> "torch.dtype":
    """The angle needs at least float32, whatever the compute dtype."""
    import torch

    return torch.float64 if ctx.compute_dtype == torch.float64 else torch.float32


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Slerp)
