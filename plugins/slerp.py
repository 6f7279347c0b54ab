"""Spherical linear interpolation between two models, tensor by tensor."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from workbench import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, TensorContext

if TYPE_CHECKING:
    import torch

#: Above this |cos| the two tensors are treated as parallel and interpolated linearly.
PARALLEL_THRESHOLD = 0.9995
#: Tensors with a smaller norm are not normalised when computing the angle.
SMALL_NORM = 1e-8


class SlerpParameters(MethodParameters):
    t: float = Param(..., description="Position between models[0] (t=0) and models[1] (t=1).", ge=0.0, le=1.0)


class Slerp(MergeMethod):
    name = "slerp"
    summary = "Spherical interpolation of two models per tensor; linear where the tensors are nearly parallel."
    paper = "https://dl.acm.org/doi/10.1145/325165.325242"
    Parameters = SlerpParameters
    base_model = "unused"
    min_models = 2
    max_models = 2

    def apply(self, tensors: list["torch.Tensor"], base: "torch.Tensor | None", params: SlerpParameters, model_params: list[MethodParameters], ctx: TensorContext) -> "torch.Tensor":  # type: ignore[override]
        import torch

        t = params.t
        dtype = torch.float64 if ctx.compute_dtype == torch.float64 else torch.float32  # norms need fp32 at least
        v0 = tensors[0].to(dtype)
        v1 = tensors[1].to(dtype)
        if t == 0.0:
            return v0
        if t == 1.0:
            return v1
        n0 = torch.linalg.vector_norm(v0).item()
        n1 = torch.linalg.vector_norm(v1).item()
        d0 = v0.reshape(-1) / n0 if n0 > SMALL_NORM else v0.reshape(-1)
        d1 = v1.reshape(-1) / n1 if n1 > SMALL_NORM else v1.reshape(-1)
        dot = float(torch.dot(d0, d1).item())
        if abs(dot) > PARALLEL_THRESHOLD:
            return torch.lerp(v0, v1, t)
        omega = math.acos(max(-1.0, min(1.0, dot)))
        sin_omega = math.sin(omega)
        return (math.sin((1.0 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Slerp)
