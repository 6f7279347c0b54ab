"""PCB-merging (Du et al., NeurIPS 2024, arXiv 2410.02396): weight each task vector's entries by
how much they matter to their own task and how much the other tasks agree, drop all but the top
entries, and average what is left with those weights.

This follows the released code (``pcb-merging.py::PCB_merge``, ``nlp_source_code/utils/merge_utils.py::
task_para_att_merge``, ``vision_source_code/pcb.py``), not the paper's formulas, which the reference
notes (methods.md section 6) only have from summaries ("exact typography unverified"). With task
vectors τᵢ = θᵢ − θ_base of the N models taking part, d entries each, sₓ[k] the k-th smallest
(0-based) entry of x and Norm(x) = (x − min x) / (max x − min x):

1. clip: |τ̃ᵢ| = clamp(|τᵢ|, s_|τᵢ|[⌊d q⌋], s_|τᵢ|[⌊d (1 − q) − 1⌋]), τ̃ᵢ = sign(τᵢ) |τ̃ᵢ|;
2. intra-balancing: exp(N · Norm(|τ̃ᵢ|)²) (the softmax denominator of the paper is not in the code);
3. inter-balancing: tanh(τᵢ ⊙ Σⱼ τⱼ) (``inter: sum``, reference and NLP code), or
   tanh(τᵢ ⊙ Σⱼ sign(τⱼ) Norm(|τ̃ⱼ|)) (``inter: normalized``, vision script); the paper's
   Σⱼ Softmax(Norm(τᵢ ⊙ τⱼ)) is not what the code computes;
4. βᵢ = intra ⊙ inter; drop and rescale: β̂ᵢ = Norm(max(βᵢ, s_βᵢ[⌊d (1 − r)⌋])), so entries at or
   below that order statistic become exactly 0 (d − ⌊d (1 − r)⌋ − 1 entries stay positive, barring
   ties: one fewer than the ⌈r d⌉ the notes' suggested test says);
5. θ = θ_base + λ Σᵢ wᵢ β̂ᵢ τ̃ᵢ / max(Σᵢ β̂ᵢ, 1e-12), wᵢ the per-task λᵢ of the released ES code.

Defaults: r = 0.1 (``pcb-merging.py``), q = 0.01 (the NLP and vision scripts that produced the
paper's numbers; ``pcb-merging.py`` uses 1e-4), λ = 1 (the paper tunes it, 0.8..2.2 for T5).

The released code flattens the whole model into one vector per task (``scope: global``, default):
the order statistics are then model-wide, found exactly by streaming passes over the inputs
(``kernels/order_stats.py``: four passes, a few histograms of memory) the first time a tensor is
merged, once per set of models with non-zero weight, after which merging is elementwise.
``scope: per_tensor`` takes them per tensor (each tensor is then its own "model"). Scores and
order statistics are float32 (the released code's dtype) whatever the compute dtype. Deviations,
both where the released code has no sensible answer: a weight of 0 removes the model entirely (in
the code λᵢ = 0 would still count in the consensus and the denominators), and where it divides 0
by 0 (a Norm over constant values) nothing is kept instead of NaN.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, PrepareContext, TensorContext

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint import CheckpointReader

#: Elements per block of the streaming statistics passes.
BLOCK_ELEMENTS = 1 << 22
#: The released code's floor on the sum of the kept scores.
DENOMINATOR_FLOOR = 1e-12


class PCBParameters(MethodParameters):
    pcb_ratio: float = Param(
        0.1,
        gt=0.0,
        le=1.0,
        per_layer=False,
        description=(
            "r: fraction of each task's entries kept (by balanced score); 0.1 in "
            "pcb-merging.py, 0.05 in the vision script, 0.05-0.2 in the NLP runs."
        ),
    )
    clip_ratio: float = Param(
        0.01,
        ge=0.0,
        lt=0.5,
        per_layer=False,
        description=(
            "q: |task vector| is clipped to its q and 1 - q quantiles first; "
            "0.01 in the NLP and vision scripts, 1e-4 in pcb-merging.py."
        ),
    )
    inter: Literal["sum", "normalized"] = Param(
        "sum",
        per_layer=False,
        description=(
            "Inter-balancing: tanh(tau_i * sum_j tau_j) ('sum', reference and NLP code) or "
            "with the sum of sign(tau_j) * Norm(|clipped tau_j|) ('normalized', vision script)."
        ),
    )
    scope: Literal["global", "per_tensor"] = Param(
        "global",
        per_layer=False,
        description=(
            "Rank entries over the whole model as the released code does ('global', "
            "extra streaming passes) or within each tensor ('per_tensor')."
        ),
    )
    scale: float = Param(
        1.0,
        alias="lambda",
        description="lambda: scale of the merged task vector (the NLP runs searched 0.8..2.2).",
    )


class PCBModelParameters(MethodParameters):
    weight: float = Param(
        1.0,
        description=(
            "lambda_i: scale of this model's clipped task vector in the weighted "
            "average (1.2 in the vision script); 0 leaves the model out entirely."
        ),
    )


@dataclass(frozen=True)
class TaskStats:
    """The order statistics of one task that the elementwise merge needs."""

    clip_lo: float
    clip_hi: float
    drop: float  # scores at or below this become 0
    top: float  # the largest score


def ranks(d: int, clip_ratio: float, pcb_ratio: float) -> tuple[int, int, int]:
    """0-based ranks of the lower clip, upper clip and drop threshold, computed as the released code does."""
    return int(d * clip_ratio), int(d * (1 - clip_ratio) - 1), int(d * (1 - pcb_ratio))


def _normalize_(x: "torch.Tensor", lo: float, hi: float) -> "torch.Tensor":
    """In place: min-max normalisation with known extremes; 0 where they coincide (the released code
    gives NaN there)."""
    return x.sub_(lo).mul_(1.0 / (hi - lo)) if hi > lo else x.zero_()


def task_vectors(
    tensors: Sequence["torch.Tensor"], base: "torch.Tensor", dtype: "torch.dtype"
) -> list["torch.Tensor"]:
    b = base.to(dtype)
    return [x.to(dtype) - b for x in tensors]


def scores(
    taus: Sequence["torch.Tensor"], clips: Sequence[tuple[float, float]], inter: str
) -> list["torch.Tensor"]:
    """Balanced scores βᵢ (float32) from unclipped task vectors and each task's clip bounds."""
    import torch

    n = len(taus)
    normed = [_normalize_(t.abs().clamp_(lo, hi), lo, hi) for t, (lo, hi) in zip(taus, clips)]
    if inter == "sum":
        consensus = torch.stack(list(taus)).sum(0) if n > 1 else taus[0]
    else:
        consensus = torch.stack([torch.sign(t).mul_(m) for t, m in zip(taus, normed)]).sum(0)
    return [m.square_().mul_(n).exp_().mul_(torch.mul(t, consensus).tanh_()) for t, m in zip(taus, normed)]


