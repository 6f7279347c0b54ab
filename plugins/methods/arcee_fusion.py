"""Arcee Fusion (mergekit 0.1.5's ``arcee_fusion``): take one model's change to the base only where a
data-free importance score marks it as an outlier.

With b the base and θ the other model, importance = |θ − b|·KL, where KL = Σ p·log(p/q) along each row
(the last dimension; a 1-D tensor is one row), p = softmax(θ) + 1e-8 and q = softmax(b) + 1e-8 along
that row. An element keeps θ's change when its importance reaches the fence
t = median + 1.5·(q₃ − q₁) of the importances over the whole tensor, quantile q being the sorted
values' element ⌊q·(n − 1)⌋ as mergekit indexes them: ``out = b + (θ − b)·[importance ≥ t]``.

Blockwise, because the fence needs three order statistics of the whole tensor: they come exactly from
a RadixSelect over the importances, two streaming passes over the row blocks. A row block of a ≥2-D
tensor holds whole rows, so its KL is its own; the engine may split a large 1-D tensor into element
ranges, so there the softmax statistics (max and Σexp of θ and of b) and the KL are first gathered over
the blocks. Memory: a block of the two inputs, its float32 scores and a few histograms, never the
whole tensor.

Precision. The KL of two nearby rows is tiny (~1e-6 for a typical fine-tune) and a difference of
sums of terms ~1/row; in float32 its rounding error is ~1e-7, so mergekit's KL, computed in its merge
dtype, is off by 1-20 % in float32 and is noise in bfloat16. Here it is computed in float64 (a few
rows at a time), the scores |θ − b|·KL and the fence in float32 (RadixSelect's precision) whatever
the compute dtype, and the result b + (θ − b)·mask in the compute dtype. mergekit takes the quantiles
of a tensor of more than 10⁶ elements from a random sample of 10⁶ (with replacement); here they are
always the exact quantiles the sample estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, RowBlocks, TensorContext

if TYPE_CHECKING:
    import torch

#: mergekit's floor added to both softmaxes, so that log(p/q) stays finite.
SOFTMAX_FLOOR = 1e-8
#: The fence is median + FENCE·(q₃ − q₁) (Tukey's outlier fence, as mergekit sets it).
FENCE = 1.5
#: Elements per float64 chunk of rows while a block's KL is computed.
SCORE_CHUNK = 1 << 16


@dataclass(frozen=True)
class FusionStatistics:
    """What merging a block needs to know about the whole tensor."""

    #: The fence t, a float32 value (the scores are float32).
    threshold: float
    #: A 1-D tensor's KL over the whole vector (float64); None: each row has its own.
    kl: float | None


def _pair(
    tensors: list["torch.Tensor"], base: "torch.Tensor | None", dtype: "torch.dtype"
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(θ, b) in the compute dtype; a 0-d tensor as a vector of one element (its one row)."""
    if len(tensors) != 1 or base is None:
        raise RecipeError(
            f"method 'arcee_fusion' needs a base and exactly one other model, got {len(tensors)} model(s)"
            f"{'' if base is not None else ' and no base'}."
        )
    x, b = tensors[0].to(dtype), base.to(dtype)
    return (x.reshape(1), b.reshape(1)) if x.ndim == 0 else (x, b)


