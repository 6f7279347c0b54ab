"""SCE (arXiv 2408.07990: Select, Calculate, Erase), with mergekit 0.1.5's semantics (``sce``).

With task vectors τᵢ = θᵢ − θ_base of N models: **select** (only when ``select_topk`` < 1) keeps, in
every τᵢ alike, the k = ⌊select_topk · nonzero⌋ entries whose population variance across the models
is largest (nonzero: the entries of non-zero variance), where the models disagree most; **calculate**
gives model i the weight wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) of its selected task vector (1/N each when
that sum is below 1e-6); **erase** keeps, at each entry, the models whose sign is the sign of Σᵢ τᵢ
(+ where it is 0; zeros never agree). ``θ = θ_base + Σᵢ wᵢeᵢτᵢ / max(Σᵢ wᵢeᵢ, 1e-6)``.

The top-k and the weights are over the whole tensor, so the method is blockwise: a radix select
over the row blocks (two passes, a few histograms) finds the k-th largest variance, a third pass
counts the entries above it and the ties at it per row and sums τᵢ² per row (float64), and one block
is read again to place the tie cut: as in a stable sort, tied entries earlier in row-major order are
kept. Per-row sums added with ``math.fsum`` make the weights independent of the blocking. Each block
is then merged on its own. No per-model parameters: SCE weighs the models itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, RowBlocks, TensorContext
from workbench_plugins.methods._task_vectors import INT8_MASK

if TYPE_CHECKING:
    import torch

    from workbench_kernels.threshold import Threshold

#: mergekit's floor on each entry's divisor Σᵢ wᵢeᵢ (where no model agrees, the base is kept).
DIVISOR_FLOOR = 1e-6
#: mergekit: when Σⱼ mean(τⱼ²) is below this, every model gets the weight 1/N.
WEIGHT_SUM_FLOOR = 1e-6

_SELECT_TOPK = (
    "Fraction of the entries of non-zero variance across the models kept (largest variance first, in "
    "every task vector alike); 1 or more keeps every entry, 0 or less none (the result is the base)."
)


class SceParameters(MethodParameters):
    select_topk: float = Param(1.0, description=_SELECT_TOPK)
    int8_mask: bool = Param(False, description=INT8_MASK, per_layer=False)


@dataclass(frozen=True)
class SceStatistics:
    """One tensor's selection (None: every entry, ``select_topk`` ≥ 1) and the models' weights wᵢ."""

    keep: "Threshold | None"
    weights: list[float]


def _task_vectors(
    xs: list["torch.Tensor"], base: "torch.Tensor", dtype: "torch.dtype"
) -> tuple["torch.Tensor", list["torch.Tensor"]]:
    """(the base, the τᵢ), in the compute dtype, as mergekit computes them in its merge dtype."""
    b = base.to(dtype)
    return b, [x.to(dtype) - b for x in xs]


def _variance(taus: list["torch.Tensor"]) -> "torch.Tensor":
    """The population variance across the models at each entry, flat: computed in float64 and rounded
    once to float32, the precision the selection ranks at (equal float32 values are ties)."""
    import torch

    mean = taus[0].to(torch.float64, copy=True)
    for t in taus[1:]:
        mean.add_(t)
    mean /= len(taus)
    var = (taus[0] - mean).square_()
    for t in taus[1:]:
        var.add_((t - mean).square_())
    return var.div_(len(taus)).to(torch.float32).reshape(-1)


def _by_row(t: "torch.Tensor") -> "torch.Tensor":
    """A tensor (or row block) as (rows of dimension 0, the rest)."""
    return t.reshape(t.shape[0] if t.dim() else 1, -1)


def _row_sums(x: "torch.Tensor") -> "torch.Tensor":
    """Σ over each row of a 2-D tensor; a single row is summed as one of two, since torch may split a
    lone reduction across threads, but never the reduced dimension of several (same sums whatever the
    blocking)."""
    import torch

    return torch.cat([x, x]).sum(1)[:1] if x.shape[0] == 1 else x.sum(1)


def _squares(taus: list["torch.Tensor"], kept: "torch.Tensor | None") -> "torch.Tensor":
    """Σ τᵢ² over the kept entries of each row, per model (models x rows, float64)."""
    import torch

    sums = []
    for t in taus:
        sq = _by_row(t).to(torch.float64).square()
        sums.append(_row_sums(sq if kept is None else torch.where(kept, sq, 0.0)))
    return torch.stack(sums)


def _kept(var: "torch.Tensor", keep: "Threshold", offset: int) -> "torch.Tensor":
    """The selection in a block of flat variances starting at flat index ``offset``."""
    mask = var > keep.value
    stop = min(max(keep.cut - offset, 0), var.numel())  # tied entries below the cut are kept
    if stop > 0:
        mask[:stop] |= var[:stop] == keep.value
    return mask


_Variances = Callable[[tuple[int, int] | None], tuple[list["torch.Tensor"], "torch.Tensor"]]


def _kth_largest(blocks: RowBlocks, variances: _Variances, fraction: float) -> tuple[int, float]:
    """(k, the k-th largest variance) by a two-pass radix select; (0, inf) when k is 0."""
    import torch

    from workbench_kernels.order_stats import RadixSelect
    from workbench_kernels.sparsify import keep_count

    select, nonzero = RadixSelect([]), 0
    for rows in blocks.rows:
        var = variances(rows)[1]
        nonzero += int(torch.count_nonzero(var))
        select.coarse(var)
    k = keep_count(fraction, nonzero)
    if k == 0:
        return 0, math.inf
    select.ranks = [math.prod(blocks.shape) - k]  # k is known only after the coarse pass
    select.start_fine()
    for rows in blocks.rows:
        select.fine(variances(rows)[1])
    return k, select.values()[0]


def _select(
    blocks: RowBlocks, fraction: float, models: int, ctx: TensorContext
) -> tuple["Threshold", list[float]]:
    """The top-k of the variance as a threshold with a tie cut, and Σ τᵢ² of each selected τᵢ."""
    import torch

    from workbench_kernels.threshold import Threshold

    def variances(rows: tuple[int, int] | None) -> tuple[list["torch.Tensor"], "torch.Tensor"]:
        xs, base = blocks.read(rows)
        assert base is not None
        taus = _task_vectors(xs, base, ctx.compute_dtype)[1]
        return taus, _by_row(_variance(taus).view(base.shape))

    k, value = _kth_largest(blocks, variances, fraction)
    if k == 0:
        return Threshold.keep_none(), [0.0] * models
    above, tie_counts, above_sums, tie_sums = 0, [], [], []  # the last three: per row, block by block
    for rows in blocks.rows:
        taus, var = variances(rows)
        over, tied = var > value, var == value
        above += int(over.sum())
        tie_counts.append(tied.sum(1))
        above_sums.append(_squares(taus, over))
        tie_sums.append(_squares(taus, tied))
    j = k - above  # the tie at the cut, 1-based in row-major order (above < k <= above + ties)
    cumulative = torch.cumsum(torch.cat(tie_counts), 0)
    row = int(torch.searchsorted(cumulative, torch.tensor(j, device=cumulative.device)))
    j -= int(cumulative[row - 1]) if row else 0

    # the row holding the cut, from the one block holding it: its ties up to the j-th are kept
    block = next(r for r in blocks.rows if r is None or r[0] <= row < r[1])
    taus, var = variances(block)
    local = row - (block[0] if block else 0)
    tied = var[local : local + 1] == value
    at = int(torch.nonzero(tied[0])[j - 1])
    tied[0, at + 1 :] = False
    partial = _squares([_by_row(t)[local : local + 1] for t in taus], tied)[:, 0].tolist()

    over_rows, tie_rows = torch.cat(above_sums, 1).tolist(), torch.cat(tie_sums, 1).tolist()
    totals = [math.fsum([*a, *t[:row], p]) for a, t, p in zip(over_rows, tie_rows, partial)]
    return Threshold(value, row * var.shape[1] + at + 1), totals


def _weights(squares: list[float], numel: int) -> list[float]:
    """wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²), or 1/N where that sum is below mergekit's floor."""
    means = [s / max(numel, 1) for s in squares]
    total = sum(means)
    if abs(total) < WEIGHT_SUM_FLOOR:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


