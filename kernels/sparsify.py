"""Task-vector primitives: sparsify (by magnitude or at random), elect signs, merge disjointly.

The building blocks of TIES, DARE and Model Breadcrumbs, with mergekit's semantics
(``mergekit/sparsify.py`` and ``generalized_task_arithmetic.py``), written so that results are exact
and reproducible:

* magnitude thresholds are exact order statistics (``kthvalue``), computed by
  :func:`magnitude_band` separately from :func:`band_mask`, which applies them; a threshold computed
  elsewhere (e.g. over the whole model) can therefore replace the per-tensor one;
* per tensor, exactly k entries are kept, as mergekit's argsort keeps them; where magnitudes tie at
  a threshold (common in bf16 task vectors), the earlier entry in row-major order ranks higher, as
  in a stable sort, rather than mergekit's arbitrary pick among the tied ones. A band computed over
  the whole model keeps every entry tied with its threshold (the TIES paper's ``>=`` rule);
* random masks come from a counter-based generator keyed per tensor and per model
  (:mod:`workbench_kernels.dare`), so they do not depend on the thread count, the device or the
  scheduling;
* the L1 norms of the rescaling are summed in float64 over fixed blocks and combined with
  ``math.fsum``, since torch's multi-threaded reductions round differently with 1 and 2 threads.

:func:`merge_task_vectors_reference` is the plain definition (every sparsified task vector held at
once); :func:`merge_task_vectors_torch` streams: it holds one task vector at a time, plus the
accumulators, and recomputes the sparsified vectors in a second pass where the sign election needs
them (masks and scale factors are deterministic, so both passes see identical values).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from workbench_kernels import implementation
from workbench_kernels.blocks import Blocks

if TYPE_CHECKING:
    from workbench_kernels.ties import Keep, Rule

Sparsification = Literal["none", "magnitude", "random"]
RescaleMode = Literal["l1", "inverse_density"]

#: mergekit's guard (``rescaled_masked_tensor``): below this L1 norm a delta is not rescaled.
RESCALE_EPS = 1e-7
#: Elements per partial sum of :func:`l1_norm`: under torch's 32768-element grain size, so each
#: partial sum is computed by one thread, in the same order whatever the thread count.
L1_BLOCK = 1 << 14


@dataclass(frozen=True)
class MagnitudeBand:
    """Keep the entries with ``lo <= |x| <= hi``.

    ``lo_ties`` / ``hi_ties``: which of the entries equal to ``lo`` / ``hi`` are kept, as a range
    ``[start, stop)`` of their ordinals in row-major order; None keeps them all.
    """

    lo: float
    hi: float = math.inf
    lo_ties: tuple[int, int] | None = None
    hi_ties: tuple[int, int] | None = None

    @property
    def keeps_all(self) -> bool:
        return self.lo == -math.inf and self.hi == math.inf

    @property
    def keeps_none(self) -> bool:
        return self.lo > self.hi


KEEP_ALL = MagnitudeBand(-math.inf, math.inf)
KEEP_NONE = MagnitudeBand(math.inf, -math.inf)


@dataclass(frozen=True)
class TaskVector:
    """How one model's task vector is sparsified and weighted."""

    weight: float
    density: float = 1.0
    sparsify: Sparsification = "none"
    #: Fraction of the largest magnitudes dropped as outliers (breadcrumbs); 0 for TIES.
    gamma: float = 0.0
    #: None: no rescaling after sparsifying.
    rescale: RescaleMode | None = None
    #: Seed of the random mask (``sparsify="random"``).
    seed: int = 0
    #: With ``sparsify="magnitude"``: a threshold computed beforehand (e.g. model-wide) instead of
    #: this tensor's own top-k.
    band: MagnitudeBand | None = None


# --------------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------------


def keep_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, as mergekit's ``int(density * numel)``, but robust to float
    artefacts: 0.29 * 100 is 28.999999999999996 in floating point, and must keep 29."""
    return min(n, max(0, math.floor(round(fraction * n, 6))))


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    """|x| flattened, in at least float32 (exact for half types; ``kthvalue`` needs it on CPU)."""
    w = x.detach().reshape(-1).abs()
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The exact k-th largest value (1-based) of a flat tensor."""
    n = magnitudes.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} is out of range for {n} values")
    return float(torch.kthvalue(magnitudes, n - k + 1).values)


