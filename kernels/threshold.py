"""Exact top-k magnitude thresholds of task vectors, without sorting whole tensors.

For each task vector ``tau = x - base`` (float32) and a count ``k``, the :class:`Threshold`
``(value, cut)`` keeps exactly k entries: those with ``|tau| > value``, and those with
``|tau| == value`` whose flat (row-major) index is below ``cut``, i.e. among entries tied at the
threshold the earliest rank higher, as in a stable sort by decreasing magnitude.

The reference sorts. The fast paths select: a strided sample of each task vector (n / 32 entries, at
most 32768) brackets the threshold between two sample order statistics ``lo <= value <= hi``
with a safety margin; one pass over the data counts the entries above ``hi``, equal to ``hi`` and
equal to ``lo``, and marks those strictly between (about 3% of them, fewer where bf16 task vectors
pile up on a few values); the threshold is then read off the counts and the marked entries alone.
A tie cut, where needed, comes from tie counts per chunk (kept by the CPU kernel's pass, counted
anew on the other paths) and a scan of the one chunk holding it. The counts prove the bracket: when
they show the threshold outside it (rare, e.g. many equal magnitudes), that model falls back to a
sort-free exact radix select over its whole task vector
(:func:`workbench_kernels.order_stats.kth_smallest`). All models of a tensor share the pass, which
reads the base once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from workbench_kernels import MAX_TRITON_INPUTS, block_size, cpu, implementation, jit, tl
from workbench_kernels.blocks import Blocks

#: Sample size: n / 32, between 4096 and 32768 entries (selecting in it must stay cheap beside the
#: pass; a smaller sample only widens the band of candidates the pass marks).
SAMPLE_MIN, SAMPLE_MAX = 1 << 12, 1 << 15
#: Bracket half-width in sample ranks, in standard deviations of a sample quantile (sqrt(m q (1-q))
#: <= sqrt(m)/2): a threshold outside it (probability ~1e-6) only costs the exact fallback.
MARGIN_SIGMAS = 5.0


@dataclass(frozen=True)
class Threshold:
    """Keep ``|tau| > value``, and ``|tau| == value`` at flat indices below ``cut``."""

    value: float
    cut: int

    @staticmethod
    def keep_all() -> Threshold:
        return Threshold(-math.inf, 0)

    @staticmethod
    def keep_none() -> Threshold:
        return Threshold(math.inf, 0)


def magnitudes(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| flat, in float32 (the task vector as the merge computes it)."""
    return (x.reshape(-1).to(torch.float32) - base.reshape(-1).to(torch.float32)).abs()


def _trivial(k: int, n: int) -> Threshold | None:
    if k <= 0:
        return Threshold.keep_none()
    if k >= n:
        return Threshold.keep_all()
    return None


def _from_candidates(
    values: torch.Tensor, positions: torch.Tensor, k_inside: int, above_value: int, k: int
) -> Threshold:
    """The threshold when the k_inside-th largest of ``values`` (1-based) is it; ``above_value``
    counts the entries outside ``values`` that are larger than every one of them."""
    value = float(torch.kthvalue(values, values.numel() - k_inside + 1).values)
    kept_ties = k - above_value - int((values > value).sum())
    tie_positions = positions[values == value]
    return Threshold(value, int(tie_positions[kept_ties - 1]) + 1)


def topk_threshold_reference(x: torch.Tensor, base: torch.Tensor, k: int) -> Threshold:
    """The definition: a stable sort of all magnitudes, largest first."""
    w = magnitudes(x, base)
    trivial = _trivial(k, w.numel())
    if trivial is not None:
        return trivial
    order = torch.sort(w, descending=True, stable=True).indices
    value = float(w[order[k - 1]])
    return Threshold(value, int(order[:k][w[order[:k]] == value].max()) + 1)