class Sce(MergeMethod):
    name = "sce"
    summary = (
        "SCE: keep the entries the models differ on most, weigh each model by its mean square, "
        "erase minority signs."
    )
    paper = "https://arxiv.org/abs/2408.07990"
    when_to_use = (
        "Fusing several fine-tunes of one base without tuning a weight per model: each task vector is "
        "weighted by its mean square, and TIES's sign election drops conflicting updates. select_topk "
        "below 1 keeps only the entries where the models differ most (their variance's top fraction); "
        "the default 1 keeps all, as in mergekit. Exact semantics: [methods.md](../methods.md#sce)."
    )
    Parameters = SceParameters
    base_model = "required"
    #: The variance top-k and the weights are over the whole tensor; given them, entries merge alone.
    mode = "blockwise"

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: SceParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> SceStatistics:  # type: ignore[override]
        """The selection and the weights, from passes over the row blocks (one without selection)."""
        numel = math.prod(blocks.shape)
        if params.select_topk < 1:
            keep, squares = _select(blocks, params.select_topk, len(model_params), ctx)
            return SceStatistics(keep, _weights(squares, numel))
        import torch

        sums = []
        for rows in blocks.rows:
            xs, base = blocks.read(rows)
            assert base is not None
            sums.append(_squares(_task_vectors(xs, base, ctx.compute_dtype)[1], None))
        return SceStatistics(None, _weights([math.fsum(s) for s in torch.cat(sums, 1).tolist()], numel))

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: SceParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        import torch

        from workbench_kernels.sparsify import agreeing, elect_sign

        assert base is not None
        stats: SceStatistics = self.statistics(tensors, base, params, model_params, ctx)
        if stats.keep is not None and stats.keep.value == math.inf:  # nothing selected: the base
            return base.to(ctx.out_dtype)
        b, taus = _task_vectors(tensors, base, ctx.compute_dtype)
        if stats.keep is not None:
            kept = _kept(_variance(taus), stats.keep, ctx.offset).view(b.shape)
            taus = [torch.where(kept, t, 0.0) for t in taus]
        positive = elect_sign(taus)
        merged, divisor = torch.zeros_like(b), torch.zeros_like(b)
        for t, w in zip(taus, stats.weights):
            erased = agreeing(t, positive).to(b.dtype) * w
            merged += t * erased
            divisor += erased
        return (b + merged / divisor.clamp(min=DIVISOR_FLOOR)).to(ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Sce)