def merge_block(
    tensors: Sequence["torch.Tensor"],
    base: "torch.Tensor",
    weights: Sequence[float],
    stats: Sequence[TaskStats],
    params: PCBParameters,
    compute_dtype: "torch.dtype",
    betas: Sequence["torch.Tensor"] | None = None,
) -> "torch.Tensor":
    """θ_base + λ Σ wᵢ β̂ᵢ τ̃ᵢ / max(Σ β̂ᵢ, 1e-12) for the active models, given their statistics
    (and their scores, where the caller has them)."""
    import torch

    if betas is None:
        betas = scores(
            task_vectors(tensors, base, torch.float32), [(s.clip_lo, s.clip_hi) for s in stats], params.inter
        )
    b = base.to(compute_dtype)
    numerator = torch.zeros_like(b)
    denominator = torch.zeros_like(b)
    for x, beta, s, w in zip(tensors, betas, stats, weights):
        kept = _normalize_(beta.clamp(min=s.drop), s.drop, s.top).to(compute_dtype)
        tau = x.to(compute_dtype) - b
        clipped = torch.sign(tau).mul_(tau.abs_().clamp_(s.clip_lo, s.clip_hi))
        numerator.add_(clipped.mul_(kept), alpha=w)
        denominator.add_(kept)
    # Not in place: b may be the caller's base tensor itself (when it is already in the compute dtype).
    return torch.add(b, numerator.div_(denominator.clamp_(min=DENOMINATOR_FLOOR)), alpha=params.scale)


def tensor_stats(
    taus: Sequence["torch.Tensor"], params: PCBParameters
) -> tuple[list[TaskStats], list["torch.Tensor"]]:
    """``scope: per_tensor``: the statistics (and scores) of one whole tensor."""
    from workbench_kernels.order_stats import kth_smallest

    k_lo, k_hi, k_drop = ranks(taus[0].numel(), params.clip_ratio, params.pcb_ratio)
    clips = [(lo, hi) for lo, hi in (kth_smallest(t.abs(), [k_lo, k_hi]) for t in taus)]
    betas = scores(taus, clips, params.inter)
    stats = [
        TaskStats(lo, hi, kth_smallest(b, [k_drop])[0], float(b.max())) for (lo, hi), b in zip(clips, betas)
    ]
    return stats, betas