def _sample(blocks: Blocks, counting: str) -> list[torch.Tensor]:
    """Each model's magnitudes at the flat indices that are multiples of the sample stride. (The
    CPU kernel gathers them on both cores: the cost is the page faults of mapped inputs.)"""
    n = blocks.numel
    stride = max(1, n // max(SAMPLE_MIN, min(SAMPLE_MAX, n // 32)))
    parts: list[list[torch.Tensor]] = []
    for start, xs, base in blocks:
        assert base is not None
        first = (-start) % stride
        parts = parts or [[] for _ in xs]
        if counting == "numba" and cpu.supported(base, *xs):
            out = np.empty((len(xs), len(range(first, base.numel(), stride))), dtype=np.float32)
            _sample_kernel_numba(
                cpu.array(base), cpu.padded(xs), len(xs), cpu.KINDS[base.dtype], first, stride, out
            )
            for part, row in zip(parts, torch.from_numpy(out)):
                part.append(row)
            continue
        b = base[first::stride]
        for part, x in zip(parts, xs):
            part.append(magnitudes(x[first::stride], b))
    return [torch.cat(part) for part in parts]


def _bracket(sample: torch.Tensor, n: int, k: int) -> tuple[float, float]:
    """(lo, hi): sample order statistics around the threshold's rank, widened by the margin."""
    m = sample.numel()
    centre = (n - k) / n * m  # ascending rank of the threshold, scaled to the sample
    margin = MARGIN_SIGMAS * math.sqrt(m) / 2 + 2
    lo_rank, hi_rank = math.floor(centre - margin), math.ceil(centre + margin)
    ranks = [r for r in (lo_rank, hi_rank) if 0 <= r < m]
    stats = dict(zip(ranks, _order_statistics(sample, ranks)))
    return stats.get(lo_rank, 0.0), stats.get(hi_rank, math.inf)


def _order_statistics(values: torch.Tensor, ranks: list[int]) -> list[float]:
    """The values of these 0-based ascending ranks, by selection (NumPy's introselect on CPU)."""
    if not ranks:
        return []
    if values.device.type == "cpu":
        selected = np.partition(values.numpy(), ranks)
        return [float(selected[r]) for r in ranks]
    return [float(torch.kthvalue(values, r + 1).values) for r in ranks]


#: What a counting pass returns for one block: per model the counts [entries above hi, equal to
#: hi, equal to lo]; the same per chunk of ``CHUNK`` elements (chunks x models x 3) where the pass
#: keeps them (so that a tie cut needs no pass of its own), else None; and per model the
#: magnitudes strictly inside (lo, hi) with their flat indices in the block.
Counted = tuple[torch.Tensor, "torch.Tensor | None", list[tuple[torch.Tensor, torch.Tensor]]]


def _candidates(
    bits: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per model, the magnitudes and indices of the entries whose bit is set in ``bits``."""
    marked = torch.nonzero(bits).squeeze(1)
    marked_bits = bits[marked]
    base_marked = base[marked]
    found = []
    for slot, x in enumerate(xs):
        inside = (marked_bits >> slot) & 1 == 1
        positions = marked[inside]
        found.append((magnitudes(x[positions], base_marked[inside]), positions))
    return found


def _count_band(base: torch.Tensor, xs: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor) -> Counted:
    """The counting pass in eager torch ops (no counts per chunk)."""
    b = base.to(torch.float32)
    counts = []
    bits = torch.zeros(b.shape, dtype=torch.uint8, device=b.device)
    for i, x in enumerate(xs):
        w = (x.to(torch.float32) - b).abs()
        counts.append(torch.stack([(w > hi[i]).sum(), (w == hi[i]).sum(), (w == lo[i]).sum()]))
        bits = bits | (((w > lo[i]) & (w < hi[i])).to(torch.uint8) << i)
    return torch.stack(counts), None, _candidates(bits, base, xs)


#: Elements per chunk of the numba counting pass and of the tie scans.
CHUNK = cpu.CHUNK


@cpu.kernel
def _sample_kernel_numba(base, xs, count, kind, first, stride, out):  # pragma: no cover (compiled)
    m = out.shape[1]
    for part in numba.prange((m + 255) // 256):
        one = np.empty(1, np.float32)
        b = np.empty(1, np.float32)
        for s in range(part * 256, min(m, part * 256 + 256)):
            j = first + s * stride
            cpu.decode(base, j, b, kind)
            for i in range(count):
                cpu.decode(xs[i], j, one, kind)
                out[i, s] = abs(one[0] - b[0])


@cpu.kernel
def _count_band_kernel_numba(base, xs, count, kind, lo, hi, counts, bits):  # pragma: no cover (compiled)
    n = base.size
    for chunk in numba.prange(cpu.chunks(n)):
        start, m = cpu.span(chunk, n)
        b = cpu.decoded(base, start, m, kind)
        x = np.empty(m, np.float32)
        marks = bits[start : start + m]
        for i in range(count):
            cpu.decode(xs[i], start, x, kind)
            low, high, bit = lo[i], hi[i], np.uint8(i)
            above = 0
            at_hi = 0
            at_lo = 0
            inside = 0
            for j in range(m):  # int32 sums and no stores: this loop vectorises
                w = abs(x[j] - b[j])
                above += np.int32(w > high)
                at_hi += np.int32(w == high)
                at_lo += np.int32(w == low)
                inside += np.int32((w > low) & (w < high))
            for j in range(m):
                w = abs(x[j] - b[j])
                marks[j] |= np.uint8((w > low) & (w < high)) << bit
            counts[chunk, i, 0] = above
            counts[chunk, i, 1] = at_hi
            counts[chunk, i, 2] = at_lo
            counts[chunk, i, 3] = inside


@cpu.kernel
def _candidates_kernel_numba(
    base, xs, count, kind, bits, offsets, values, positions
):  # pragma: no cover (compiled)
    """Per model i, the magnitudes and indices of the entries with bit i set, each chunk's written
    from ``offsets[chunk, i]`` on (its place in index order)."""
    n = base.size
    for chunk in numba.prange(cpu.chunks(n)):
        start, m = cpu.span(chunk, n)
        marks = bits[start : start + m]
        at = offsets[chunk].copy()
        b = np.empty(1, np.float32)
        x = np.empty(1, np.float32)
        for j in range(m):
            mark = marks[j]
            if mark:  # a few percent of the entries: decode just those
                cpu.decode(base, start + j, b, kind)
                for i in range(count):
                    if (mark >> i) & 1:
                        cpu.decode(xs[i], start + j, x, kind)
                        values[i, at[i]] = abs(x[0] - b[0])
                        positions[i, at[i]] = start + j
                        at[i] += 1


def _count_band_numba(
    base: torch.Tensor, xs: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor
) -> Counted:
    """The counting pass as parallel CPU kernels (bf16/fp16/fp32), with counts per chunk: one pass
    counts and marks, a second gathers the marked entries (a few percent) in index order."""
    if not cpu.supported(base, *xs):
        return _count_band(base, xs, lo, hi)
    n = base.numel()
    per_chunk = np.zeros((cpu.chunks(n), len(xs), 4), dtype=np.int64)
    bits = np.zeros(n, dtype=np.uint8)
    arrays, kind = cpu.padded(xs), cpu.KINDS[base.dtype]
    _count_band_kernel_numba(cpu.array(base), arrays, len(xs), kind, lo.numpy(), hi.numpy(), per_chunk, bits)
    inside = per_chunk[:, :, 3]
    offsets = np.cumsum(inside, axis=0) - inside
    width = int(inside.sum(0).max(initial=0))
    values = np.empty((len(xs), width), dtype=np.float32)
    positions = np.empty((len(xs), width), dtype=np.int64)
    _candidates_kernel_numba(cpu.array(base), arrays, len(xs), kind, bits, offsets, values, positions)
    totals = inside.sum(0)
    found = [
        (torch.from_numpy(values[i, : totals[i]]), torch.from_numpy(positions[i, : totals[i]]))
        for i in range(len(xs))
    ]
    per_chunk_tensor = torch.from_numpy(per_chunk[:, :, :3])
    return per_chunk_tensor.sum(0), per_chunk_tensor, found


def _tie_counts(x: torch.Tensor, base: torch.Tensor, value: float) -> torch.Tensor:
    """Entries of magnitude ``value`` per chunk of ``CHUNK`` elements (the last may be shorter)."""
    w = magnitudes(x, base) == value
    whole = w.numel() // CHUNK * CHUNK
    counts = w[:whole].view(-1, CHUNK).sum(1)
    return torch.cat([counts, w[whole:].sum().view(1)]) if whole < w.numel() else counts


def _tie_cut(blocks: Blocks, value: float, j: int, per_chunk: Sequence[torch.Tensor] | None = None) -> int:
    """One past the flat index of the j-th (1-based) entry whose magnitude equals ``value``, for
    the one model of ``blocks``: the block and chunk holding it from the tie counts per chunk of
    each block (counted here unless given), then a scan of that chunk alone."""
    seen = 0
    for i, start in enumerate(blocks.starts):
        loaded = None if per_chunk is not None else blocks.load(i)
        counts = per_chunk[i] if per_chunk is not None else _tie_counts(loaded[0][0], loaded[1], value)
        cumulative = torch.cumsum(counts, 0)
        if seen + int(cumulative[-1]) < j:
            seen += int(cumulative[-1])
            continue
        (x,), base = loaded or blocks.load(i)
        chunk = int(
            torch.searchsorted(cumulative, torch.tensor(j - seen, device=cumulative.device))
        )  # first chunk reaching j
        if chunk > 0:
            seen += int(cumulative[chunk - 1])
        at = chunk * CHUNK
        ties = magnitudes(x[at : at + CHUNK], base[at : at + CHUNK]) == value
        return start + at + int(torch.nonzero(ties).squeeze(1)[j - seen - 1]) + 1
    raise ValueError(f"fewer than {j} entries of magnitude {value}")


def _exact(blocks: Blocks, k: int) -> Threshold:
    """The threshold of the one model of ``blocks`` by an exact radix select over all of it."""
    from workbench_kernels.order_stats import RadixSelect

    select = RadixSelect([blocks.numel - k])
    for _, (x,), base in blocks:
        select.coarse(magnitudes(x, base))
    select.start_fine()
    for _, (x,), base in blocks:
        select.fine(magnitudes(x, base))
    value = select.values()[0]
    above = sum(int((magnitudes(x, base) > value).sum()) for _, (x,), base in blocks)
    return Threshold(value, _tie_cut(blocks, value, k - above))


@dataclass
class _Pass:
    """What the counting pass gathers for the open models of one tensor, block by block."""

    counts: torch.Tensor | None = None
    #: per block: the kernel's counts per chunk (chunks x models x 3), or None where it keeps none.
    per_chunk: list[torch.Tensor | None] = field(default_factory=list)
    #: per model: the magnitudes strictly inside its bracket, and their flat indices.
    values: list[list[torch.Tensor]] = field(default_factory=list)
    positions: list[list[torch.Tensor]] = field(default_factory=list)


def _count(blocks: Blocks, lo: torch.Tensor, hi: torch.Tensor, counting: str) -> _Pass:
    count_band = {"triton": _count_band_triton, "numba": _count_band_numba}.get(counting, _count_band)
    gathered = _Pass()
    for start, xs, base in blocks:
        assert base is not None
        counts, per_chunk, found = count_band(base, xs, lo, hi)
        gathered.counts = counts if gathered.counts is None else gathered.counts + counts
        gathered.per_chunk.append(per_chunk)
        gathered.values = gathered.values or [[] for _ in xs]
        gathered.positions = gathered.positions or [[] for _ in xs]
        for slot, (values, positions) in enumerate(found):
            gathered.values[slot].append(values)
            gathered.positions[slot].append(positions + start)
    return gathered


def _select(blocks: Blocks, ks: Sequence[int], counting: str) -> list[Threshold]:
    """The bracketed selection shared by every fast path (``counting`` picks the counting pass)."""
    n = blocks.numel
    results: list[Threshold | None] = [_trivial(k, n) for k in ks]
    open_models = [i for i, r in enumerate(results) if r is None]
    if not open_models:
        return results  # type: ignore[return-value]
    blocks = blocks.select(open_models)
    bounds = [_bracket(sample, n, ks[i]) for sample, i in zip(_sample(blocks, counting), open_models)]
    device = blocks.load(0)[1].device  # type: ignore[union-attr]
    lo = torch.tensor([b[0] for b in bounds], dtype=torch.float32, device=device)
    hi = torch.tensor([b[1] for b in bounds], dtype=torch.float32, device=device)
    gathered = _count(blocks, lo, hi, counting)
    assert gathered.counts is not None
    for slot, i in enumerate(open_models):
        k = ks[i]
        model = blocks.select([slot])
        above_hi, at_hi, at_lo = (int(c) for c in gathered.counts[slot])
        positions = torch.cat(gathered.positions[slot])

        # this slot's counts per chunk at hi (1) or lo (2)
        def ties(column: int, slot: int = slot) -> list[torch.Tensor] | None:
            per_chunk = gathered.per_chunk
            if any(p is None for p in per_chunk):
                return None
            return [p[:, slot, column] for p in per_chunk]  # type: ignore[index]

        if above_hi < k <= above_hi + at_hi:  # the threshold is hi itself
            results[i] = Threshold(bounds[slot][1], _tie_cut(model, bounds[slot][1], k - above_hi, ties(1)))
        elif above_hi + at_hi < k <= above_hi + at_hi + positions.numel():  # strictly inside
            values = torch.cat(gathered.values[slot])
            results[i] = _from_candidates(values, positions, k - above_hi - at_hi, above_hi + at_hi, k)
        elif lo[slot] < hi[slot] and 0 < k - above_hi - at_hi - positions.numel() <= at_lo:  # lo itself
            results[i] = Threshold(
                bounds[slot][0],
                _tie_cut(model, bounds[slot][0], k - above_hi - at_hi - positions.numel(), ties(2)),
            )
        else:  # the sample misled the bracket: exact selection over the whole task vector
            results[i] = _exact(model, k)
    return results  # type: ignore[return-value]


def topk_thresholds_torch(
    xs: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int]
) -> list[Threshold]:
    """Thresholds of several task vectors of one tensor, in one counting pass of eager torch ops."""
    _check(xs, base, ks)
    return _select(Blocks.whole(xs, base), ks, "torch")


def topk_thresholds_numba(
    xs: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int]
) -> list[Threshold]:
    """The same selection with the counting passes as CPU kernels."""
    _check(xs, base, ks)
    return _select(Blocks.whole(xs, base), ks, "numba")


@jit
def _count_band_kernel(base_ptr, x_ptr, lo, hi, counts_ptr, bits_ptr, n, slot, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.abs(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - b)
    tl.atomic_add(counts_ptr, tl.sum((mask & (w > hi)).to(tl.int64), axis=0))
    tl.atomic_add(counts_ptr + 1, tl.sum((mask & (w == hi)).to(tl.int64), axis=0))
    tl.atomic_add(counts_ptr + 2, tl.sum((mask & (w == lo)).to(tl.int64), axis=0))
    inside = (mask & (w > lo) & (w < hi)).to(tl.uint8) << slot
    bits = tl.load(bits_ptr + offsets, mask=mask, other=0)
    tl.store(bits_ptr + offsets, bits | inside, mask=mask)


def _count_band_triton(
    base: torch.Tensor, xs: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor
) -> Counted:
    n = base.numel()
    counts = torch.zeros(len(xs), 3, dtype=torch.int64, device=base.device)
    bits = torch.zeros(n, dtype=torch.uint8, device=base.device)
    block = block_size()
    for slot, x in enumerate(xs):
        _count_band_kernel[(-(-n // block),)](
            base.contiguous(),
            x.contiguous(),
            float(lo[slot]),
            float(hi[slot]),
            counts[slot],
            bits,
            n,
            slot,
            BLOCK=block,
        )
    return counts, None, _candidates(bits, base, xs)


def topk_thresholds_triton(
    xs: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int]
) -> list[Threshold]:
    """The same selection with the counting pass as a Triton kernel (one launch per model)."""
    _check(xs, base, ks)
    return _select(Blocks.whole(xs, base), ks, "triton")


def topk_thresholds(xs: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int]) -> list[Threshold]:
    """Dispatch on the base's device (see :func:`workbench_kernels.implementation`)."""
    _check(xs, base, ks)
    return topk_thresholds_blocks(Blocks.whole(xs, base), ks)


def topk_thresholds_blocks(blocks: Blocks, ks: Sequence[int]) -> list[Threshold]:
    """The thresholds of task vectors given block by block (the sample, the counting pass and any
    tie scan each load the blocks they need), dispatched on the device of the first block. The
    reference concatenates the blocks and sorts."""
    xs, base = blocks.load(0)
    assert base is not None
    _check_counts(len(xs), ks)
    impl = implementation(base.device)
    if impl == "reference":
        parts = [(xs, base) for _, xs, base in blocks]
        whole_base = torch.cat([b for _, b in parts])
        return [
            topk_threshold_reference(torch.cat([p[0][i] for p in parts]), whole_base, k)
            for i, k in enumerate(ks)
        ]
    return _select(blocks, ks, impl if impl in ("triton", "numba") else "torch")


def _check_counts(models: int, ks: Sequence[int]) -> None:
    if models != len(ks):
        raise ValueError(f"topk_thresholds got {models} tensors but {len(ks)} counts")
    if models > MAX_TRITON_INPUTS:
        raise ValueError(
            f"topk_thresholds takes at most {MAX_TRITON_INPUTS} task vectors per call, got {models}"
        )


def _check(xs: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int]) -> None:
    _check_counts(len(xs), ks)
    for i, x in enumerate(xs):
        if x.shape != base.shape:
            raise ValueError(
                f"topk_thresholds: tensor {i} has shape {list(x.shape)}, base has {list(base.shape)}"
            )
