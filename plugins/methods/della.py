"""DELLA-Merging (arXiv 2406.11617), with mergekit 0.1.5's semantics (``della``, ``della_linear``).

Each task vector τᵢ = θᵢ − θ_base is pruned by MagPrune: an entry is kept at random with a
probability from density − ε (the smallest magnitude of its row) to density + ε (the largest), see
:mod:`workbench_kernels.della`. The kept entries are rescaled so that the task vector's L1 norm over
the whole tensor is unchanged (mergekit; or by 1/p per entry, the paper's rule, with
``rescale_mode: inverse_probability``), weighted, and then ``della`` merges them with TIES's sign
election and disjoint mean, ``della_linear`` sums them; the result is base + λ·merged.

Blockwise: the ranks are per row and the draws are counter-based, so a block of whole rows is pruned
on its own; only the L1 norms before and after pruning are over the whole tensor, gathered block by
block as statistics (a 1-D tensor split into blocks is one row: its keep probabilities are computed
over the whole vector first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import (
    MergeMethod,
    MethodParameters,
    Param,
    ParameterSet,
    RowBlocks,
    TensorContext,
    model_seed,
)
from workbench.params import varies
from workbench_plugins.methods._task_vectors import (
    INT8_MASK,
    LAMBDA,
    NORMALIZE_CONSENSUS,
    NORMALIZE_SUM,
    DensityModelParameters,
)
from workbench_plugins.methods._weights import refuse_zero_sums

if TYPE_CHECKING:
    import torch

_RESCALE = "Rescale each pruned task vector to make up for what was dropped (see rescale_mode)."
_RESCALE_MODE = (
    "How rescale restores a pruned task vector: 'l1' (mergekit) scales it so that its L1 norm over the"
    " tensor matches the original's; 'inverse_probability' (the DELLA paper) divides each kept entry by"
    " its keep probability."
)
_EPSILON = (
    "Half-width of the keep probabilities: from density - epsilon (a row's smallest magnitude) to"
    " density + epsilon (its largest); both must lie inside (0, 1)."
)


class DellaParameters(MethodParameters):
    scale: float = Param(1.0, alias="lambda", description=LAMBDA)
    normalize: bool = Param(True, description=NORMALIZE_CONSENSUS, per_layer=False)
    rescale: bool = Param(True, description=_RESCALE, per_layer=False)
    rescale_mode: Literal["l1", "inverse_probability"] = Param(
        "l1", description=_RESCALE_MODE, per_layer=False
    )
    int8_mask: bool = Param(False, description=INT8_MASK, per_layer=False)


class DellaLinearParameters(DellaParameters):
    normalize: bool = Param(False, description=NORMALIZE_SUM, per_layer=False)


class DellaModelParameters(DensityModelParameters):
    epsilon: float = Param(0.15, description=_EPSILON, ge=0.0, le=0.5)


@dataclass(frozen=True)
class DellaStatistics:
    """Per model: the L1 rescale factor over the whole tensor (1 where nothing is rescaled that way),
    and, for a 1-D tensor merged in blocks, its keep probabilities computed over the whole vector."""

    factors: tuple[float, ...]
    probabilities: tuple[torch.Tensor | None, ...] | None = None


class Della(MergeMethod):
    name = "della"
    summary = (
        "DELLA: prune each task vector at random, keeping large entries of each row more often, "
        "rescale, then merge with TIES sign consensus."
    )
    paper = "https://arxiv.org/abs/2406.11617"
    when_to_use = (
        "As dare_ties, when the fine-tunes' deltas carry their information in their largest entries: "
        "MagPrune keeps those more often than DARE's uniform drop (the paper: +2.4 points over DARE "
        "on average). mergekit's defaults: density 1 (set e.g. 0.5), epsilon 0.15, normalize and "
        "rescale on. Exact semantics: [methods.md](../methods.md#della)."
    )
    Parameters = DellaParameters
    ModelParameters = DellaModelParameters
    base_model = "required"
    mode = "blockwise"
    consensus = True

    def check_plan(
        self, params: ParameterSet, model_params: Sequence[ParameterSet], layer_count: int
    ) -> None:
        """density ± epsilon must lie in (0, 1) wherever entries are dropped: refused while planning."""
        from workbench_kernels.della import check_band

        if not self.consensus:
            refuse_zero_sums(self.name, params, model_params)
        for i, given in enumerate(model_params):
            names = given.tensor_names
            if not any(varies(given.raw.get(k)) for k in ("density", "epsilon")):
                names = names[:1]
            for name in names:
                values = given.at(name)
                try:
                    check_band(values.density, values.epsilon)  # type: ignore[attr-defined]
                except ValueError as exc:
                    raise RecipeError(f"{self.name}: model {i + 1}, tensor '{name}': {exc}.") from None

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: DellaParameters,
        model_params: list[DellaModelParameters],
        ctx: TensorContext,
    ) -> DellaStatistics:  # type: ignore[override]
        """The L1 norms of each task vector before and after pruning, summed over the row blocks."""

        from workbench_kernels.della import keep_probabilities, magprune
        from workbench_kernels.sparsify import l1_norm, rescale_from_norms

        pruned = [0.0 < m.density < 1.0 and m.weight != 0.0 for m in model_params]
        split_vector = len(blocks.shape) < 2 and blocks.rows[0] is not None
        probabilities: tuple[torch.Tensor | None, ...] | None = None
        if split_vector and any(pruned):
            xs, base = blocks.read(None)
            assert base is not None
            b = base.to(ctx.compute_dtype)
            probabilities = tuple(
                keep_probabilities(x.to(ctx.compute_dtype) - b, m.density, m.epsilon) if todo else None
                for x, m, todo in zip(xs, model_params, pruned)
            )
        l1 = params.rescale and params.rescale_mode == "l1"
        if not (l1 and any(pruned)):
            return DellaStatistics((1.0,) * len(model_params), probabilities)
        row = math.prod(blocks.shape[1:])
        before: list[list[float]] = [[] for _ in model_params]
        after: list[list[float]] = [[] for _ in model_params]
        for rows in blocks.rows:
            xs, base = blocks.read(rows)
            assert base is not None
            b = base.to(ctx.compute_dtype)
            start = 0 if rows is None else rows[0] * row
            for i, (x, m) in enumerate(zip(xs, model_params)):
                if not pruned[i]:
                    continue
                tau = x.to(ctx.compute_dtype) - b
                before[i].append(l1_norm(tau))
                p = None if probabilities is None else probabilities[i]
                if p is not None:
                    p = p[start : start + tau.numel()]
                seed = model_seed(ctx.seed, i)
                after[i].append(l1_norm(magprune(tau, m.density, m.epsilon, seed, start, probabilities=p)))
        factors = tuple(
            rescale_from_norms("l1", m.density, math.fsum(bf), math.fsum(af)) if todo else 1.0
            for m, todo, bf, af in zip(model_params, pruned, before, after)
        )
        return DellaStatistics(factors, probabilities)

    def apply(
        self,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: DellaParameters,
        model_params: list[DellaModelParameters],
        ctx: TensorContext,
    ) -> torch.Tensor:  # type: ignore[override]
        from workbench_kernels.della import magprune
        from workbench_kernels.sparsify import disjoint_merge, elect_sign

        assert base is not None
        stats: DellaStatistics = self.statistics(tensors, base, params, model_params, ctx)
        b = base.to(ctx.compute_dtype)
        inverse = params.rescale and params.rescale_mode == "inverse_probability"
        weighted, weights = [], []
        for i, (x, m) in enumerate(zip(tensors, model_params)):
            if m.weight == 0.0:
                continue  # contributes nothing, to the signs, the sums or the divisors
            p = None if stats.probabilities is None else stats.probabilities[i]
            if p is not None:
                p = p[ctx.offset : ctx.offset + b.numel()].view(b.shape)
            seed = model_seed(ctx.seed, i)
            tau = magprune(
                x.to(ctx.compute_dtype) - b,
                m.density,
                m.epsilon,
                seed,
                ctx.offset,
                inverse_probability=inverse,
                probabilities=p,
            )
            if stats.factors[i] != 1.0:
                tau.mul_(stats.factors[i])
            weighted.append(tau.mul_(m.weight) if m.weight != 1.0 else tau)
            weights.append(m.weight)
        if not weighted:
            return b.to(ctx.out_dtype, copy=True)
        if self.consensus:
            mixed = disjoint_merge(weighted, weights, elect_sign(weighted), params.normalize)
        else:
            mixed = weighted[0]
            for tau in weighted[1:]:
                mixed.add_(tau)
            if params.normalize:
                mixed.div_(sum(m.weight for m in model_params))
        if params.scale != 1.0:
            mixed.mul_(params.scale)
        return mixed.add_(b).to(ctx.out_dtype)


class DellaLinear(Della):
    name = "della_linear"
    summary = "DELLA without the sign election: MagPrune each task vector, rescale, add the weighted sum."
    when_to_use = (
        "As dare_linear with MagPrune's magnitude-aware drop: fine-tunes whose task vectors do not "
        "oppose each other, or a single one to sparsify. mergekit's defaults: rescale on, normalize "
        "off. Exact semantics: [methods.md](../methods.md#della_linear)."
    )
    Parameters = DellaLinearParameters
    consensus = False


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Della)
    register(DellaLinear)
