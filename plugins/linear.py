"""Linear merging (model soups): a weighted average of the models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from workbench import hookimpl
from workbench.errors import RecipeError
from workbench.method import MergeMethod, MethodParameters, Param, TensorContext

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
            total = sum(weights)
            if total == 0:
                raise RecipeError(f"linear: the weights of tensor '{ctx.name}' sum to 0, so they cannot be normalised.")
            weights = [w / total for w in weights]
        return weighted_sum(tensors, weights, ctx.compute_dtype, ctx.out_dtype)


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Linear)
