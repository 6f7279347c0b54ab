"""The whole TIES / DARE / breadcrumbs merge of one tensor: ``base + scale * merge(sparsified,
weighted task vectors)``, from the primitives of :mod:`workbench_kernels.sparsify`.

:func:`merge_task_vectors_reference` is the plain definition (every sparsified task vector held at
once); :func:`merge_task_vectors_torch` streams: it holds one task vector at a time, plus the
accumulators, and recomputes the sparsified vectors in a second pass where the sign election needs
them (masks and scale factors are deterministic, so both passes see identical values).
:func:`plan_fused` resolves every model's keep rule and rescale factor over the whole tensor for the
fused kernel (:mod:`workbench_kernels.ties`), and :func:`merge_task_vectors` dispatches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workbench_kernels import implementation
from workbench_kernels.blocks import Blocks
from workbench_kernels.sparsify import (
    SparsifyPlan,
    TaskVector,
    agreeing,
    disjoint_merge,
    elect_sign,
    keep_count,
    replay_sparsify,
    rescale_from_norms,
    sparsify,
    sparsify_planned,
    task_vector,
    weighted_in_place,
)

if TYPE_CHECKING:
    from workbench_kernels.ties import Keep, Rule


def _check(tensors: Sequence[torch.Tensor], base: torch.Tensor, specs: Sequence[TaskVector]) -> None:
    if len(tensors) != len(specs):
        raise ValueError(f"merge_task_vectors got {len(tensors)} tensors but {len(specs)} task-vector specs")
    for i, x in enumerate(tensors):
        if x.shape != base.shape:
            raise ValueError(
                f"merge_task_vectors: tensor {i} has shape {list(x.shape)}, base has {list(base.shape)}"
            )


def _linear_divisor(specs: Sequence[TaskVector], normalize: bool) -> float:
    total = sum(s.weight for s in specs)
    if normalize and total == 0:
        raise ValueError("the weights sum to 0, so they cannot be normalised")
    return total if normalize else 1.0


def merge_task_vectors_reference(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    specs: Sequence[TaskVector],
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The definition: every weighted, sparsified task vector in memory at once.

    ``consensus``: TIES sign election and disjoint merge; else a plain sum, divided by the sum of
    the weights when ``normalize``. Models with weight 0 are skipped entirely.
    """
    _check(tensors, base, specs)
    base_c = base.to(compute_dtype)
    active = [(x, s) for x, s in zip(tensors, specs) if s.weight != 0.0]
    if not active:
        return base_c.clone()
    weighted = [weighted_in_place(sparsify(task_vector(x, base_c), s), s.weight) for x, s in active]
    if consensus:
        mixed = disjoint_merge(weighted, [s.weight for _, s in active], elect_sign(weighted), normalize)
    else:
        mixed = weighted[0].clone()
        for d in weighted[1:]:
            mixed.add_(d)
        divisor = _linear_divisor([s for _, s in active], normalize)
        if divisor != 1.0:
            mixed.div_(divisor)
    if scale != 1.0:
        mixed.mul_(scale)
    return mixed.add_(base_c)


