"""Statistics gathered from a tensor given block by block (what the engine does for blockwise
methods) equal those of the whole tensor, and merging each block with them gives the whole result."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernel_threshold import sorted_definition
from test_kernel_ties import CASES

import workbench_kernels.threshold as threshold_module
from workbench_kernels.blocks import Blocks
from workbench_kernels.slerp import slerp_reference, slerp_weights
from workbench_kernels.sparsify import TaskVector
from workbench_kernels.task_vector_merge import merge_task_vectors_reference, plan_fused
from workbench_kernels.threshold import CHUNK, topk_thresholds_blocks
from workbench_kernels.ties import Keep, l1_norms
from workbench_kernels.weighted_sum import BLOCK, weighted_sum

IMPLS = pytest.mark.parametrize("impl", ["torch", "numba", "triton"])


def family(n: int, dtype: torch.dtype, count: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    return base, [(base.float() + 0.02 * torch.randn(n, generator=g)).to(dtype) for _ in range(count)]


def blocks_of(
    xs: list[torch.Tensor], base: torch.Tensor | None, starts: list[int]
) -> tuple[Blocks, list[int]]:
    """``Blocks`` over slices of in-memory tensors, counting how often each block is loaded."""
    n = (base if base is not None else xs[0]).numel()
    bounds = [*starts, n]
    loads = [0] * len(starts)

    def load(i: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        loads[i] += 1
        s, e = bounds[i], bounds[i + 1]
        return [x[s:e] for x in xs], None if base is None else base[s:e]

    return Blocks(n, starts, load), loads


UNEVEN = [0, 1, 4000, 4001, 20000, 3 * CHUNK + 1]  # blocks of 1, 3999, 1 ... elements


@IMPLS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thresholds_over_uneven_blocks_equal_the_sort_definition(impl, dtype, monkeypatch):
    if impl == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bf16 arithmetic")
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    n = 4 * CHUNK + 9
    base, xs = family(n, dtype, 3, seed=5)
    ks = [n // 2, n // 7, 3]
    blocks, loads = blocks_of(xs, base, UNEVEN)
    assert topk_thresholds_blocks(blocks, ks) == [sorted_definition(x, base, k) for x, k in zip(xs, ks)]
    assert max(loads[1:]) <= 2 + len(ks)  # the sample, the counting pass, at most a tie count per model


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_ties_spread_over_blocks_and_a_misleading_sample(impl, monkeypatch):
    """bf16-like magnitudes (few distinct values): the k-th tie sits in a later block; and with a
    bracket that misses (forced), the exact radix select over the blocks still finds it."""
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    n = 3 * CHUNK + 5
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(n, dtype=torch.bfloat16)
    x = (torch.randint(0, 4, (n,), generator=g) * 0.25).to(torch.bfloat16)
    blocks, _ = blocks_of([x], base, UNEVEN[:5])
    for k in (n // 2, n // 3, n - 7, 5):
        assert topk_thresholds_blocks(blocks, [k]) == [sorted_definition(x, base, k)]
    monkeypatch.setattr(threshold_module, "_bracket", lambda sample, n, k: (10.0, 20.0))
    for k in (n // 2, 5):
        assert topk_thresholds_blocks(blocks, [k]) == [sorted_definition(x, base, k)]


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_l1_norms_do_not_depend_on_aligned_blocks(impl, monkeypatch):
    """Per-chunk float64 partial sums added by fsum: blocks starting at multiples of the chunks give
    the whole tensor's norms exactly; both equal a float64 computation to rounding."""
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    n = 2 * BLOCK + 777
    base, xs = family(n, torch.bfloat16, 2, seed=3)
    keeps = [Keep(1.0, seed=11, keep_below=1 << 23), Keep(0.5, seed=12, keep_below=1 << 22)]
    whole = l1_norms(Blocks.whole(xs, base), keeps, "random")
    blocked = l1_norms(blocks_of(xs, base, [0, BLOCK, 2 * BLOCK])[0], keeps, "random")
    assert whole == blocked
    for x, (total, _) in zip(xs, whole):
        assert math.isclose(total, float((x.double() - base.double()).abs().sum()), rel_tol=1e-12)


