"""Top-k magnitude thresholds: every implementation equals a sort-based definition, ties included."""

from __future__ import annotations

import pytest
import torch

import workbench_kernels.threshold as threshold_module
from workbench_kernels.threshold import (
    CHUNK,
    Threshold,
    topk_thresholds,
    topk_thresholds_numba,
    topk_thresholds_torch,
    topk_thresholds_triton,
)

CPU_PATHS = pytest.mark.parametrize(
    "impl", [topk_thresholds_torch, topk_thresholds_numba], ids=["torch", "numba"]
)


def sorted_definition(x: torch.Tensor, base: torch.Tensor, k: int) -> Threshold:
    """By hand: rank (|tau| descending, index ascending) with Python's sort; the k-th entry decides."""
    w = (x.reshape(-1).double() - base.reshape(-1).double()).abs().float().tolist()  # float32 magnitudes
    n = len(w)
    if k <= 0:
        return Threshold.keep_none()
    if k >= n:
        return Threshold.keep_all()
    ranked = sorted(range(n), key=lambda i: (-w[i], i))
    value = w[ranked[k - 1]]
    return Threshold(value, max(i for i in ranked[:k] if w[i] == value) + 1)


def family(
    n: int, dtype: torch.dtype, seed: int, shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape or (n,), generator=g).to(dtype)
    return base, [(base.float() + 0.01 * torch.randn(base.shape, generator=g)).to(dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "impl",
    [topk_thresholds_torch, topk_thresholds_numba, topk_thresholds_triton],
    ids=["torch", "numba", "triton"],
)
@pytest.mark.parametrize("n", [1, 7, 1023, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_thresholds_equal_the_sort_definition(impl, n, dtype):
    base, xs = family(n, dtype, n)
    ks = [n // 2, max(1, n // 5), n]
    expected = [sorted_definition(x, base, k) for x, k in zip(xs, ks)]
    assert impl(xs, base, ks) == expected
    for x, k, t in zip(xs, ks, expected):  # and the rule keeps exactly k entries
        w = (x.float() - base.float()).abs().reshape(-1)
        kept = (w > t.value) | ((w == t.value) & (torch.arange(n) < t.cut))
        assert int(kept.sum()) == k


@CPU_PATHS
def test_non_contiguous_inputs(impl):
    base, xs = family(0, torch.bfloat16, 3, shape=(130, 257))
    base, xs = base[:, ::2], [x[:, ::2] for x in xs]
    ks = [3000, 1, 8000]
    assert impl(xs, base, ks) == [sorted_definition(x, base, k) for x, k in zip(xs, ks)]


@CPU_PATHS
def test_a_misleading_sample_falls_back_to_exact_selection(impl, monkeypatch):
    """A bracket that misses the threshold (forced here) still gives the exact answer."""
    monkeypatch.setattr(threshold_module, "_bracket", lambda sample, n, k: (10.0, 20.0))
    base, xs = family(5000, torch.float32, 1)
    assert impl(xs, base, [100, 2500, 4999]) == [
        sorted_definition(x, base, k) for x, k in zip(xs, [100, 2500, 4999])
    ]


@CPU_PATHS
def test_heavy_ties_cut_at_the_right_position(impl):
    base = torch.zeros(10000)
    x = torch.ones(10000)
    x[::7] = 2.0  # 1429 entries above, 8571 tied at 1
    for k in (1429, 1430, 5000, 10000 - 1):
        assert impl([x], base, [k]) == [sorted_definition(x, base, k)]


@CPU_PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_spread_over_several_chunks_are_located_by_their_chunk_counts(impl, dtype):
    """bf16-like data: few distinct magnitudes, so the threshold equals a bracket end and the
    k-th tie lies in a later chunk of the counting pass."""
    n = 3 * CHUNK + 5
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(n, dtype=dtype)
    x = (torch.randint(0, 4, (n,), generator=g) * 0.25).to(dtype)
    for k in (n // 2, n // 3, n - 7, 5):
        assert impl([x], base, [k]) == [sorted_definition(x, base, k)]


def test_dispatch_and_bad_input(monkeypatch):
    base, xs = family(999, torch.float32, 2)
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    assert topk_thresholds(xs, base, [10, 20, 30]) == [
        sorted_definition(x, base, k) for x, k in zip(xs, [10, 20, 30])
    ]
    with pytest.raises(ValueError, match="shape"):
        topk_thresholds([torch.zeros(5)], base, [1])
