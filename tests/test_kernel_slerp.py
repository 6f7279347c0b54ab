"""The slerp kernel: blocked fast path against the reference and an independent float64 formula."""

from __future__ import annotations

import math

import pytest
import torch

from workbench_kernels.slerp import slerp, slerp_reference, slerp_torch
from workbench_kernels.weighted_sum import BLOCK

SHAPES = [(1,), (7,), (1023,), (65537,), (BLOCK + 3,), (33, 129)]


def _independent_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Written out from the definition, in float64, without the code under test."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a64.norm().item(), b64.norm().item()
    ua = a64 / na if na > 1e-8 else a64
    ub = b64 / nb if nb > 1e-8 else b64
    d = torch.dot(ua, ub).item()
    if abs(d) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        w = math.acos(max(-1.0, min(1.0, d)))
        out = math.sin((1 - t) * w) / math.sin(w) * a64 + math.sin(t * w) / math.sin(w) * b64
    return out.reshape(a.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [0.3, 0.5, 0.9])
def test_fast_path_matches_definition(shape: tuple[int, ...], dtype: torch.dtype, t: float) -> None:
    gen = torch.Generator().manual_seed(hash((shape, t)) % 2**31)
    a = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape, generator=gen).to(dtype)
    expected = _independent_slerp(a, b, t)
    fast = slerp_torch(a, b, t, torch.float32, torch.float32)
    ref = slerp_reference(a, b, t, torch.float32)
    scale = expected.abs().max().item() + 1e-12
    assert (fast.double() - expected).abs().max().item() <= 1e-5 * scale
    assert (ref.double() - expected).abs().max().item() <= 1e-5 * scale


def test_non_contiguous_and_near_parallel() -> None:
    a = torch.randn(40, 70)[:, ::2]
    b = a + 1e-4 * torch.randn(40, 35)  # |cos| > 0.9995: linear interpolation
    out = slerp(a, b, 0.25)
    assert torch.allclose(out.double(), 0.75 * a.double() + 0.25 * b.double(), atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_endpoints_are_exact(t: float) -> None:
    a = torch.randn(1000).to(torch.bfloat16)
    b = torch.randn(1000).to(torch.bfloat16)
    out = slerp(a, b, t, torch.float32, torch.bfloat16)
    assert torch.equal(out, a if t == 0.0 else b)


def test_zero_norm_tensor_is_not_normalised() -> None:
    a = torch.zeros(64)
    b = torch.randn(64)
    expected = _independent_slerp(a, b, 0.5)
    assert torch.allclose(slerp(a, b, 0.5).double(), expected, atol=1e-6)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="differ"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)
