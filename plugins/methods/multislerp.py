"""Multi-SLERP (mergekit's ``multislerp``): barycentric interpolation of N models on a hypersphere.

With vectors vᵢ (the models' tensors, or their task vectors θᵢ − θ_base when a base is given),
weights wᵢ (divided by their sum with ``normalize_weights``) and nᵢ = ‖vᵢ‖: project onto the unit
sphere, uᵢ = vᵢ / (nᵢ + ε); take the weighted mean m = Σ wᵢuᵢ and its direction m̂ = m / ‖m‖; map each
uᵢ to the tangent space at m̂, tᵢ = uᵢ − ⟨uᵢ, m̂⟩ m̂; interpolate there, T = Σ wᵢtᵢ; map back with the
exponential map, r = m̂ cos‖T‖ + T sin‖T‖ / ‖T‖ (‖T‖ + ε, as in mergekit); and scale by the weighted
mean norm: v = (Σ wᵢnᵢ)·r (plus the base). One model is returned as it is. If ‖m‖ < ε, two models
fall back to the weighted sum Σ wᵢvᵢ, and more are refused, as in mergekit.

Every step is linear in the vᵢ, with coefficients that depend only on their inner products, so the
result is Σ cᵢvᵢ with the cᵢ computed from the Gram matrix ⟨vᵢ, vⱼ⟩, which is gathered over the whole
tensor block by block in float64 (blockwise); each block is then one weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, RowBlocks, TensorContext
from workbench_plugins.methods._gram import gram_matrix

if TYPE_CHECKING:
    import torch


class MultiSlerpParameters(MethodParameters):
    normalize_weights: bool = Param(True, description="Divide the weights by their sum.", per_layer=False)
    eps: float = Param(1e-8, description="Added to norms before dividing by them (mergekit's 1e-8).", gt=0.0)


class MultiSlerpModelParameters(MethodParameters):
    # mergekit requires it; equal weights by default, as linear has here
    weight: float = Param(1.0, description="This model's weight in the barycentre.")


def coefficients(gram: list[list[float]], weights: list[float], eps: float, tensor: str) -> list[float]:
    """The cᵢ of v = Σ cᵢvᵢ, from the Gram matrix of the vᵢ (float64 arithmetic throughout)."""
    n = len(weights)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]

    def inner(a: list[float], b: list[float]) -> float:
        return sum(a[i] * gram[i][j] * b[j] for i in range(n) for j in range(n))

    alpha = [w / (norms[i] + eps) for i, w in enumerate(weights)]  # m = Σ αᵢvᵢ
    mean_norm = math.sqrt(max(inner(alpha, alpha), 0.0))
    if mean_norm < eps:
        if n == 2:
            return list(weights)  # mergekit's linear fallback
        raise RecipeError(
            f"multislerp: tensor '{tensor}': the weighted mean of the models' directions is zero "
            "(antipodal models with weights that balance out); try other weights."
        )
    direction = [a / mean_norm for a in alpha]  # m̂
    g_direction = [sum(gram[i][j] * direction[j] for j in range(n)) for i in range(n)]
    dots = [g_direction[i] / (norms[i] + eps) for i in range(n)]  # ⟨uᵢ, m̂⟩
    along = sum(w * d for w, d in zip(weights, dots))
    tangent = [a - along * d for a, d in zip(alpha, direction)]  # T = m − (Σ wᵢ⟨uᵢ, m̂⟩) m̂
    angle = math.sqrt(max(inner(tangent, tangent), 0.0)) + eps
    scale = sum(w * norm for w, norm in zip(weights, norms))
    return [scale * (d * math.cos(angle) + t * math.sin(angle) / angle) for d, t in zip(direction, tangent)]


class MultiSlerp(MergeMethod):
    name = "multislerp"
    summary = "Barycentric spherical interpolation of N models (or of their task vectors over a base)."
    paper = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    when_to_use = (
        "Blending more than two models the way slerp blends two: a weighted average on the sphere keeps "
        "the weights' norm where a plain average of diverse models shrinks it. With a base it blends "
        "the task vectors and adds them back. Exact semantics: [methods.md](../methods.md#multislerp)."
    )
    Parameters = MultiSlerpParameters
    ModelParameters = MultiSlerpModelParameters
    base_model = "optional"
    min_models = 1
    #: The coefficients come from the inner products over whole tensors; given them, each element is
    #: a weighted sum of the models' elements.
    mode = "blockwise"

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: MultiSlerpParameters,
        model_params: list[MultiSlerpModelParameters],
        ctx: TensorContext,
    ) -> list[float]:  # type: ignore[override]
        """cᵢ per model (the weights of the vᵢ in the result)."""
        if len(model_params) == 1:
            return [1.0]
        weights = [p.weight for p in model_params]
        if params.normalize_weights:
            total = sum(weights)
            if total == 0:
                raise RecipeError(
                    f"multislerp: the weights of tensor '{ctx.name}' sum to 0: cannot normalise."
                )
            weights = [w / total for w in weights]
        return coefficients(gram_matrix(blocks), weights, params.eps, ctx.name)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: MultiSlerpParameters,
        model_params: list[MultiSlerpModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        from workbench_kernels.weighted_sum import weighted_sum

        if len(tensors) == 1:  # mergekit returns the one model as it is, base or not
            return tensors[0].to(ctx.out_dtype)
        c = self.statistics(tensors, base, params, model_params, ctx)
        if base is None:
            return weighted_sum(tensors, c, ctx.compute_dtype, ctx.out_dtype)
        return weighted_sum([base, *tensors], [1.0 - sum(c), *c], ctx.compute_dtype, ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(MultiSlerp)
