"""Passthrough: copy one model's tensors, optionally scaled (mergekit's ``passthrough``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, TensorContext

if TYPE_CHECKING:
    import torch


class PassthroughModelParameters(MethodParameters):
    scale: float = Param(1.0, description="Multiply the tensor by this factor (1 copies it unchanged).")


class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "Copy a single model's tensors, optionally scaled per layer or tensor."
    paper = None
    when_to_use = (
        "Copying one model's tensors, optionally scaled per layer or per tensor (e.g. to damp an "
        "expert's layers), and as the building block of layer stacking. "
        "Exact semantics: [methods.md](../methods.md#passthrough)."
    )
    ModelParameters = PassthroughModelParameters
    base_model = "unused"
    max_models = 1
    mode = "elementwise"

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: MethodParameters,
        model_params: list[PassthroughModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        scale = model_params[0].scale
        if scale == 1.0:
            return tensors[0].to(ctx.out_dtype)
        return (tensors[0].to(ctx.compute_dtype) * scale).to(ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Passthrough)
