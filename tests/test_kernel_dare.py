"""DARE's counter-based mask: every implementation gives the documented bits, on odd sizes."""

from __future__ import annotations

import pytest
import torch
from merging import documented_hash

from workbench_kernels.dare import (
    keep_mask,
    keep_mask_numba,
    keep_mask_reference,
    keep_mask_torch,
    keep_mask_triton,
)


def documented_mask(n: int, density: float, seed: int) -> list[bool]:
    lo, hi = seed % 2**32, (seed >> 32) % 2**32
    return [(documented_hash(documented_hash(i ^ lo) ^ hi) >> 8) < round(density * 2**24) for i in range(n)]


@pytest.mark.parametrize(
    "make",
    [keep_mask_reference, keep_mask_torch, keep_mask_numba, keep_mask_triton],
    ids=["reference", "torch", "numba", "triton"],
)
@pytest.mark.parametrize("n", [1, 7, 1023, 65537])
def test_every_implementation_gives_the_documented_bits(make, n):
    seed = 0x9E3779B97F4A7C15
    got = make(n, 0.37, seed).tolist()
    if n > 2000:  # the pure-Python check on a spread of positions keeps the test fast
        positions = list(range(0, 300)) + list(range(n // 2 - 300, n // 2 + 300)) + list(range(n - 300, n))
        expected = documented_mask(n, 0.37, seed)
        assert [got[i] for i in positions] == [expected[i] for i in positions]
    else:
        assert got == documented_mask(n, 0.37, seed)


def test_dispatch_honours_the_forced_implementation(monkeypatch):
    expected = keep_mask_reference(5000, 0.5, 3).view(50, 100)
    for impl in ("reference", "torch", "numba", "triton"):
        monkeypatch.setenv("WORKBENCH_KERNELS", impl)
        assert torch.equal(keep_mask((50, 100), 0.5, 3), expected)


def test_density_extremes_and_rate():
    assert not keep_mask_torch(1000, 0.0, 1).any()
    assert keep_mask_torch(1000, 1.0, 1).all()
    rate = keep_mask_torch(1 << 20, 0.1, 7).float().mean().item()
    assert abs(rate - 0.1) < 0.002  # binomial sd at 1M draws is 0.0003
    assert not torch.equal(keep_mask_torch(4096, 0.5, 1), keep_mask_torch(4096, 0.5, 2))


def test_too_large_tensors_are_refused():
    with pytest.raises(ValueError, match="32 bits"):
        keep_mask_torch(1 << 32, 0.5, 1)
