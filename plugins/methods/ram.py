"""Reinforced Agent Merging (RAM, arXiv 2601.13572), with mergekit 0.1.5's semantics (``ram`` and
``ramplus_tl``).

With task vectors τᵢ = θᵢ − θ_base, an entry counts for model i when |τᵢ| > ε; c is how many models
count at an element. RAM keeps an entry only one model changed whole, and averages the entries
several changed over those that did: ``θ = θ_base + Σᵢ τᵢ·[|τᵢ| > ε]·([c = 1] + [c > 1]/c)``. So no
shared change is diluted by models that left it alone, and no unique one by averaging.

RAM+ (tensor-local, ``ramplus_tl``) also boosts each model's unique entries by how much of its change
it shares: per model and tensor, ρᵢ = (its counted entries with c > 1) / max(its entries with c = 1,
ε) and λᵢ = 1 + r·clip(ρᵢ, 0, α), so ``θ = θ_base + Σᵢ τᵢ·[|τᵢ| > ε]·(λᵢ[c = 1] + [c > 1]/c)``. The
counts are over the whole tensor, gathered block by block before any block is merged (blockwise; the
counts are integers, so the blocking never changes them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, RowBlocks, TensorContext

if TYPE_CHECKING:
    import torch

_EPSILON = "An entry of a task vector counts as changed when its magnitude exceeds this."


class RamParameters(MethodParameters):
    epsilon: float = Param(1e-5, description=_EPSILON, ge=0.0)


class RamPlusParameters(MethodParameters):
    r: float = Param(0.1, description="How much a model's unique entries are boosted per unit of ρ.", ge=0.0)
    alpha: float = Param(0.2, description="The most ρ (shared over unique entries) that counts.", ge=0.0)
    epsilon: float = Param(1e-5, description=_EPSILON, ge=0.0)


def _masks(
    tensors: list["torch.Tensor"], base: "torch.Tensor", epsilon: float, dtype: "torch.dtype"
) -> tuple[list["torch.Tensor"], list["torch.Tensor"], "torch.Tensor"]:
    """(task vectors, their 'changed' masks, the count of models that changed each element)."""
    b = base.to(dtype)
    taus = [x.to(dtype) - b for x in tensors]
    changed = [tau.abs() > epsilon for tau in taus]
    counts = changed[0].to(dtype)
    for mask in changed[1:]:
        counts = counts + mask
    return taus, changed, counts


def _merge(
    base: "torch.Tensor",
    tensors: list["torch.Tensor"],
    epsilon: float,
    boosts: list[float],
    ctx: TensorContext,
) -> "torch.Tensor":
    """base + Σᵢ τᵢ·changedᵢ·(boostᵢ[c = 1] + [c > 1]/c), in the compute dtype, evaluated as
    (1 − Σᵢ kᵢ)·base + Σᵢ kᵢ·θᵢ with kᵢ that coefficient: the same sum, and exact where one model (or
    two identical ones) is taken whole."""
    import torch

    _, changed, counts = _masks(tensors, base, epsilon, ctx.compute_dtype)
    unique, shared = counts == 1, counts > 1
    share = 1.0 / counts.clamp(min=1)
    merged = torch.zeros_like(counts)
    total = torch.zeros_like(counts)
    for x, mask, boost in zip(tensors, changed, boosts):
        k = torch.where(mask & unique, boost, 0.0) + torch.where(mask & shared, share, 0.0)
        merged += k * x.to(ctx.compute_dtype)
        total += k
    return ((1 - total) * base.to(ctx.compute_dtype) + merged).to(ctx.out_dtype)


def _ratio(shared: int, unique: float) -> float:
    """ρ = shared / unique; with epsilon 0 and no unique entry, ∞ (clipped to alpha) or, when the model
    changed nothing either, 0 (it then has no unique entry to boost, so its λ does not matter)."""
    if unique > 0:
        return shared / unique
    return math.inf if shared else 0.0


class Ram(MergeMethod):
    name = "ram"
    summary = (
        "Task vectors merged entry by entry: a change one model made is kept whole, shared ones averaged."
    )
    paper = "https://arxiv.org/abs/2601.13572"
    when_to_use = (
        "Several fine-tunes of one base that changed mostly different weights (agents for different "
        "tools or skills): unlike task arithmetic it does not add up shared changes, and unlike an "
        "average it does not dilute a change only one model made. Tune epsilon to the size of changes "
        "that are noise. Exact semantics: [methods.md](../methods.md#ram)."
    )
    Parameters = RamParameters
    base_model = "required"
    mode = "elementwise"

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: RamParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        assert base is not None
        return _merge(base, tensors, params.epsilon, [1.0] * len(tensors), ctx)


class RamPlus(MergeMethod):
    name = "ramplus_tl"
    summary = (
        "RAM with each model's unique changes boosted by the share of its changes other models made too."
    )
    paper = "https://arxiv.org/abs/2601.13572"
    when_to_use = (
        "As ram, when the models also share much of their change: a model whose change overlaps the "
        "others' gets its own unique entries scaled up by up to 1 + r·alpha, making up for what "
        "averaging the shared ones took away. Tensor-local: the counts are per tensor, as in mergekit. "
        "Exact semantics: [methods.md](../methods.md#ramplus_tl)."
    )
    Parameters = RamPlusParameters
    base_model = "required"
    #: ρ counts entries over the whole tensor; given the boosts, each element merges on its own.
    mode = "blockwise"

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: RamPlusParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> list[float]:  # type: ignore[override]
        """λᵢ per model, from its shared and unique counted entries over the whole tensor."""
        shared_total: list[int] = []
        unique_total: list[int] = []
        for rows in blocks.rows:
            xs, base = blocks.read(rows)
            assert base is not None
            _, changed, counts = _masks(xs, base, params.epsilon, ctx.compute_dtype)
            shared = [int((mask & (counts > 1)).sum()) for mask in changed]
            unique = [int((mask & (counts == 1)).sum()) for mask in changed]
            shared_total = [a + b for a, b in zip(shared_total, shared)] if shared_total else shared
            unique_total = [a + b for a, b in zip(unique_total, unique)] if unique_total else unique
        return [
            1.0 + params.r * min(_ratio(s, max(u, params.epsilon)), params.alpha)
            for s, u in zip(shared_total, unique_total)
        ]

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: RamPlusParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        assert base is not None
        boosts = self.statistics(tensors, base, params, model_params, ctx)
        return _merge(base, tensors, params.epsilon, boosts, ctx)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Ram)
    register(RamPlus)
