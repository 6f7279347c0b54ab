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

The whole merge of one tensor built from these is :mod:`workbench_kernels.task_vector_merge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

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
    return rescale_from_norms(mode, density, l1_before, l1_norm(kept) if mode == "l1" else 0.0)


def rescale_from_norms(mode: RescaleMode | None, density: float, l1_before: float, l1_after: float) -> float:
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
class SparsifyPlan:
    """What pass 1 decided for one task vector, so that pass 2 reproduces it without recomputing."""

    band: MagnitudeBand | None
    factor: float


def _keep_mask(tau: torch.Tensor, spec: TaskVector, band: MagnitudeBand | None) -> torch.Tensor | None:
    if spec.sparsify == "magnitude":
        return band_mask(tau, band if band is not None else KEEP_ALL)
    if spec.sparsify == "random" and spec.density < 1.0:
        return random_mask(tau.shape, spec.density, spec.seed, tau.device)
    return None


def sparsify_planned(tau: torch.Tensor, spec: TaskVector) -> tuple[torch.Tensor, SparsifyPlan]:
    band = None
    if spec.sparsify == "magnitude":
        band = spec.band if spec.band is not None else magnitude_band(tau, spec.density, spec.gamma)
    mask = _keep_mask(tau, spec, band)
    if mask is None:
        return tau, SparsifyPlan(band, 1.0)
    before = l1_norm(tau) if spec.rescale == "l1" else 0.0
    kept = tau.masked_fill_(mask.logical_not_(), 0.0)
    factor = _factor(spec.rescale, spec.density, before, kept)
    return (kept.mul_(factor) if factor != 1.0 else kept), SparsifyPlan(band, factor)


def sparsify(tau: torch.Tensor, spec: TaskVector) -> torch.Tensor:
    """The sparsified, rescaled task vector (unweighted); ``tau`` is modified in place."""
    return sparsify_planned(tau, spec)[0]


def replay_sparsify(tau: torch.Tensor, spec: TaskVector, plan: SparsifyPlan) -> torch.Tensor:
    """:func:`sparsify` again from pass 1's plan (pass 2): the same mask, the same values."""
    mask = _keep_mask(tau, spec, plan.band)
    if mask is None:
        return tau
    tau.masked_fill_(mask.logical_not_(), 0.0)
    return tau.mul_(plan.factor) if plan.factor != 1.0 else tau


def weighted_in_place(tau: torch.Tensor, weight: float) -> torch.Tensor:
    return tau.mul_(weight) if weight != 1.0 else tau
