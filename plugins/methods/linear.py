"""Linear merging (model soups): a weighted average of the models."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, Param, PerModel, TensorContext, merge_function
from workbench_plugins.methods._weights import normalized, refuse_zero_sums

if TYPE_CHECKING:
    import torch

WHEN_TO_USE = (
    "The first thing to try with several fine-tunes of one base, or checkpoints of one training run "
    "(a model soup): averaging weights that lie in one basin tends to improve robustness. It ignores "
    "the base, so task vectors are diluted by the number of models (task_arithmetic can add them at "
    "full strength). Models trained from different initialisations must be aligned first (ot_fusion). "
    "Exact semantics: [methods.md](../methods.md#linear)."
)


@merge_function(
    "linear",
    summary="Weighted average of the models: sum(w_i * theta_i), divided by sum(w_i) when normalize is on.",
    paper="https://arxiv.org/abs/2203.05482",
    when_to_use=WHEN_TO_USE,
    mode="elementwise",
    check_plan=lambda params, model_params, layers: refuse_zero_sums("linear", params, model_params),
)
def linear(
    tensors: list[torch.Tensor],
    normalize: bool = Param(
        True, description="Divide by the sum of the weights (a true average).", per_layer=False
    ),
    weight: PerModel[float] = Param(1.0, description="This model's weight."),
    *,
    ctx: TensorContext,
) -> torch.Tensor:
    from workbench_kernels.weighted_sum import weighted_sum

    weights = normalized(weight, "linear", ctx.name) if normalize else weight
    return weighted_sum(tensors, weights, ctx.compute_dtype, ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(linear)
