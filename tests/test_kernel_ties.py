"""The fused TIES-family merge: eager torch blocks, the Numba kernel and the Triton kernel equal the
reference definition (itself checked against float64 arithmetic in test_ties_dare.py)."""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.cpu import CHUNK
from workbench_kernels.sparsify import TaskVector
from workbench_kernels.task_vector_merge import merge_task_vectors, merge_task_vectors_reference

CASES = {
    "ties": (
        [
            TaskVector(1.0, 0.5, "magnitude"),
            TaskVector(0.7, 0.2, "magnitude"),
            TaskVector(1.3, 1.0, "magnitude"),
        ],
        True,
        True,
    ),
    "ties_unnormalised": (
        [TaskVector(1.0, 0.3, "magnitude"), TaskVector(-0.5, 0.6, "magnitude")],
        True,
        False,
    ),
    "dare_ties_l1": (
        [
            TaskVector(1.0, 0.5, "random", rescale="l1", seed=11),
            TaskVector(0.5, 0.8, "random", rescale="l1", seed=12),
            TaskVector(0.2, 1.0, "random", rescale="l1", seed=13),
        ],
        True,
        True,
    ),
    "dare_linear_inverse": (
        [
            TaskVector(0.6, 0.3, "random", rescale="inverse_density", seed=5),
            TaskVector(0.4, 0.9, "random", rescale="inverse_density", seed=6),
        ],
        False,
        True,
    ),
}


def family(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    return base, [(base.float() + 0.02 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]


def run_both(base, xs, specs, consensus, normalize, out_dtype):
    kwargs = dict(consensus=consensus, normalize=normalize, scale=0.8)
    got = merge_task_vectors(base, xs, specs, **kwargs, out_dtype=out_dtype)
    expected = merge_task_vectors_reference(base, xs, specs, **kwargs).to(out_dtype)
    return got, expected


@pytest.mark.parametrize("impl", ["torch", "numba"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [1, 7, 1023, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_paths_equal_reference(impl, case, n, dtype, monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    specs, consensus, normalize = CASES[case]
    base, xs = family((n,), dtype, len(specs), seed=n)
    got, expected = run_both(base, xs, specs, consensus, normalize, dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [1, 7, 1023, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_reference(case, n, dtype, monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "triton")
    specs, consensus, normalize = CASES[case]
    base, xs = family((n,), dtype, len(specs), seed=n)
    got, expected = run_both(base, xs, specs, consensus, normalize, dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("impl", ["torch", "numba"])
@pytest.mark.parametrize("case", ["ties", "dare_ties_l1"])
def test_strided_bf16_views(impl, case, monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    specs, consensus, normalize = CASES[case]
    base, xs = family((300, 514), torch.bfloat16, len(specs))
    base, xs = base[:, ::2], [x[:, ::2] for x in xs]
    got, expected = run_both(base, xs, specs, consensus, normalize, torch.bfloat16)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("stored", "out"),
    [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_numba_output_dtype_differs_from_the_inputs(stored, out, monkeypatch):
    """The kernel rounds its float32 result straight into another stored dtype, as torch does."""
    monkeypatch.setenv("WORKBENCH_KERNELS", "numba")
    specs, consensus, normalize = CASES["ties"]
    base, xs = family((CHUNK * 2 + 3,), stored, len(specs), seed=9)
    got, expected = run_both(base, xs, specs, consensus, normalize, out)
    assert got.dtype == out and torch.equal(got, expected)


@pytest.mark.parametrize("impl", ["torch", "numba", "triton"])
def test_non_contiguous_2d_and_float32_output(impl, monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    specs, consensus, normalize = CASES["ties"]
    base, xs = family((65, 37), torch.float32, len(specs), seed=4)
    base, xs = base.t(), [x.t() for x in xs]
    got, expected = run_both(base, xs, specs, consensus, normalize, torch.float32)
    assert got.shape == (37, 65) and torch.equal(got, expected)