def magnitude_band(tau: torch.Tensor, density: float, gamma: float = 0.0) -> MagnitudeBand:
    """The magnitude thresholds of one task vector (compute only; :func:`band_mask` applies them).

    Keeps exactly ``k = floor(density * n)`` entries: with ``gamma = 0`` (TIES) the k largest; with
    ``gamma > 0`` (breadcrumbs) the ``n_top = floor(gamma * n)`` largest are dropped first and the
    next k kept, ``n_top`` being cut down when ``n_top + k > n`` (mergekit's rule). The band's bounds
    are the ``(n_top + k)``-th and the ``(n_top + 1)``-th largest magnitudes; among entries tied with
    a bound, the earlier ones rank higher (a stable sort by decreasing magnitude, ranks ``n_top`` to
    ``n_top + k - 1`` kept). ``density >= 1`` keeps everything (gamma ignored, as in mergekit);
    ``k = 0`` keeps nothing.
    """
    n = tau.numel()
    if density >= 1.0 or n == 0:
        return KEEP_ALL
    k = keep_count(density, n)
    if k == 0:
        return KEEP_NONE
    n_top = min(keep_count(gamma, n), n - k)
    w = _magnitudes(tau)
    lo = kth_largest(w, n_top + k)
    above_lo = int((w > lo).sum())
    if n_top == 0:
        return MagnitudeBand(lo, math.inf, lo_ties=(0, k - above_lo))
    hi = kth_largest(w, n_top + 1)
    above_hi = int((w > hi).sum())
    if lo == hi:  # every kept entry has this one magnitude: ranks n_top .. n_top + k - 1 among the ties
        return MagnitudeBand(lo, hi, lo_ties=(n_top - above_hi, n_top + k - above_hi))
    return MagnitudeBand(
        lo, hi, lo_ties=(0, n_top + k - above_lo), hi_ties=(n_top - above_hi, int((w == hi).sum()))
    )


def model_band(
    stream: Callable[[], Iterable[torch.Tensor]], density: float, gamma: float = 0.0
) -> MagnitudeBand:
    """:func:`magnitude_band` over a whole model: one band for a task vector streamed tensor by tensor.

    ``stream()`` must yield the same values each time it is called; it is called twice (a counting
    pass and a refining pass of the exact radix select), so memory stays a few histograms.
    """
    from workbench_kernels.order_stats import RadixSelect

    if density >= 1.0:
        return KEEP_ALL
    select = RadixSelect([])
    for tau in stream():
        select.coarse(_magnitudes(tau))
    n = select.count
    k = keep_count(density, n)
    if n == 0 or k == 0:
        return KEEP_NONE
    n_top = min(keep_count(gamma, n), n - k)
    # Ascending ranks (0-based) of the k-th and the (n_top + 1)-th largest magnitudes.
    select.ranks = [n - n_top - k] + ([n - n_top - 1] if n_top > 0 else [])
    select.start_fine()
    for tau in stream():
        select.fine(_magnitudes(tau))
    values = select.values()
    return MagnitudeBand(values[0], values[1] if n_top > 0 else math.inf)


def band_mask(tau: torch.Tensor, band: MagnitudeBand) -> torch.Tensor | None:
    """Boolean mask of the entries inside the band; None when it keeps everything."""
    if band.keeps_all:
        return None
    if band.keeps_none:
        return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
    w = tau.detach().abs()
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()  # compare a threshold computed elsewhere without rounding it to 8 bits
    mask = (w >= band.lo if band.lo_ties is None else w > band.lo).contiguous()
    if band.hi != math.inf:
        mask &= w <= band.hi if band.hi_ties is None else w < band.hi
    for value, ties in ((band.lo, band.lo_ties), (band.hi, band.hi_ties)):
        if ties is not None:
            _keep_ties(mask, w, value, *ties)
    return mask


def _keep_ties(mask: torch.Tensor, w: torch.Tensor, value: float, start: int, stop: int) -> None:
    """Set ``mask`` at the entries equal to ``value`` whose ordinal (row-major) is in [start, stop)."""
    if stop <= start:
        return
    positions = torch.nonzero((w == value).reshape(-1)).squeeze(1)[start:stop]
    mask.view(-1)[positions] = True


