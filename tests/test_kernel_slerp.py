"""The slerp kernel: blocked fast path, Triton path (under the interpreter on CPU) and the reference
against an independent float64 formula."""

from __future__ import annotations

import math

import pytest
import torch

from workbench_kernels.slerp import slerp, slerp_reference, slerp_statistics_triton, slerp_torch, slerp_triton
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


# The Triton path runs under the interpreter here: fp32 and fp16 only (its bf16 stores truncate).
TRITON_SHAPES = [(1,), (7,), (1023,), (65537,)]


def _triton_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_statistics_match_float64_sums(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    a, b = _triton_inputs(shape, dtype, shape[0])
    a64, b64 = a.double(), b.double()
    expected = (float((a64 * a64).sum()), float((b64 * b64).sum()), float((a64 * b64).sum()))
    got = [math.fsum(column) for column in zip(*slerp_statistics_triton(a, b))]
    magnitude = float(a64.norm() * b64.norm())  # bounds |<a, b>|; the squares are their own bounds
    for value, want, bound in zip(got, expected, (expected[0], expected[1], magnitude)):
        assert abs(value - want) <= 1e-6 * bound + 1e-30


@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [0.0, 1.0, 0.3])
def test_triton_path_matches_definition(shape: tuple[int, ...], dtype: torch.dtype, t: float) -> None:
    a, b = _triton_inputs(shape, dtype, shape[0] + 11)
    originals = (a.clone(), b.clone())
    out = slerp_triton(a, b, t, torch.float32, torch.float32)
    assert out.dtype == torch.float32 and out.shape == a.shape
    if t in (0.0, 1.0):
        assert torch.equal(out, (a if t == 0.0 else b).float())
    else:
        expected = _independent_slerp(a, b, t)
        scale = expected.abs().max().item() + 1e-12
        assert (out.double() - expected).abs().max().item() <= 1e-5 * scale
    assert torch.equal(a, originals[0]) and torch.equal(b, originals[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_path_non_contiguous_2d_and_out_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(21)
    a = torch.randn(33, 258, generator=gen).to(dtype)[:, ::2]  # strided columns
    b = torch.randn(129, 33, generator=gen).to(dtype).t()  # transposed view
    assert not a.is_contiguous() and not b.is_contiguous()
    expected = _independent_slerp(a, b, 0.3)
    out = slerp_triton(a, b, 0.3, torch.float32, dtype)
    assert out.dtype == dtype and out.shape == (33, 129)
    # rounded once into the output dtype, after a float32 computation
    bound = torch.finfo(dtype).eps * expected.abs() + 1e-5 * expected.abs().max()
    assert bool(((out.double() - expected).abs() <= bound).all())


@pytest.mark.parametrize("other", ["double", "nearly", "opposite"])
def test_triton_path_takes_the_lerp_branch_for_parallel_vectors(other: str) -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(1023, generator=gen)
    b = {"double": 2.0 * a, "nearly": a + 0.01 * torch.randn(1023, generator=gen), "opposite": -0.5 * a}[
        other
    ]
    t = 0.3
    expected = (1 - t) * a.double() + t * b.double()
    out = slerp_triton(a, b, t)
    # near-parallel slerp differs from the lerp by ~1e-5 relative: the bound tells the branches apart
    assert torch.allclose(out.double(), expected, rtol=0, atol=1e-6)


def test_dispatcher_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _triton_inputs((1023,), torch.float32, 3)
    expected = _independent_slerp(a, b, 0.3)
    for impl in ("reference", "torch", "triton"):
        monkeypatch.setenv("WORKBENCH_KERNELS", impl)
        assert (
            slerp(a, b, 0.3).double() - expected
        ).abs().max().item() <= 1e-5 * expected.abs().max().item(), impl
    monkeypatch.setenv("WORKBENCH_KERNELS", "triton")
    with monkeypatch.context() as patch:  # the dispatcher really takes the Triton path when asked
        patch.setattr("workbench_kernels.slerp.slerp_triton", lambda *args: torch.full((1023,), 7.0))
        assert torch.equal(slerp(a, b, 0.3), torch.full((1023,), 7.0))
