"""The TIES-family merge of one tensor, fused into one pass once the keep rules are known.

Per model i, ``tau_i = x_i - base`` (float32) is trimmed by its rule, scaled by its rescale factor
and its weight: ``d_i = weight_i * (factor_i * where(keep_i, tau_i, 0))``. Keep rules: a magnitude
:class:`~workbench_kernels.threshold.Threshold` (TIES) or DARE's counter-based draw below
``keep_below_i`` (:mod:`workbench_kernels.dare`). Then either TIES consensus (elected sign: the sign
of ``sum d_i``; result ``sum of agreeing d_i``, divided with ``normalize`` by the summed weights of
the agreeing models) or a plain sum (divided by ``sum weight_i`` with ``normalize``); finally
``base + scale * merged`` in the output dtype. The operations and their order are those of
:func:`workbench_kernels.task_vector_merge.merge_task_vectors_reference`, this op's reference.

The CPU kernel (Numba) and the Triton kernel read each input once, per chunk of elements, in its
stored dtype; the torch path (other devices and dtypes) runs cache-sized blocks of eager ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import torch

from workbench_kernels import MAX_TRITON_INPUTS, block_size, cpu, implementation, jit, tl
from workbench_kernels.blocks import Blocks
from workbench_kernels.dare import RESOLUTION, draw_numba, draws_triton, hash32, seed_words

Rule = Literal["magnitude", "random"]
#: Elements per block of the eager torch path.
BLOCK = 1 << 16


@dataclass(frozen=True)
class Keep:
    """One model's part: its weight, rescale factor and keep rule."""

    weight: float
    factor: float = 1.0
    #: magnitude rule: keep |tau| > threshold, and == threshold at flat indices below cut.
    threshold: float = float("-inf")
    cut: int = 0
    #: random rule: keep where the 24-bit draw of (seed, index) is below keep_below.
    seed: int = 0
    keep_below: int = RESOLUTION


def _keep(
    tau: torch.Tensor, index: torch.Tensor, params: dict[str, torch.Tensor], i: int, rule: Rule
) -> torch.Tensor:
    """Model i's keep mask: its magnitude threshold and tie cut, or its counter-based draws."""
    if rule == "magnitude":
        w = tau.abs()
        return ~((w < params["threshold"][i]) | ((w == params["threshold"][i]) & (index >= params["cut"][i])))
    return (hash32(hash32(index ^ params["seed_lo"][i]) ^ params["seed_hi"][i]) >> 8) < params["keep_below"][
        i
    ]