@IMPLS
@pytest.mark.parametrize("case", list(CASES))
def test_blocks_merged_with_the_plan_equal_the_whole_reference(impl, case, monkeypatch):
    """plan_fused over blocks, then each block merged on its own with its flat offset: the reference
    merge of the whole tensor, bit for bit (random masks and tie cuts are defined on whole-tensor
    indices). Blocks aligned to the L1 partial sums where the rescale is l1, uneven otherwise."""
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    specs, consensus, normalize = CASES[case]
    dtype = torch.float16 if impl == "triton" else torch.bfloat16
    aligned = any(s.rescale == "l1" for s in specs)
    n = 2 * BLOCK + 777 if aligned else 4 * CHUNK + 9
    starts = [0, BLOCK, 2 * BLOCK] if aligned else UNEVEN
    base, xs = family(n, dtype, len(specs), seed=8)
    blocks, _ = blocks_of(xs, base, starts)
    fused = plan_fused(blocks, specs, consensus=consensus, normalize=normalize, scale=0.8)
    assert fused is not None
    parts = [fused(b, x, dtype, offset=start) for start, x, b in blocks]
    expected = merge_task_vectors_reference(
        base, xs, specs, consensus=consensus, normalize=normalize, scale=0.8
    ).to(dtype)
    assert torch.equal(torch.cat(parts), expected)


def test_plan_fused_declines_what_the_kernel_cannot_run(monkeypatch):
    base, xs = family(100, torch.float32, 2, seed=1)
    blocks = Blocks.whole(xs, base)
    ties = [TaskVector(1.0, 0.5, "magnitude"), TaskVector(1.0, 0.5, "magnitude")]
    breadcrumbs = [TaskVector(1.0, 0.5, "magnitude", gamma=0.1)] * 2
    mixed = [TaskVector(1.0, 0.5, "magnitude"), TaskVector(1.0, 0.5, "random", seed=1)]
    kwargs = dict(consensus=True, normalize=True, scale=1.0)
    assert plan_fused(blocks, ties, **kwargs) is not None
    assert plan_fused(blocks, ties, **kwargs, compute_dtype=torch.float64) is None
    assert plan_fused(blocks, breadcrumbs, **kwargs) is None
    assert plan_fused(blocks, mixed, **kwargs) is None
    assert plan_fused(blocks, [TaskVector(0.0, 0.5, "magnitude")] * 2, **kwargs) is None  # no weight left
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    assert plan_fused(blocks, ties, **kwargs) is None


@pytest.mark.parametrize("impl", ["reference", "torch", "numba", "triton"])
def test_slerp_weights_over_blocks(impl, monkeypatch):
    """Aligned blocks give the whole tensor's weights exactly; a weighted sum per block with them is
    the slerp of the whole tensors (the reference's own arithmetic where it is forced)."""
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    n = 2 * BLOCK + 777
    g = torch.Generator().manual_seed(2)
    dtype = torch.float16 if impl == "triton" else torch.bfloat16
    a, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    whole = slerp_weights(Blocks.whole([a, b], None), 0.3)
    blocks, _ = blocks_of([a, b], None, [0, BLOCK, 2 * BLOCK])
    assert slerp_weights(blocks, 0.3) == whole
    merged = torch.cat(
        [weighted_sum(pair, list(whole), torch.float32, torch.float32) for _, pair, _ in blocks]
    )
    expected = slerp_reference(a, b, 0.3)
    if impl == "reference":
        assert torch.equal(merged, expected)
    else:
        assert torch.allclose(merged, expected, rtol=1e-5, atol=1e-6)