def random_mask(
    shape: Sequence[int], density: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bernoulli(density) keep-mask from the counter-based generator of :mod:`workbench_kernels.dare`:
    a function of (seed, shape, density) only, identical on every device and thread count."""
    from workbench_kernels.dare import keep_mask

    return keep_mask(tuple(shape), density, seed, device)


def l1_norm(x: torch.Tensor) -> float:
    """sum |x| in float64, bit-identical whatever the CPU thread count (see ``L1_BLOCK``)."""
    flat = x.detach().reshape(-1)
    if flat.device.type != "cpu":
        return float(flat.abs().sum(dtype=torch.float64))
    return math.fsum(
        float(flat[s : s + L1_BLOCK].abs().sum(dtype=torch.float64)) for s in range(0, flat.numel(), L1_BLOCK)
    )


def rescale_factor(tau: torch.Tensor, kept: torch.Tensor, mode: RescaleMode, density: float) -> float:
    """Factor restoring the size of a sparsified task vector.

    ``l1`` (mergekit): ``||tau||_1 / ||kept||_1``, or 1 when either is below ``RESCALE_EPS``.
    ``inverse_density`` (the DARE paper): ``1 / density``, which keeps the expectation unbiased
    (1 when density is 0: nothing is left to scale).
    """
    return _factor(mode, density, l1_norm(tau) if mode == "l1" else 0.0, kept)


def _factor(mode: RescaleMode | None, density: float, l1_before: float, kept: torch.Tensor) -> float:
    return _rescale(mode, density, l1_before, l1_norm(kept) if mode == "l1" else 0.0)


def _rescale(mode: RescaleMode | None, density: float, l1_before: float, l1_after: float) -> float:
    """The rescale factor from the L1 norms before and after sparsifying (see :func:`rescale_factor`)."""
    if mode is None:
        return 1.0
    if mode == "inverse_density":
        return 1.0 / density if density > 0 else 1.0
    if l1_before < RESCALE_EPS or l1_after < RESCALE_EPS:
        return 1.0
    return l1_before / l1_after


def elect_sign(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election by total mass, as mergekit's ``sum`` consensus: True (+) where the sum
    of the weighted, sparsified task vectors is >= 0, False (-) where it is negative. A zero sum
    elects +; the TIES paper's code gives those the sign elected at most other elements."""
    total = weighted[0].clone()
    for d in weighted[1:]:
        total.add_(d)
    return total >= 0


def agreeing(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Entries whose sign is the elected one; zeros never agree (so they are not counted)."""
    return torch.where(positive, delta > 0, delta < 0)


def disjoint_merge(
    weighted: Sequence[torch.Tensor], weights: Sequence[float], positive: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """Sum of the agreeing entries; divided, when ``normalize``, by the summed weights of the models
    that agree at each element (mergekit; with equal weights the TIES paper's disjoint mean), or
    by 1 where that sum is 0."""
    total = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0])
    for d, w in zip(weighted, weights):
        agree = agreeing(d, positive)
        total.add_(torch.where(agree, d, 0.0))
        divisor.add_(agree, alpha=w)
    if normalize:
        total.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return total


# --------------------------------------------------------------------------------------------------
# One task vector
# --------------------------------------------------------------------------------------------------


def task_vector(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``x - base`` in ``base``'s dtype (the compute dtype), without a converted copy of ``x``."""
    if torch.promote_types(x.dtype, base.dtype) == base.dtype:
        return torch.sub(x, base)
    return x.to(base.dtype).sub_(base)


@dataclass(frozen=True)
class _Plan:
    """What pass 1 decided for one task vector, so that pass 2 reproduces it without recomputing."""

    band: MagnitudeBand | None
    factor: float


def _keep_mask(tau: torch.Tensor, spec: TaskVector, band: MagnitudeBand | None) -> torch.Tensor | None:
    if spec.sparsify == "magnitude":
        return band_mask(tau, band if band is not None else KEEP_ALL)
    if spec.sparsify == "random" and spec.density < 1.0:
        return random_mask(tau.shape, spec.density, spec.seed, tau.device)
    return None


def _sparsify(tau: torch.Tensor, spec: TaskVector) -> tuple[torch.Tensor, _Plan]:
    band = None
    if spec.sparsify == "magnitude":
        band = spec.band if spec.band is not None else magnitude_band(tau, spec.density, spec.gamma)
    mask = _keep_mask(tau, spec, band)
    if mask is None:
        return tau, _Plan(band, 1.0)
    before = l1_norm(tau) if spec.rescale == "l1" else 0.0
    kept = tau.masked_fill_(mask.logical_not_(), 0.0)
    factor = _factor(spec.rescale, spec.density, before, kept)
    return (kept.mul_(factor) if factor != 1.0 else kept), _Plan(band, factor)


def sparsify(tau: torch.Tensor, spec: TaskVector) -> torch.Tensor:
    """The sparsified, rescaled task vector (unweighted); ``tau`` is modified in place."""
    return _sparsify(tau, spec)[0]


def _replay(tau: torch.Tensor, spec: TaskVector, plan: _Plan) -> torch.Tensor:
    """:func:`sparsify` again from pass 1's plan (pass 2): the same mask, the same values."""
    mask = _keep_mask(tau, spec, plan.band)
    if mask is None:
        return tau
    tau.masked_fill_(mask.logical_not_(), 0.0)
    return tau.mul_(plan.factor) if plan.factor != 1.0 else tau


def _weighted(tau: torch.Tensor, weight: float) -> torch.Tensor:
    return tau.mul_(weight) if weight != 1.0 else tau


# --------------------------------------------------------------------------------------------------
# Whole merge: base + scale * merge(sparsified weighted task vectors)
# --------------------------------------------------------------------------------------------------


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
    weighted = [_weighted(sparsify(task_vector(x, base_c), s), s.weight) for x, s in active]
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
    plans: list[_Plan] = []
    acc: torch.Tensor | None = None
    for x, s in active:  # pass 1: the sum (sign mass, or the result itself without consensus)
        tau, plan = _sparsify(task_vector(x, base_c), s)
        plans.append(plan)
        d = _weighted(tau, s.weight)
        acc = d if acc is None else acc.add_(d)
        del tau, d
    assert acc is not None
    if consensus:
        positive = acc >= 0
        acc.zero_()
        divisor = torch.zeros_like(acc)
        for (x, s), plan in zip(active, plans):  # pass 2: recompute, keep what agrees
            d = _weighted(_replay(task_vector(x, base_c), s, plan), s.weight)
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
    factors = [_rescale(s.rescale, s.density, *l1) if m else 1.0 for s, m, l1 in zip(active, masked, norms)]
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
