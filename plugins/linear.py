"""Linear merging (model soups): a weighted average of the models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from workbench import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, TensorContext
from workbench_plugins._weights import normalized

if TYPE_CHECKING:
    import torch


class LinearParameters(MethodParameters):
    normalize: bool = Param(True, description="Divide by the sum of the weights (a true average).", per_layer=False)


class LinearModelParameters(MethodParameters):
    weight: float = Param(1.0, description="This model's weight.")


class Linear(MergeMethod):
    name = "linear"
    summary = "Weighted average of the models: sum(w_i * theta_i), divided by sum(w_i) when normalize is on."
    paper = "https://arxiv.org/abs/2203.05482"
    Parameters = LinearParameters
    ModelParameters = LinearModelParameters
    base_model = "unused"
    elementwise = True

    def apply(self, tensors: list["torch.Tensor"], base: "torch.Tensor | None", params: LinearParameters, model_params: list[LinearModelParameters], ctx: TensorContext) -> "torch.Tensor":  # type: ignore[override]
        from workbench_kernels.weighted_sum import weighted_sum

        weights = [p.weight for p in model_params]
        if params.normalize:
            weights = normalized(weights, self.name, ctx.name)
        return weighted_sum(tensors, weights, ctx.compute_dtype, ctx.out_dtype)


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Linear)
