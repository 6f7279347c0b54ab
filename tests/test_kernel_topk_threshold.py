"""Exact model-wide magnitude thresholds by radix select, against sorting."""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.topk_threshold import KthLargestMagnitude, kth_largest_magnitude, kth_largest_magnitude_reference


def _sorted_kth(tensors: list[torch.Tensor], k: int) -> float:
    """Independent of the module: plain Python sorting of every magnitude."""
    values = sorted((abs(float(v)) for x in tensors for v in x.reshape(-1).tolist()), reverse=True)
    return values[k - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 7, 500, 1023, 1031])
def test_matches_sorting(dtype: torch.dtype, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    tensors = [torch.randn(shape, generator=gen).to(dtype) for shape in [(1,), (7,), (33, 31)]]
    expected = _sorted_kth(tensors, k)
    assert kth_largest_magnitude(tensors, k) == expected
    assert kth_largest_magnitude_reference(tensors, k) == expected


def test_ties_zeros_and_extremes() -> None:
    tensors = [torch.tensor([0.0, -2.0, 2.0, 2.0, 1e-30, 3e38]), torch.zeros(5), torch.tensor([-1.0, 1.0])]
    for k in range(1, 14):
        assert kth_largest_magnitude(tensors, k) == _sorted_kth(tensors, k)


def test_non_contiguous_and_large_values_across_blocks() -> None:
    x = torch.randn(3000, 700)[:, ::3]  # crosses the 1M-element block boundary once flattened
    k = 12345
    assert kth_largest_magnitude([x], k) == kth_largest_magnitude_reference([x], k)


def test_k_out_of_range_and_nan_are_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        kth_largest_magnitude([torch.ones(3)], 4)
    with pytest.raises(ValueError, match="at least 1"):
        KthLargestMagnitude(0)
    with pytest.raises(ValueError, match="NaN"):
        kth_largest_magnitude([torch.tensor([1.0, float("nan")])], 1)