class GlobalStats:
    """Model-wide statistics per set of active models, computed once by streaming over the inputs."""

    def __init__(
        self,
        models: Sequence["CheckpointReader"],
        base: "CheckpointReader",
        names: Sequence[str],
        device: str,
    ) -> None:
        self.models, self.base, self.device = list(models), base, device
        self.names = [n for n in names if base.info(n).is_float and base.info(n).numel > 0]
        self.d = sum(base.info(n).numel for n in self.names)
        self._cache: dict[tuple[Any, ...], list[TaskStats]] = {}
        self._lock = threading.Lock()

    def get(self, active: tuple[int, ...], params: PCBParameters) -> list[TaskStats]:
        key = (active, params.clip_ratio, params.pcb_ratio, params.inter)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._compute(active, params)
            return self._cache[key]

    def _blocks(self, active: tuple[int, ...]) -> Iterator[list["torch.Tensor"]]:
        """Float32 task vectors of the active models, block by block over the whole model."""
        import torch

        for name in self.names:
            shape = self.base.info(name).shape
            numel = self.base.info(name).numel
            if len(shape) == 0 or shape[0] < 2 or numel <= BLOCK_ELEMENTS:
                spans: list[tuple[int, int] | None] = [None]
            else:
                step = max(1, BLOCK_ELEMENTS // (numel // shape[0]))
                spans = [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]
            for rows in spans:
                base = self.base.read(name, rows).to(self.device)
                yield task_vectors(
                    [self.models[i].read(name, rows).to(self.device) for i in active], base, torch.float32
                )

    def _compute(self, active: tuple[int, ...], params: PCBParameters) -> list[TaskStats]:
        from workbench_kernels.order_stats import RadixSelect

        k_lo, k_hi, k_drop = ranks(self.d, params.clip_ratio, params.pcb_ratio)
        clip_select = [RadixSelect([k_lo, k_hi]) for _ in active]
        for taus in self._blocks(active):
            for select, tau in zip(clip_select, taus):
                select.coarse(tau.abs())
        for select in clip_select:
            select.start_fine()
        for taus in self._blocks(active):
            for select, tau in zip(clip_select, taus):
                select.fine(tau.abs())
        clips = [(lo, hi) for lo, hi in (s.values() for s in clip_select)]
        drop_select = [RadixSelect([k_drop]) for _ in active]
        tops = [float("-inf")] * len(active)
        for taus in self._blocks(active):
            for i, (select, beta) in enumerate(zip(drop_select, scores(taus, clips, params.inter))):
                select.coarse(beta)
                tops[i] = max(tops[i], float(beta.max()))
        for select in drop_select:
            select.start_fine()
        for taus in self._blocks(active):
            for select, beta in zip(drop_select, scores(taus, clips, params.inter)):
                select.fine(beta)
        return [TaskStats(lo, hi, s.values()[0], top) for (lo, hi), s, top in zip(clips, drop_select, tops)]


class PCB(MergeMethod):
    name = "pcb"
    summary = (
        "PCB-merging: balance task vectors by intra- and inter-task "
        "importance, keep the top pcb_ratio, average with those weights."
    )
    paper = "https://arxiv.org/abs/2410.02396"
    when_to_use = (
        "Several task fine-tunes where both the importance of each entry within a task and the competition "
        "between tasks matter: it weights entries by intra- and inter-task balance instead of a hard sign "
        "election. Search lambda (0.8-2.2 in the paper's NLP runs) and pcb_ratio (0.05-0.2). "
        "Exact semantics: [methods.md](../methods.md#pcb)."
    )
    Parameters = PCBParameters
    ModelParameters = PCBModelParameters
    base_model = "required"
    # Per-tensor scope ranks within whole tensors; prepare() makes a global-scope instance elementwise.
    mode = "whole"

    def prepare(self, ctx: PrepareContext) -> GlobalStats | None:
        if ctx.params.values.scope != "global":
            return None
        assert ctx.base is not None
        # With model-wide statistics known up front, every step is elementwise: let the engine
        # feed row blocks (an instance attribute; the engine reads it after prepare).
        self.mode = "elementwise"
        return GlobalStats(ctx.models, ctx.base, ctx.tensor_names, ctx.device)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: PCBParameters,
        model_params: list[PCBModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        import torch

        assert base is not None
        active = tuple(i for i, p in enumerate(model_params) if p.weight != 0.0)
        if not active or params.scale == 0.0 or base.numel() == 0:
            return base.to(ctx.compute_dtype)
        inputs = [tensors[i] for i in active]
        betas = None
        if params.scope == "global":
            if not isinstance(ctx.state, GlobalStats):
                raise RuntimeError("pcb with scope 'global' needs its prepare() state")
            stats = ctx.state.get(active, params)
        else:
            stats, betas = tensor_stats(task_vectors(inputs, base, torch.float32), params)
        return merge_block(
            inputs, base, [model_params[i].weight for i in active], stats, params, ctx.compute_dtype, betas
        )


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(PCB)
