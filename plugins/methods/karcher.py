"""The Karcher mean (mergekit's ``karcher``, arXiv 2603.04972): the Riemannian (Fréchet) mean of the
models' directions on the unit sphere, scaled by their mean norm.

With N models, nᵢ = ‖θᵢ‖ and uᵢ = θᵢ / nᵢ (models of norm ≤ tol are left out of the mean, and equal
weights 1/N are renormalised over the others): start at the normalised average of the uᵢ (or the
first uᵢ if that average is shorter than tol), then up to ``max_iter`` times move along the mean of
the log maps, T = Σ wᵢ θᵢ/sin θᵢ · (uᵢ − cos θᵢ·m) with θᵢ the angle between m and uᵢ (terms with
θᵢ < tol skipped), m ← cos‖T‖·m + sin‖T‖·T/‖T‖, renormalised; stop once ‖T‖ < tol. The result is
(Σᵢ nᵢ/N)·m, every model's norm counted. Equal weights, no base, as in mergekit (a mergekit recipe's
base is one more input).

The mean always lies in the span of the uᵢ and every step needs only inner products, so the
iteration runs on coefficients over the Gram matrix ⟨θᵢ, θⱼ⟩, gathered over the whole tensor block by
block in float64 (blockwise); the result is then one weighted sum per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, RowBlocks, TensorContext
from workbench_plugins.methods._gram import gram_matrix

if TYPE_CHECKING:
    import torch


class KarcherParameters(MethodParameters):
    max_iter: int = Param(10, description="The most steps of the iteration.", ge=0, per_layer=False)
    tol: float = Param(1e-5, description="Stop once a step is shorter than this.", gt=0.0, per_layer=False)


def karcher_coefficients(gram: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """The cᵢ of the result Σ cᵢθᵢ, from the Gram matrix of the θᵢ (float64 arithmetic)."""
    n = len(gram)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    weight = 1.0 / len(valid)
    cos = {(i, j): gram[i][j] / (norms[i] * norms[j]) for i in valid for j in valid}  # ⟨uᵢ, uⱼ⟩

    def inner(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(a[i] * cos[i, j] * b[j] for i in valid for j in valid)

    def normalised(a: dict[int, float]) -> dict[int, float]:
        length = math.sqrt(max(inner(a, a), 0.0))
        return {i: v / length for i, v in a.items()} if length > tol else a

    mean = {i: weight for i in valid}  # m = Σ aᵢuᵢ
    length = math.sqrt(max(inner(mean, mean), 0.0))
    mean = {i: (1.0 if i == valid[0] else 0.0) for i in valid} if length < tol else normalised(mean)
    for _ in range(max_iter):
        tangent = dict.fromkeys(valid, 0.0)
        for i in valid:
            dot = min(max(sum(mean[j] * cos[j, i] for j in valid), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            factor = weight * theta / math.sin(theta)
            tangent[i] += factor
            for j in valid:
                tangent[j] -= factor * dot * mean[j]
        step = math.sqrt(max(inner(tangent, tangent), 0.0))
        if step < tol:
            break
        mean = {j: math.cos(step) * mean[j] + math.sin(step) * tangent[j] / step for j in valid}
        mean = normalised(mean)
    scale = sum(norms) / n
    return [scale * mean[i] / norms[i] if i in mean else 0.0 for i in range(n)]


class Karcher(MergeMethod):
    name = "karcher"
    summary = "The Riemannian mean of the models' directions on the sphere, scaled by their mean norm."
    paper = "https://arxiv.org/abs/2603.04972"
    when_to_use = (
        "Averaging several models of one architecture without shrinking their weights: the mean of "
        "directions on the sphere keeps the norm a plain average loses when the models point apart. "
        "Equal weights only (use multislerp for weights). "
        "Exact semantics: [methods.md](../methods.md#karcher)."
    )
    Parameters = KarcherParameters
    base_model = "unused"
    min_models = 1
    #: The iteration needs only the inner products of whole tensors; given its coefficients, each
    #: element is a weighted sum of the models' elements.
    mode = "blockwise"

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: KarcherParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> list[float]:  # type: ignore[override]
        return karcher_coefficients(gram_matrix(blocks), params.max_iter, params.tol)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: KarcherParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        from workbench_kernels.weighted_sum import weighted_sum

        if len(tensors) == 1:
            return tensors[0].to(ctx.out_dtype)
        c = self.statistics(tensors, base, params, model_params, ctx)
        return weighted_sum(tensors, c, ctx.compute_dtype, ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Karcher)
