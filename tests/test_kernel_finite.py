"""The finiteness check the engine runs on merged tensors: every implementation against isfinite."""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.cpu import CHUNK
from workbench_kernels.finite import all_finite, all_finite_numba, all_finite_torch

IMPLS = pytest.mark.parametrize("check", [all_finite_torch, all_finite_numba], ids=["torch", "numba"])


@IMPLS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_one_bad_element_anywhere_is_found(check, dtype, bad):
    n = 2 * CHUNK + 7
    for position in (0, CHUNK + 3, n - 1):
        x = torch.randn(n).to(dtype)
        if bad is not None:
            x[position] = bad
        assert check(x) is (bad is None)


@IMPLS
def test_large_finite_values_whose_sum_overflows_are_finite(check):
    x = torch.full((CHUNK + 1,), torch.finfo(torch.float32).max)
    assert check(x)
    assert check(x.to(torch.bfloat16)) is bool(torch.isfinite(x.to(torch.bfloat16)).all())


def test_dispatch_on_empty_integer_and_strided_tensors(monkeypatch):
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    x = torch.randn(40, 30)
    x[3, 0] = float("nan")
    assert all_finite(x[:, 1:]) and not all_finite(x.t())
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    assert not all_finite(x)
