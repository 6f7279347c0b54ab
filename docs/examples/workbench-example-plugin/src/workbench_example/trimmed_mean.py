"""``trimmed_mean``: at each element, drop the most extreme models and average the rest.

At every element of a tensor the n models' values are sorted; the ``k = floor(trim * n)`` smallest
and the ``k`` largest are dropped and the weighted mean of the ``n - 2k`` values left is the output:

    out = sum(w_(i) * x_(i) for i in k..n-k-1) / sum(w_(i) for i in k..n-k-1)

where ``x_(i)`` is the i-th smallest value at that element and ``w_(i)`` the weight of the model it
came from. ``trim = 0`` is the weighted average (``linear``); with an odd n and
``k = (n - 1) // 2`` (e.g. 3 models and trim 0.34) it is the elementwise median.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from workbench.errors import RecipeError
from workbench.method import Param, PerModel, TensorContext, merge_function

if TYPE_CHECKING:  # torch is imported where tensors are touched, so listing methods stays cheap
    import torch


TRIM = (
    "Fraction of the models dropped at each end of every element's sorted values: "
    "k = floor(trim * n) lowest and k highest (0: the weighted average; just under 0.5 with an odd "
    "number of models: the median)."
)
WEIGHT = "This model's weight in the mean of the values kept at an element (dropped values do not count)."
WHEN_TO_USE = (
    "Several fine-tunes or checkpoints of one base where a few models may carry outlier values at some "
    "weights (a diverged run, a badly tuned fine-tune, an over-trained checkpoint): a plain average lets one "
    "outlier pull every element, a trimmed mean ignores the most extreme values element by element "
    "(coordinate-wise trimmed mean, Yin et al. 2018, 'Byzantine-Robust Distributed Learning'). It needs at "
    "least three models to trim anything; with trim 0 it is the weighted average (linear), with an odd number "
    "of models and the largest trim it is the elementwise median. Like linear it ignores the base model, and "
    "models trained from different initialisations must be aligned first. Because each element keeps "
    "values from different models, a trimmed mean is not a convex combination of whole models: check the "
    "merged model's quality, not only its loss."
)


def trimmed_count(trim: float, n: int) -> int:
    """How many models are dropped at each end: floor(trim * n), at most (n - 1) // 2 so one is left.

    A tiny tolerance keeps e.g. 0.3 * 10 (2.9999999999999996 in floating point) at 3."""
    return min(math.floor(trim * n + 1e-9), (n - 1) // 2)


@merge_function(
    "trimmed_mean",
    summary=(
        "Elementwise weighted trimmed mean: drop the floor(trim*n) "
        "lowest and highest models' values, average the rest."
    ),
    paper="https://arxiv.org/abs/1803.01498",
    when_to_use=WHEN_TO_USE,
    mode="elementwise",  # each output element depends only on the inputs at that element
)
def trimmed_mean(
    tensors: list[torch.Tensor],
    trim: float = Param(0.2, description=TRIM, ge=0.0, lt=0.5),
    weight: PerModel[float] = Param(1.0, description=WEIGHT, ge=0.0),
    *,
    ctx: TensorContext,
) -> torch.Tensor:
    import torch

    n = len(tensors)
    k = trimmed_count(trim, n)
    weights = torch.tensor(weight, dtype=ctx.compute_dtype, device=ctx.device)
    values = torch.stack([t.to(ctx.compute_dtype) for t in tensors])  # (n, *block shape)
    if k == 0:
        # nothing is dropped: the weighted average, without sorting
        shape = (n,) + (1,) * (values.dim() - 1)
        kept_weights = weights.reshape(shape).expand_as(values)
    else:
        # sort each element's n values (stable: ties keep recipe order, so the dropped model is
        # deterministic), keep ranks k..n-k-1 and the weights of the models they came from
        values, order = torch.sort(values, dim=0, stable=True)
        values = values[k : n - k]
        kept_weights = weights[order[k : n - k]]
        del order
    total = kept_weights.sum(dim=0)
    empty = total == 0
    if bool(empty.any()):
        first = ctx.offset + int(empty.reshape(-1).nonzero()[0])
        raise RecipeError(
            f"trimmed_mean: at {int(empty.sum())} element(s) of tensor '{ctx.name}' (the first at flat index "
            f"{first}) every model kept after trimming {k} from each end has weight 0, so there is nothing to "
            "average; give those models a positive weight or use a smaller trim."
        )
    out = (values * kept_weights).sum(dim=0) / total
    return out.to(ctx.out_dtype)