def _merge_block(
    start: torch.Tensor,
    base: torch.Tensor,
    xs: list[torch.Tensor],
    params: dict[str, torch.Tensor],
    rule: Rule,
    consensus: bool,
    normalize: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The op on flat slices starting at flat index ``start``; ``params`` holds per-model float32
    threshold/factor/weight and int64 cut/seed words/keep_below, plus the scalars scale and total."""
    b = base.to(torch.float32)
    index = torch.arange(b.numel(), dtype=torch.int64, device=b.device) + start
    deltas = []
    for i, x in enumerate(xs):
        tau = x.to(torch.float32) - b
        kept = torch.where(_keep(tau, index, params, i, rule), tau, 0.0)
        deltas.append(kept * params["factor"][i] * params["weight"][i])
    total = deltas[0]
    for d in deltas[1:]:
        total = total + d
    if consensus:
        positive = total >= 0
        merged = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for i, d in enumerate(deltas):
            agree = torch.where(positive, d > 0, d < 0)
            merged = merged + torch.where(agree, d, 0.0)
            divisor = divisor + agree.to(torch.float32) * params["weight"][i]
        if normalize:
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
    else:
        merged = total / params["total"] if normalize else total
    return (merged * params["scale"] + b).to(out_dtype)


def _params(keeps: Sequence[Keep], scale: float, device: torch.device) -> dict[str, torch.Tensor]:
    words = [seed_words(k.seed) for k in keeps]
    f32 = {
        "threshold": [k.threshold for k in keeps],
        "factor": [k.factor for k in keeps],
        "weight": [k.weight for k in keeps],
    }
    i64 = {
        "cut": [k.cut for k in keeps],
        "seed_lo": [w[0] for w in words],
        "seed_hi": [w[1] for w in words],
        "keep_below": [k.keep_below for k in keeps],
    }
    params = {name: torch.tensor(v, dtype=torch.float32, device=device) for name, v in f32.items()}
    params.update({name: torch.tensor(v, dtype=torch.int64, device=device) for name, v in i64.items()})
    params["scale"] = torch.tensor(scale, dtype=torch.float32, device=device)
    params["total"] = torch.tensor(sum(k.weight for k in keeps), dtype=torch.float32, device=device)
    return params


def ties_merge_torch(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    keeps: Sequence[Keep],
    rule: Rule,
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    out_dtype: torch.dtype,
    offset: int = 0,
) -> torch.Tensor:
    """In cache-sized blocks of eager torch ops (any device, any dtype). ``offset``: the flat index
    of the first element in the whole tensor, where the inputs are a block of it (every
    implementation takes it: the keep rules are defined on whole-tensor indices)."""
    _check(base, tensors, keeps)
    params = _params(keeps, scale, base.device)
    flat_base = base.reshape(-1)
    flat = [x.reshape(-1) for x in tensors]
    n = flat_base.numel()
    out = torch.empty(n, dtype=out_dtype, device=base.device)
    for s in range(0, n, BLOCK):
        e = min(s + BLOCK, n)
        start = torch.tensor(offset + s, dtype=torch.int64, device=base.device)
        out[s:e] = _merge_block(
            start, flat_base[s:e], [x[s:e] for x in flat], params, rule, consensus, normalize, out_dtype
        )
    return out.view(base.shape)


@cpu.helper
def _kept_numba(
    x, b, start, kept, random, threshold, cut, seed_lo, seed_hi, keep_below
):  # pragma: no cover (compiled)
    """One model's kept task vector on one chunk (flat indices from ``start``)."""
    if random:
        for j in range(kept.size):
            tau = x[j] - b[j]
            kept[j] = tau if draw_numba(start + j, seed_lo, seed_hi) < keep_below else np.float32(0.0)
    else:
        c = cut - start
        for j in range(kept.size):
            tau = x[j] - b[j]
            a = abs(tau)
            kept[j] = np.float32(0.0) if (a < threshold) | ((a == threshold) & (j >= c)) else tau


@cpu.kernel
def _ties_numba(
    out,
    base,
    xs,
    count,
    kind,
    out_kind,
    offset,
    threshold,
    cut,
    factor,
    weight,
    seed_lo,
    seed_hi,
    keep_below,
    random,
    consensus,
    normalize,
    scale,
    total_weight,
):  # pragma: no cover (compiled)
    n = base.size
    for chunk in numba.prange(cpu.chunks(n)):
        start, m = cpu.span(chunk, n)
        b = cpu.decoded(base, start, m, kind)
        x = np.empty(m, np.float32)
        deltas = np.empty((count, m), np.float32)
        for i in range(count):
            cpu.decode(xs[i], start, x, kind)
            d = deltas[i]
            _kept_numba(
                x, b, offset + start, d, random, threshold[i], cut[i], seed_lo[i], seed_hi[i], keep_below[i]
            )
            f, w = factor[i], weight[i]
            for j in range(m):
                d[j] = d[j] * f * w
        total = deltas[0].copy()
        for i in range(1, count):
            d = deltas[i]
            for j in range(m):
                total[j] += d[j]
        if consensus:
            merged = np.zeros(m, np.float32)
            divisor = np.zeros(m, np.float32)
            for i in range(count):
                d = deltas[i]
                w = weight[i]
                for j in range(m):
                    agree = d[j] > 0 if total[j] >= 0 else d[j] < 0
                    merged[j] += d[j] if agree else np.float32(0.0)
                    divisor[j] += np.float32(1.0 if agree else 0.0) * w
            if normalize:
                for j in range(m):
                    merged[j] /= divisor[j] if divisor[j] != 0 else np.float32(1.0)
        else:
            merged = total
            if normalize:
                for j in range(m):
                    merged[j] /= total_weight
        for j in range(m):
            merged[j] = merged[j] * scale + b[j]
        cpu.encode(merged, out, start, out_kind)


def _numba_rules(keeps: Sequence[Keep]) -> tuple[np.ndarray, ...]:
    """The kernels' keep-rule arrays: threshold, cut, seed low and high words, keep_below."""
    words = np.array([seed_words(k.seed) for k in keeps], dtype=np.uint32).reshape(-1, 2)
    return (
        np.array([k.threshold for k in keeps], dtype=np.float32),
        np.array([k.cut for k in keeps], dtype=np.int64),
        words[:, 0].copy(),
        words[:, 1].copy(),
        np.array([k.keep_below for k in keeps], dtype=np.uint32),
    )


def ties_merge_numba(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    keeps: Sequence[Keep],
    rule: Rule,
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    out_dtype: torch.dtype,
    offset: int = 0,
) -> torch.Tensor:
    """The CPU kernel (one pass over the inputs in their stored dtype, both cores); other dtypes
    and devices take the torch path."""
    _check(base, tensors, keeps)
    if not cpu.supported(base, *tensors, out_dtype=out_dtype):
        return ties_merge_torch(
            base,
            tensors,
            keeps,
            rule,
            consensus=consensus,
            normalize=normalize,
            scale=scale,
            out_dtype=out_dtype,
            offset=offset,
        )
    out = torch.empty(base.shape, dtype=out_dtype)
    threshold, cut, seed_lo, seed_hi, keep_below = _numba_rules(keeps)
    _ties_numba(
        cpu.array(out),
        cpu.array(base),
        cpu.padded(tensors),
        len(tensors),
        cpu.KINDS[base.dtype],
        cpu.KINDS[out_dtype],
        offset,
        threshold,
        cut,
        np.array([k.factor for k in keeps], dtype=np.float32),
        np.array([k.weight for k in keeps], dtype=np.float32),
        seed_lo,
        seed_hi,
        keep_below,
        rule == "random",
        consensus,
        normalize,
        np.float32(scale),
        np.float32(sum(k.weight for k in keeps)),
    )
    return out


@jit
def _model_delta(x_ptr, b, offsets, index, mask, p_ptr, i64_ptr, RANDOM: tl.constexpr):
    """d_i of one model (``p_ptr``: threshold, factor, weight; ``i64_ptr``: cut, seed lo/hi,
    keep_below); ``index``: the elements' flat indices in the whole tensor (draws and tie cut)."""
    tau = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - b
    if RANDOM:
        keep = draws_triton(index, tl.load(i64_ptr + 1), tl.load(i64_ptr + 2)) < tl.load(i64_ptr + 3).to(
            tl.int32
        )
    else:
        w = tl.abs(tau)
        threshold = tl.load(p_ptr)
        keep = ~((w < threshold) | ((w == threshold) & (index >= tl.load(i64_ptr))))
    kept = tl.where(keep, tau, 0.0)
    return kept * tl.load(p_ptr + 1) * tl.load(p_ptr + 2)


@jit
def _agree(merged, divisor, d, positive, weight):
    agree = tl.where(positive, d > 0, d < 0)
    return merged + tl.where(agree, d, 0.0), divisor + agree.to(tl.float32) * weight


@jit
def _ties_kernel(
    out_ptr,
    base_ptr,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    p_ptr,
    i64_ptr,
    scale,
    total_weight,
    n,
    first,
    N: tl.constexpr,
    RANDOM: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    index = offsets + first
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    d0 = _model_delta(x0, b, offsets, index, mask, p_ptr, i64_ptr, RANDOM)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    d1 = zero
    d2 = zero
    d3 = zero
    d4 = zero
    d5 = zero
    d6 = zero
    d7 = zero
    total = d0
    if N > 1:
        d1 = _model_delta(x1, b, offsets, index, mask, p_ptr + 3, i64_ptr + 4, RANDOM)
        total = total + d1
    if N > 2:
        d2 = _model_delta(x2, b, offsets, index, mask, p_ptr + 6, i64_ptr + 8, RANDOM)
        total = total + d2
    if N > 3:
        d3 = _model_delta(x3, b, offsets, index, mask, p_ptr + 9, i64_ptr + 12, RANDOM)
        total = total + d3
    if N > 4:
        d4 = _model_delta(x4, b, offsets, index, mask, p_ptr + 12, i64_ptr + 16, RANDOM)
        total = total + d4
    if N > 5:
        d5 = _model_delta(x5, b, offsets, index, mask, p_ptr + 15, i64_ptr + 20, RANDOM)
        total = total + d5
    if N > 6:
        d6 = _model_delta(x6, b, offsets, index, mask, p_ptr + 18, i64_ptr + 24, RANDOM)
        total = total + d6
    if N > 7:
        d7 = _model_delta(x7, b, offsets, index, mask, p_ptr + 21, i64_ptr + 28, RANDOM)
        total = total + d7
    merged = total
    if CONSENSUS:
        positive = total >= 0
        merged, divisor = _agree(
            tl.zeros([BLOCK], dtype=tl.float32),
            tl.zeros([BLOCK], dtype=tl.float32),
            d0,
            positive,
            tl.load(p_ptr + 2),
        )
        if N > 1:
            merged, divisor = _agree(merged, divisor, d1, positive, tl.load(p_ptr + 5))
        if N > 2:
            merged, divisor = _agree(merged, divisor, d2, positive, tl.load(p_ptr + 8))
        if N > 3:
            merged, divisor = _agree(merged, divisor, d3, positive, tl.load(p_ptr + 11))
        if N > 4:
            merged, divisor = _agree(merged, divisor, d4, positive, tl.load(p_ptr + 14))
        if N > 5:
            merged, divisor = _agree(merged, divisor, d5, positive, tl.load(p_ptr + 17))
        if N > 6:
            merged, divisor = _agree(merged, divisor, d6, positive, tl.load(p_ptr + 20))
        if N > 7:
            merged, divisor = _agree(merged, divisor, d7, positive, tl.load(p_ptr + 23))
        if NORMALIZE:
            merged = merged / tl.where(divisor == 0, 1.0, divisor)
    elif NORMALIZE:
        merged = merged / total_weight
    tl.store(out_ptr + offsets, (merged * scale + b).to(out_ptr.dtype.element_ty), mask=mask)


def ties_merge_triton(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    keeps: Sequence[Keep],
    rule: Rule,
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    out_dtype: torch.dtype,
    offset: int = 0,
) -> torch.Tensor:
    """Launcher: one grid over the elements; more than ``MAX_TRITON_INPUTS`` models use the torch path."""
    _check(base, tensors, keeps)
    if len(tensors) > MAX_TRITON_INPUTS:
        return ties_merge_torch(
            base,
            tensors,
            keeps,
            rule,
            consensus=consensus,
            normalize=normalize,
            scale=scale,
            out_dtype=out_dtype,
            offset=offset,
        )
    device = base.device
    p = torch.tensor([[k.threshold, k.factor, k.weight] for k in keeps], dtype=torch.float32, device=device)
    i64 = torch.tensor(
        [[k.cut, *seed_words(k.seed), k.keep_below] for k in keeps], dtype=torch.int64, device=device
    )
    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    n = out.numel()
    if n:
        flat = [x.contiguous().reshape(-1) for x in tensors]
        flat += [flat[0]] * (MAX_TRITON_INPUTS - len(flat))
        block = block_size()
        _ties_kernel[(-(-n // block),)](
            out.view(-1),
            base.contiguous().reshape(-1),
            *flat,
            p,
            i64,
            scale,
            sum(k.weight for k in keeps),
            n,
            offset,
            N=len(tensors),
            RANDOM=rule == "random",
            CONSENSUS=consensus,
            NORMALIZE=normalize,
            BLOCK=block,
        )
    return out


def _check(base: torch.Tensor, tensors: Sequence[torch.Tensor], keeps: Sequence[Keep]) -> None:
    if not tensors or len(tensors) != len(keeps):
        raise ValueError(f"ties_merge got {len(tensors)} tensors and {len(keeps)} keep rules")
    for i, x in enumerate(tensors):
        if x.shape != base.shape:
            raise ValueError(f"ties_merge: tensor {i} has shape {list(x.shape)}, base has {list(base.shape)}")


def _l1_sums(
    start: int, base: torch.Tensor, xs: list[torch.Tensor], params: dict[str, torch.Tensor], rule: Rule
) -> torch.Tensor:
    """Per model: [sum |tau|, sum |kept|] in float64 over flat slices starting at ``start``."""
    b = base.to(torch.float32)
    index = torch.arange(b.numel(), dtype=torch.int64, device=b.device) + start
    sums = []
    for i, x in enumerate(xs):
        tau = x.to(torch.float32) - b
        kept = torch.where(_keep(tau, index, params, i, rule), tau, 0.0)
        sums.append(torch.stack([tau.abs().sum(dtype=torch.float64), kept.abs().sum(dtype=torch.float64)]))
    return torch.stack(sums)


@cpu.kernel
def _l1_numba(
    base, xs, count, kind, offset, threshold, cut, seed_lo, seed_hi, keep_below, random, sums
):  # pragma: no cover (compiled)
    n = base.size
    for chunk in numba.prange(cpu.chunks(n)):
        start, m = cpu.span(chunk, n)
        b = cpu.decoded(base, start, m, kind)
        x = np.empty(m, np.float32)
        kept = np.empty(m, np.float32)
        for i in range(count):
            cpu.decode(xs[i], start, x, kind)
            _kept_numba(
                x,
                b,
                offset + start,
                kept,
                random,
                threshold[i],
                cut[i],
                seed_lo[i],
                seed_hi[i],
                keep_below[i],
            )
            whole = 0.0
            part = 0.0
            for j in range(m):
                whole += abs(np.float64(x[j] - b[j]))
                part += abs(np.float64(kept[j]))
            sums[chunk, i, 0] = whole
            sums[chunk, i, 1] = part


def l1_norms(blocks: Blocks, keeps: Sequence[Keep], rule: Rule) -> list[tuple[float, float]]:
    """(||tau||_1, ||kept||_1) per model (the ``l1`` rescale's norms) over a tensor given block by
    block: float64 partial sums per chunk (the CPU kernel) or per block of the torch path, added
    with ``math.fsum`` so that the result does not depend on how they are grouped."""
    partials: list[np.ndarray] = []
    for start, xs, base in blocks:
        assert base is not None
        _check(base, xs, keeps)
        if implementation(base.device) == "numba" and cpu.supported(base, *xs):
            sums = np.zeros((cpu.chunks(base.numel()), len(keeps), 2))
            _l1_numba(
                cpu.array(base),
                cpu.padded(xs),
                len(xs),
                cpu.KINDS[base.dtype],
                start,
                *_numba_rules(keeps),
                rule == "random",
                sums,
            )
            partials.append(sums)
            continue
        params = _params(keeps, 1.0, base.device)
        flat_base = base.reshape(-1)
        flat = [x.reshape(-1) for x in xs]
        for s in range(0, flat_base.numel(), BLOCK):
            partials.append(
                _l1_sums(start + s, flat_base[s : s + BLOCK], [x[s : s + BLOCK] for x in flat], params, rule)
                .cpu()
                .numpy()[None]
            )
    columns = np.concatenate(partials).reshape(-1, len(keeps) * 2).T
    totals = [math.fsum(column) for column in columns.tolist()]
    return [(totals[2 * i], totals[2 * i + 1]) for i in range(len(keeps))]