def _kl(x: "torch.Tensor", b: "torch.Tensor", log_norms: tuple[float, float] | None = None) -> "torch.Tensor":
    """Σ p·log(p/q) along the last dimension (keepdim), in float64, p = softmax(θ) + 1e-8 and q likewise;
    with ``log_norms`` (a 1-D tensor's log Σexp of θ and of b), the terms' sum over this part of it."""
    import torch

    x, b = x.double(), b.double()
    if log_norms is None:
        p, q = torch.softmax(x, dim=-1), torch.softmax(b, dim=-1)
    else:
        p, q = torch.exp(x - log_norms[0]), torch.exp(b - log_norms[1])
    p, q = p + SOFTMAX_FLOOR, q + SOFTMAX_FLOOR
    return (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def _scores(x: "torch.Tensor", b: "torch.Tensor", kl: float | None) -> "torch.Tensor":
    """|θ − b|·KL in float32, KL each row's or (1-D, given) the whole vector's; computed in float64 a
    chunk of rows (or of a vector's elements) at a time, so that the float64 temporaries stay small."""
    import torch

    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    width = x.shape[-1] if kl is None else 1  # a vector shares one KL: any chunk of it will do
    rows_x, rows_b, rows_out = (t.reshape(-1, width) for t in (x, b, out))
    step = max(1, SCORE_CHUNK // width)
    for start in range(0, rows_x.shape[0], step):
        xs, bs = rows_x[start : start + step].double(), rows_b[start : start + step].double()
        rows_out[start : start + step] = (xs - bs).abs() * (_kl(xs, bs) if kl is None else kl)
    return out


def _vector_kl(pairs: Callable[[], Iterator[tuple["torch.Tensor", "torch.Tensor"]]]) -> float:
    """KL(p‖q) of a 1-D tensor's softmaxes over the whole vector, from its blocks, in float64: first
    each input's max and Σexp(x − max) (combined across blocks), then Σ p·log(p/q)."""
    import torch

    top, total = [-math.inf, -math.inf], [0.0, 0.0]
    for pair in pairs():
        for i, v in enumerate(pair):
            m = max(top[i], float(v.max()))
            total[i] = total[i] * math.exp(top[i] - m) + float(torch.exp(v.double() - m).sum())
            top[i] = m
    log_norms = (top[0] + math.log(total[0]), top[1] + math.log(total[1]))
    return math.fsum(float(_kl(x, b, log_norms)) for x, b in pairs())


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "The base, taking the other model's changes only where |Δ|·KL is an outlier of the tensor."
    paper = "https://arcee.ai"
    when_to_use = (
        "Bringing the few changes that matter most from one fine-tune into its base, with no parameter "
        "to tune: per tensor, an element keeps the fine-tune's value only when its change, weighted by "
        "how far the row's softmax moved (KL), lies above the outlier fence median + 1.5·IQR of the "
        "tensor's scores; everything else stays the base's. Typically few elements pass, so the result "
        "stays close to the base. Exact semantics: [methods.md](../methods.md#arcee_fusion)."
    )
    base_model = "required"
    min_models = 1
    max_models = 1
    #: The fence is three order statistics of the whole tensor; given it, each element merges alone.
    mode = "blockwise"

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: MethodParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> FusionStatistics:  # type: ignore[override]
        """The fence from the exact quartiles of the scores (RadixSelect: two passes), and for a 1-D
        tensor first its whole-vector KL (two more passes)."""
        import torch

        from workbench_kernels.order_stats import RadixSelect

        def pairs() -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
            for rows in blocks.rows:
                yield _pair(*blocks.read(rows), ctx.compute_dtype)

        n = math.prod(blocks.shape)
        if n == 0:  # nothing to rank: the (empty) base
            return FusionStatistics(math.inf, None)
        kl = _vector_kl(pairs) if len(blocks.shape) < 2 else None
        select = RadixSelect([k * (n - 1) // 4 for k in (1, 2, 3)])  # ⌊q·(n − 1)⌋, q = ¼, ½, ¾
        for x, b in pairs():
            select.coarse(_scores(x, b, kl))
        select.start_fine()
        for x, b in pairs():
            select.fine(_scores(x, b, kl))
        q1, median, q3 = torch.tensor(select.values(), dtype=torch.float32)
        return FusionStatistics(float(median + FENCE * (q3 - q1)), kl)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: MethodParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        x, b = _pair(tensors, base, ctx.compute_dtype)
        if not b.numel():
            return b.to(ctx.out_dtype)
        stats: FusionStatistics = self.statistics(tensors, base, params, model_params, ctx)
        keep = _scores(x, b, stats.kl) >= stats.threshold
        return (b + (x - b) * keep).reshape(tensors[0].shape).to(ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(ArceeFusion)
