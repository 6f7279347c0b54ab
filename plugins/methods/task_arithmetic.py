"""Task arithmetic: add scaled task vectors (fine-tune minus base) to the base model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, ParameterSet, TensorContext
from workbench_plugins.methods._weights import normalized, refuse_zero_sums

if TYPE_CHECKING:
    import torch


class TaskArithmeticParameters(MethodParameters):
    scale: float = Param(1.0, alias="lambda", description="lambda: scale of the summed task vectors.")
    normalize: bool = Param(False, description="Divide the weights by their sum.", per_layer=False)


class TaskArithmeticModelParameters(MethodParameters):
    weight: float = Param(1.0, description="Weight of this model's task vector.")


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "base + lambda * sum(w_i * (theta_i - base)): add, scale or negate task vectors."
    paper = "https://arxiv.org/abs/2212.04089"
    when_to_use = (
        "Adding the skills of several fine-tunes of one base (positive weights) or removing a behaviour "
        "(a negative weight). Tune lambda on held-out data: the sum of several task vectors overshoots "
        "at lambda = 1 (the papers search 0.1-1.0; in the zoo's four-task merge 0.5-0.7 was best). "
        "When the task vectors interfere, try ties, dare_ties or pcb. "
        "Exact semantics: [methods.md](../methods.md#task_arithmetic)."
    )
    Parameters = TaskArithmeticParameters
    ModelParameters = TaskArithmeticModelParameters
    base_model = "required"
    mode = "elementwise"

    def check_plan(
        self, params: ParameterSet, model_params: Sequence[ParameterSet], layer_count: int
    ) -> None:
        refuse_zero_sums(self.name, params, model_params)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: TaskArithmeticParameters,
        model_params: list[TaskArithmeticModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        from workbench_kernels.weighted_sum import weighted_sum

        assert base is not None
        weights = [p.weight for p in model_params]
        if params.normalize:
            weights = normalized(weights, self.name, ctx.name)
        # base + l * sum w_i (x_i - base) == (1 - l * sum w_i) * base + sum (l * w_i) * x_i: one pass,
        # one accumulator, and exact when a single fine-tune has l * w = 1.
        coefficients = [params.scale * w for w in weights]
        return weighted_sum(
            [base, *tensors], [1.0 - sum(coefficients), *coefficients], ctx.compute_dtype, ctx.out_dtype
        )


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(TaskArithmetic)
