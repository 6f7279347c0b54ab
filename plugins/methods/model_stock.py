"""Model Stock (Jang et al. 2024): move from the base towards the average of the fine-tunes by a
ratio set by how much their task vectors agree.

Semantics follow mergekit's ``model_stock`` (``merge_methods/model_stock.py``), so mergekit recipes
give the same result: with task vectors τᵢ = θᵢ − θ_base of the N fine-tunes,

* c = mean over pairs i < j of cos(τᵢ, τⱼ), each cosine = ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6) clamped
  to [-1, 1] (the 1e-6 floor and the clamp are mergekit's);
* t = N c / (1 + (N − 1) c)  (the paper's interpolation ratio for N models at angle arccos c);
* θ = t · mean(θᵢ) + (1 − t) · θ_base.

The paper states the ratio for one angle shared by all pairs; using the mean pairwise cosine when
there are more than two fine-tunes is mergekit's choice, kept here for compatibility. With
``filter_wise`` the cosine and ratio are computed per row (last dimension) instead of per tensor; a
1-D tensor (bias, norm) is one row, as in mergekit. Like mergekit, no per-model weight: every
fine-tune counts equally. If c = −1/(N − 1) the ratio divides by zero, in mergekit as here.

Unlike mergekit, which holds every task vector of a tensor at once in the merge dtype, the dot
products are accumulated block by block (compute dtype, at least float32; block sums in float64) and the result is
one blocked weighted sum (1 − t) θ_base + Σᵢ (t/N) θᵢ, so no whole-tensor copy is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, PrepareContext, TensorContext

if TYPE_CHECKING:
    import torch

#: mergekit's floor on the product of the two norms (avoids 0/0 for zero task vectors).
NORM_FLOOR = 1e-6


class ModelStockParameters(MethodParameters):
    filter_wise: bool = Param(
        False,
        description="Compute the agreement and the ratio per row (last dimension) instead of per tensor.",
    )


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = (
        "t * mean(models) + (1 - t) * base, with t = N c / (1 + (N - 1) c) "
        "from the mean pairwise cosine c of the task vectors."
    )
    paper = "https://arxiv.org/abs/2403.19522"
    when_to_use = (
        "Several fine-tunes of one base on the same task (different seeds or hyperparameters): it finds "
        "the interpolation towards the base from the angle between their task vectors alone, without "
        "validation data. Not meant for combining different tasks. "
        "Exact semantics: [methods.md](../methods.md#model_stock)."
    )
    Parameters = ModelStockParameters
    base_model = "required"
    min_models = 2
    # The ratio depends on the whole tensor; with filter_wise, on whole rows (prepare() makes it rowwise).
    mode = "whole"

    def prepare(self, ctx: PrepareContext) -> None:
        # one ratio per row for every tensor: the engine may feed blocks of whole rows (a per-layer
        # list may turn it off for some tensors, which then need theirs whole)
        if all(ctx.params.at(name).filter_wise for name in ctx.tensor_names):
            self.mode = "rowwise"

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: ModelStockParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        from workbench_kernels import accumulator_dtype
        from workbench_kernels.weighted_sum import weighted_sum

        assert base is not None
        if base.numel() == 0:
            return base.to(ctx.out_dtype)
        # Task vectors and their products in at least float32: in bf16 the cosines, hence the ratio,
        # lose most of their digits.
        dtype = accumulator_dtype(ctx.compute_dtype)
        if params.filter_wise and base.dim() >= 2:
            return _row_wise(tensors, base, dtype, ctx.out_dtype)
        # One ratio for the tensor (with filter_wise a 1-D tensor is a single row: the same thing),
        # then t * mean + (1 - t) * base as one blocked weighted sum.
        dots = _gram([x.reshape(-1) for x in tensors], base.reshape(-1), dtype)
        t = float(ratio(dots, dots.diagonal().sqrt()))
        n = len(tensors)
        return weighted_sum([base, *tensors], [1.0 - t, *([t / n] * n)], ctx.compute_dtype, ctx.out_dtype)


#: Elements per block: the task vectors exist one block at a time, never as whole-tensor copies.
BLOCK = 1 << 20


def ratio(dots: "torch.Tensor", norms: "torch.Tensor") -> "torch.Tensor":
    """t = N c / (1 + (N - 1) c), c the mean pairwise cosine, from the Gram matrix of the task
    vectors (``dots[..., i, j]``) and their norms (``norms[..., i]``); one t per leading index."""
    import torch

    n = norms.shape[-1]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(
        [
            (dots[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=NORM_FLOOR)).clamp(-1.0, 1.0)
            for i, j in pairs
        ]
    )
    c = cos.mean(dim=0)
    return (n * c) / (1 + (n - 1) * c)


def _gram(xs: list["torch.Tensor"], base: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """Gram matrix of the flat task vectors, block sums accumulated in float64."""
    import torch

    dots = torch.zeros(len(xs), len(xs), dtype=torch.float64)
    for start in range(0, base.numel(), BLOCK):
        b = base[start : start + BLOCK].to(dtype)
        taus = torch.stack([x[start : start + BLOCK].to(dtype) - b for x in xs])
        dots += (taus @ taus.T).double().cpu()
    return dots


def _row_wise(
    xs: list["torch.Tensor"], base: "torch.Tensor", dtype: "torch.dtype", out_dtype: "torch.dtype"
) -> "torch.Tensor":
    """``filter_wise``: one ratio per row (last dimension), computed and applied a block of rows at a time."""
    import torch

    width = base.shape[-1]
    flat_base = base.reshape(-1, width)
    flat_xs = [x.reshape(-1, width) for x in xs]
    out = torch.empty(flat_base.shape, dtype=out_dtype, device=base.device)
    step = max(1, BLOCK // width)
    for start in range(0, flat_base.shape[0], step):
        b = flat_base[start : start + step].to(dtype)
        ws = torch.stack([x[start : start + step].to(dtype) for x in flat_xs], dim=1)  # (rows, N, width)
        taus = ws - b.unsqueeze(1)
        dots = taus @ taus.transpose(1, 2)
        t = ratio(dots, dots.diagonal(dim1=1, dim2=2).sqrt()).unsqueeze(-1)
        out[start : start + step] = t * ws.mean(dim=1) + (1 - t) * b
    return out.reshape(base.shape)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(ModelStock)
