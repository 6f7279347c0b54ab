"""The weighted-sum kernel: fast path, reference and dispatch against a float64 sum, and through the engine."""

from __future__ import annotations

import pytest
import torch
from merging import combo, merge, q

from workbench_kernels.weighted_sum import (
    weighted_sum,
    weighted_sum_numba,
    weighted_sum_reference,
    weighted_sum_torch,
)

IMPLS = {
    "torch": weighted_sum_torch,
    "numba": weighted_sum_numba,
    "reference": weighted_sum_reference,
    "dispatch": weighted_sum,
}


def exact_sum(tensors: list[torch.Tensor], w: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return combo([x for x, c in zip(tensors, w) if c != 0.0], [c for c in w if c != 0.0])


def assert_kernel_close(
    out: torch.Tensor, tensors: list[torch.Tensor], w: list[float], compute: torch.dtype
) -> None:
    expected, magnitude = exact_sum(tensors, w)
    assert out.dtype == compute
    assert out.shape == tensors[0].shape
    # Each of the N products and N-1 sums rounds once in the compute dtype (weights too, in half types).
    bound = 2 * len(tensors) * torch.finfo(compute).eps * magnitude + torch.finfo(compute).tiny
    diff = (out.double() - expected).abs()
    assert bool((diff <= bound).all()), f"worst error {diff.max().item():.3g}"


@pytest.mark.parametrize("numel", [1, 7, 1023, 65537, (1 << 18) + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("same_compute", [False, True])
def test_kernel_fast_path_equals_reference(numel, dtype, same_compute):
    compute = dtype if same_compute else torch.float32
    g = torch.Generator().manual_seed(numel)
    tensors = [torch.randn(numel, generator=g).to(dtype) for _ in range(3)]
    originals = [x.clone() for x in tensors]
    w = [0.3, -0.7, 1.9]
    fast = weighted_sum_torch(tensors, w, compute)
    ref = weighted_sum_reference(tensors, w, compute)
    for out in (fast, ref):
        assert_kernel_close(out, tensors, w, compute)
    # The two implementations agree to within the rounding of the compute dtype.
    expected, magnitude = exact_sum(tensors, w)
    assert bool(
        (
            (fast.double() - ref.double()).abs()
            <= 4 * len(w) * torch.finfo(compute).eps * magnitude + torch.finfo(compute).tiny
        ).all()
    )
    if compute == torch.float32:  # the CPU kernel does the reference's operations in its order
        assert torch.equal(weighted_sum_numba(tensors, w, compute), ref)
    for x, x0 in zip(tensors, originals):  # inputs untouched
        assert torch.equal(x, x0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("large", [False, True])
def test_kernel_non_contiguous_2d(impl, dtype, large):
    g = torch.Generator().manual_seed(5)
    tensors = [
        torch.randn(37, 130, generator=g).to(dtype)[:, ::2],  # strided columns
        torch.randn(65, 37, generator=g).to(dtype).t(),  # transposed view
        torch.randn(37, 65, generator=g).to(dtype),  # contiguous
    ]
    if large:  # more elements than one block of the fast path
        tensors = [
            torch.randn(513, 1100, generator=g).to(dtype)[:, ::2],
            torch.randn(550, 513, generator=g).to(dtype).t(),
            torch.randn(513, 550, generator=g).to(dtype),
        ]
    assert not tensors[0].is_contiguous() and not tensors[1].is_contiguous()
    originals = [x.clone() for x in tensors]
    w = [1.0, 0.25, -2.0]
    out = IMPLS[impl](tensors, w, torch.float32)
    assert_kernel_close(out, tensors, w, torch.float32)
    for x, x0 in zip(tensors, originals):
        assert torch.equal(x, x0)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_kernel_mixed_input_dtypes(impl):
    g = torch.Generator().manual_seed(4)
    tensors = [
        torch.randn(300_001, generator=g).to(torch.bfloat16),
        torch.randn(300_001, generator=g).to(torch.float16),
        torch.randn(300_001, generator=g),
        torch.randn(300_001, generator=g).double(),
    ]
    w = [0.5, -0.25, 1.5, 0.125]
    assert_kernel_close(IMPLS[impl](tensors, w, torch.float32), tensors, w, torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_kernel_out_dtype(out_dtype):
    """With an output dtype the sum is computed in the compute dtype and rounded once into it."""
    g = torch.Generator().manual_seed(9)
    numel = 2 * (1 << 18) + 11
    tensors = [torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(3)]
    w = [0.25, 0.6, -0.3]
    expected, magnitude = exact_sum(tensors, w)
    for impl in ("torch", "numba", "dispatch"):
        out = IMPLS[impl](tensors, w, torch.float32, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (numel,)
        bound = (
            torch.finfo(out_dtype).eps * expected.abs()
            + 8 * torch.finfo(torch.float32).eps * magnitude
            + 1e-30
        )
        assert bool(((out.double() - expected).abs() <= bound).all()), impl


@pytest.mark.parametrize("impl", list(IMPLS))
def test_kernel_first_input_in_compute_dtype_is_not_modified(impl):
    """An input already in the compute dtype must not be scaled in place (it may be the caller's)."""
    x = torch.arange(10, dtype=torch.float32)
    y = torch.ones(10, dtype=torch.bfloat16)
    before = x.clone()
    out = IMPLS[impl]([x, y], [0.5, 2.0], torch.float32)
    assert torch.equal(x, before)
    assert torch.equal(out, before * 0.5 + 2.0)
    assert out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("position", [0, 1, 2])
def test_kernel_zero_weight_skips_nan_input(impl, position):
    g = torch.Generator().manual_seed(position)
    tensors = [torch.randn(257, generator=g).to(torch.bfloat16) for _ in range(3)]
    tensors[position] = torch.full((257,), float("nan"), dtype=torch.bfloat16)
    tensors[position][::3] = float("inf")
    w = [0.5, -1.5, 2.0]
    w[position] = 0.0
    out = IMPLS[impl](tensors, w, torch.float32)
    assert bool(torch.isfinite(out).all())
    assert_kernel_close(out, tensors, w, torch.float32)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_kernel_all_zero_weights_give_zeros(impl):
    tensors = [torch.full((3, 5), float("nan")), torch.randn(3, 5)]
    out = IMPLS[impl](tensors, [0.0, 0.0], torch.float64)
    assert out.dtype == torch.float64 and out.shape == (3, 5)
    assert torch.equal(out, torch.zeros(3, 5, dtype=torch.float64))


def test_kernel_dispatch_honours_environment(monkeypatch):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4099, generator=g).to(torch.bfloat16) for _ in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    assert torch.equal(
        weighted_sum(tensors, w, torch.bfloat16), weighted_sum_reference(tensors, w, torch.bfloat16)
    )
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    assert torch.equal(
        weighted_sum(tensors, w, torch.bfloat16), weighted_sum_torch(tensors, w, torch.bfloat16)
    )
    monkeypatch.setenv("WORKBENCH_KERNELS", "bogus")
    with pytest.raises(ValueError):
        weighted_sum(tensors, w)


def test_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError):
        weighted_sum_torch([], [])
    with pytest.raises(ValueError):
        weighted_sum_torch([torch.ones(3)], [1.0, 2.0])
    with pytest.raises(ValueError):
        weighted_sum_torch([torch.ones(3), torch.ones(4)], [1.0, 2.0])
    with pytest.raises(ValueError):
        weighted_sum_torch([torch.ones(3, dtype=torch.int64)], [1.0])


def test_engine_with_reference_kernels_matches_fast_path(tmp_path, tiny_family, monkeypatch):
    text = f"""
method: linear
models:
  - model: {q(tiny_family["base"])}
    parameters: {{weight: 0.2}}
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 0.3}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 0.5}}
output: {{dtype: float32}}
"""
    fast = merge(tmp_path, text, "fast")
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    ref = merge(tmp_path, text, "ref")
    for name in fast:
        assert torch.allclose(fast[name], ref[name], rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("impl", ["torch", "numba", "reference"])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
def test_kernel_half_compute_sums_in_float32_and_rounds_once(impl, compute):
    """A task-arithmetic-shaped sum c0 * base + c1 * a + c2 * b in a half compute dtype equals the float64
    sum rounded once on nearly every element; summing in the half type itself (each term rounded, as a
    plain bf16 computation does) misses far more often, so the check can tell them apart. The weights
    have many bits, so that exact sums rarely fall on a midpoint between two half values (where a float32
    sum one ulp off rounds the other way)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(20000, generator=g).to(compute)
    tensors = [base, *[(base.float() + 0.01 * torch.randn(20000, generator=g)).to(compute) for _ in range(2)]]
    w = [0.4142, 0.2929, 0.2929]
    exact = sum(x.double() * c for x, c in zip(tensors, w)).float().to(compute)
    out = IMPLS[impl](tensors, w, compute)
    assert out.dtype == compute
    assert (out == exact).double().mean() > 0.999
    assert torch.equal(out, weighted_sum_torch(tensors, w, torch.float32).to(compute))
    naive = tensors[0] * w[0]
    for x, c in zip(tensors[1:], w[1:]):
        naive = naive + x * c
    assert (naive == exact).double().mean() < 0.9