def merge_task_vectors_torch(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    specs: Sequence[TaskVector],
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Streaming: one task vector in flight; the sign election costs a second pass, not N copies.

    Memory (compute dtype): the base, one task vector, one accumulator, and with ``consensus`` a
    divisor and a 1-byte sign mask. Bit-identical to the reference.
    """
    _check(tensors, base, specs)
    out_dtype = out_dtype or compute_dtype
    base_c = base.to(compute_dtype)
    active = [(x, s) for x, s in zip(tensors, specs) if s.weight != 0.0]
    if not active:
        return base_c.to(out_dtype, copy=True)
    plans: list[SparsifyPlan] = []
    acc: torch.Tensor | None = None
    for x, s in active:  # pass 1: the sum (sign mass, or the result itself without consensus)
        tau, plan = sparsify_planned(task_vector(x, base_c), s)
        plans.append(plan)
        d = weighted_in_place(tau, s.weight)
        acc = d if acc is None else acc.add_(d)
        del tau, d
    assert acc is not None
    if consensus:
        positive = acc >= 0
        acc.zero_()
        divisor = torch.zeros_like(acc)
        for (x, s), plan in zip(active, plans):  # pass 2: recompute, keep what agrees
            d = weighted_in_place(replay_sparsify(task_vector(x, base_c), s, plan), s.weight)
            agree = agreeing(d, positive)
            acc.add_(d.masked_fill_(agree.logical_not(), 0.0))
            divisor.add_(agree, alpha=s.weight)
            del d, agree
        del positive
        if normalize:
            acc.div_(divisor.masked_fill_(divisor == 0, 1.0))
        del divisor
    else:
        divisor_total = _linear_divisor([s for _, s in active], normalize)
        if divisor_total != 1.0:
            acc.div_(divisor_total)
    if scale != 1.0:
        acc.mul_(scale)
    return acc.add_(base_c).to(out_dtype)


@dataclass(frozen=True)
class FusedMerge:
    """A merge the fused kernel (:mod:`workbench_kernels.ties`) runs, with every model's keep rule
    and rescale factor resolved over the whole tensor, so that each block of the tensor can then be
    merged on its own (``offset``: the flat index of the block's first element)."""

    models: tuple[int, ...]  # the models with a non-zero weight, in order
    keeps: tuple[Keep, ...]
    rule: Rule
    consensus: bool
    normalize: bool
    scale: float

    def __call__(
        self, base: torch.Tensor, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype, offset: int = 0
    ) -> torch.Tensor:
        from workbench_kernels.ties import ties_merge_numba, ties_merge_torch, ties_merge_triton

        run = {"triton": ties_merge_triton, "numba": ties_merge_numba}.get(
            implementation(base.device), ties_merge_torch
        )
        return run(
            base,
            [tensors[i] for i in self.models],
            self.keeps,
            self.rule,
            consensus=self.consensus,
            normalize=self.normalize,
            scale=self.scale,
            out_dtype=out_dtype,
            offset=offset,
        )


def plan_fused(
    blocks: Blocks,
    specs: Sequence[TaskVector],
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> FusedMerge | None:
    """The keep rules of the fused kernel from a tensor given block by block (thresholds and L1
    norms gathered from the blocks), or None where it does not apply: the reference forced, a
    compute dtype other than float32, no model with a weight, two-sided bands (breadcrumbs) or
    mixed rules; those take :func:`merge_task_vectors` on whole tensors."""
    from workbench_kernels.dare import RESOLUTION, keep_below
    from workbench_kernels.threshold import Threshold, topk_thresholds_blocks
    from workbench_kernels.ties import Keep, l1_norms

    models = tuple(i for i, s in enumerate(specs) if s.weight != 0.0)
    active = [specs[i] for i in models]
    rules = {"random" if s.sparsify == "random" else "magnitude" for s in active}
    base = blocks.load(0)[1]
    assert base is not None
    if compute_dtype != torch.float32 or implementation(base.device) == "reference" or len(rules) != 1:
        return None
    if any(
        s.sparsify == "magnitude"
        and (s.gamma > 0 and s.density < 1 or s.band is not None and s.band.hi != math.inf)
        for s in active
    ):
        return None
    if not consensus:
        _linear_divisor(active, normalize)  # a zero sum of weights is an error
    rule: Rule = rules.pop()  # type: ignore[assignment]
    n = blocks.numel
    blocks = blocks.select(models)
    masked = [s.sparsify != "none" and s.density < 1 or s.band is not None for s in active]
    if rule == "magnitude":
        own = [i for i, s in enumerate(active) if s.band is None]
        computed = iter(
            topk_thresholds_blocks(
                blocks.select(own), [keep_count(active[i].density, n) if masked[i] else n for i in own]
            )
        )
        thresholds = [next(computed) if s.band is None else Threshold(s.band.lo, n) for s in active]
        keeps = [Keep(s.weight, threshold=t.value, cut=t.cut) for s, t in zip(active, thresholds)]
    else:
        keeps = [
            Keep(s.weight, seed=s.seed, keep_below=keep_below(s.density) if m else RESOLUTION)
            for s, m in zip(active, masked)
        ]
    norms = (
        l1_norms(blocks, keeps, rule)
        if any(s.rescale == "l1" and m for s, m in zip(active, masked))
        else [(0.0, 0.0)] * len(active)
    )
    factors = [
        rescale_from_norms(s.rescale, s.density, *l1) if m else 1.0 for s, m, l1 in zip(active, masked, norms)
    ]
    keeps = [dataclasses.replace(k, factor=f) for k, f in zip(keeps, factors)]
    return FusedMerge(models, tuple(keeps), rule, consensus, normalize, scale)


def merge_task_vectors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    specs: Sequence[TaskVector],
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dispatch on the base's device: the reference where forced; the fused kernel (Numba, Triton or torch)
    where it applies (see :func:`plan_fused`); otherwise the streaming torch path."""
    if implementation(base.device) == "reference":
        result = merge_task_vectors_reference(
            base,
            tensors,
            specs,
            consensus=consensus,
            normalize=normalize,
            scale=scale,
            compute_dtype=compute_dtype,
        )
        return result.to(out_dtype or compute_dtype)
    _check(tensors, base, specs)
    fused = plan_fused(
        Blocks.whole(tensors, base),
        specs,
        consensus=consensus,
        normalize=normalize,
        scale=scale,
        compute_dtype=compute_dtype,
    )
    if fused is None:
        return merge_task_vectors_torch(
            base,
            tensors,
            specs,
            consensus=consensus,
            normalize=normalize,
            scale=scale,
            compute_dtype=compute_dtype,
            out_dtype=out_dtype,
        )
    return fused(base, tensors, out_dtype or compute_dtype)
