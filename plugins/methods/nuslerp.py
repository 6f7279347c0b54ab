"""NuSLERP (mergekit's ``nuslerp``): spherical interpolation of two models (or of their task vectors
over a base) at t = w₂ / (w₁ + w₂), over whole tensors, per row, or per column.

With v₀, v₁ the two vectors (each model's tensor, or θᵢ − θ_base with a base): uᵢ = vᵢ / max(‖vᵢ‖, 1e-7),
cos θ = clamp(⟨u₀, u₁⟩, −1, 1); where 1 − cos²θ ≤ ε² (ε = 1e-8) the vectors are colinear and the result
is (1 − t)v₀ + t·v₁, elsewhere (sin((1 − t)θ)·v₀ + sin(tθ)·v₁) / sin θ; plus the base. t is 0.5 when
|w₁ + w₂| < 1e-6. The vectors are the flattened tensors (``nuslerp_flatten``, the default), else the
rows of the last dimension, or with ``nuslerp_row_wise`` the vectors along the first dimension (the
columns of a matrix; mergekit transposes dimension 0 with the last); a 1-D tensor is one vector.

How it streams: flattened, and per column, the angle needs inner products over the whole tensor (per
column: over every row), gathered block by block in float64 before any block is merged
(blockwise); per row, each block of whole rows is merged on its own (row-wise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, PrepareContext, RowBlocks, TensorContext

if TYPE_CHECKING:
    import torch

#: mergekit's floor on a norm before normalising, and its colinearity threshold ε (1 − cos² ≤ ε²).
NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


class NuSlerpParameters(MethodParameters):
    nuslerp_flatten: bool = Param(
        True, description="Interpolate the whole flattened tensors (else rows, or columns).", per_layer=False
    )
    nuslerp_row_wise: bool = Param(
        False,
        description="Without flatten: interpolate the vectors along the first dimension (matrix columns).",
        per_layer=False,
    )


class NuSlerpModelParameters(MethodParameters):
    weight: float = Param(1.0, description="The model's weight: t = w₂ / (w₁ + w₂).")


def position(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def slerp_coefficients(
    dot: "torch.Tensor", sq0: "torch.Tensor", sq1: "torch.Tensor", t: float
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(a₀, a₁) with the result a₀v₀ + a₁v₁, from ⟨v₀, v₁⟩ and the squared norms (any shape, float64)."""
    import torch

    cos = (dot / (sq0.sqrt().clamp(min=NORM_FLOOR) * sq1.sqrt().clamp(min=NORM_FLOOR))).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.sin(theta)
    safe = torch.where(colinear, 1.0, sin)
    a0 = torch.where(colinear, 1.0 - t, torch.sin((1 - t) * theta) / safe)
    a1 = torch.where(colinear, t, torch.sin(t * theta) / safe)
    return a0, a1


class NuSlerp(MergeMethod):
    name = "nuslerp"
    summary = "Spherical interpolation of two models or task vectors, at t = w2 / (w1 + w2), per tensor, row or column."
    paper = None
    when_to_use = (
        "Two models, as slerp, when the interpolation point should follow per-model weights, when the "
        "task vectors over a base (not the weights themselves) should be interpolated, or when each row "
        "or column should get its own angle. Exact semantics: [methods.md](../methods.md#nuslerp)."
    )
    Parameters = NuSlerpParameters
    ModelParameters = NuSlerpModelParameters
    base_model = "optional"
    min_models = 2
    max_models = 2
    #: Flattened (the default) and per column the angle comes from inner products over the whole
    #: tensor; per row (prepare() says so) each block of whole rows merges on its own.
    mode = "blockwise"

    def prepare(self, ctx: PrepareContext) -> None:
        options: NuSlerpParameters = ctx.params.values  # type: ignore[assignment]
        if not options.nuslerp_flatten and not options.nuslerp_row_wise:
            self.mode = "rowwise"

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: NuSlerpParameters,
        model_params: list[NuSlerpModelParameters],
        ctx: TensorContext,
    ) -> Any:  # type: ignore[override]
        """⟨v₀, v₁⟩, ‖v₀‖², ‖v₁‖² in float64: scalars (flattened, or a 1-D tensor), else per column."""
        whole = params.nuslerp_flatten or len(blocks.shape) < 2
        sums: list["torch.Tensor"] | None = None
        for rows in blocks.rows:
            xs, base = blocks.read(rows)
            v0, v1 = (_vector(x, base) for x in xs)
            parts = [v0 * v1, v0 * v0, v1 * v1]
            reduced = [p.sum() if whole else p.sum(dim=0) for p in parts]
            sums = reduced if sums is None else [a + b for a, b in zip(sums, reduced)]
        assert sums is not None
        return tuple(s.cpu() for s in sums)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: NuSlerpParameters,
        model_params: list[NuSlerpModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        t = position([p.weight for p in model_params])
        v0, v1 = (_vector(x, base) for x in tensors)
        if self.mode == "rowwise":  # each row its own angle (a 1-D tensor: one row)
            dot, sq0, sq1 = ((a * b).sum(dim=-1, keepdim=True) for a, b in ((v0, v1), (v0, v0), (v1, v1)))
        else:
            dot, sq0, sq1 = self.statistics(tensors, base, params, model_params, ctx)
        a0, a1 = slerp_coefficients(dot.to(v0.device), sq0.to(v0.device), sq1.to(v0.device), t)
        result = a0 * v0 + a1 * v1
        if base is not None:
            result = result + base.to(result.dtype)
        return result.to(ctx.compute_dtype).to(ctx.out_dtype)


def _vector(x: "torch.Tensor", base: "torch.Tensor | None") -> "torch.Tensor":
    """The model's vector in float64: its tensor, or its task vector over the base."""
    import torch

    v = x.to(torch.float64)
    return v - base.to(torch.float64) if base is not None else v


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(NuSlerp)
