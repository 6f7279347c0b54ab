"""The LoRA delta-add kernel: reference, blocked torch path and Triton kernel (under the interpreter
on CPU) against W + scale · B @ A written out in float64 here."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from workbench_kernels.lora_delta import (
    BLOCK,
    lora_delta_add,
    lora_delta_add_reference,
    lora_delta_add_torch,
    lora_delta_add_triton,
)

IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": lora_delta_add_reference,
    "torch": lora_delta_add_torch,
    "triton": lora_delta_add_triton,
}
SCALE = 0.75

# (out, in, r); the last two span several row blocks of the torch path, and a row longer than one block
SHAPES = [(1, 1, 1), (7, 7, 8), (1023, 7, 17), (7, 1023, 1), (1, 65537, 8), (257, 255, 17), (600, 1023, 8)]
LONG_ROW = (3, BLOCK + 5, 2)


def _factors(
    out: int, inp: int, rank: int, dtype: torch.dtype, transposed: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w_shape = (inp, out) if transposed else (out, inp)
    return (
        torch.randn(w_shape, generator=gen).to(dtype),
        torch.randn(out, rank, generator=gen).to(dtype),
        torch.randn(rank, inp, generator=gen).to(dtype),
    )


def _expected(
    W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 sum, and an elementwise magnitude |W| + |scale| · |B| @ |A| for error bounds."""
    delta = scale * (B.double() @ A.double())
    magnitude = abs(scale) * (B.double().abs() @ A.double().abs())
    if transposed:
        delta, magnitude = delta.T, magnitude.T
    return W.double() + delta, W.double().abs() + magnitude


def _assert_close(
    out: torch.Tensor,
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    transposed: bool,
    out_dtype: torch.dtype,
) -> None:
    expected, magnitude = _expected(W, B, A, scale, transposed)
    assert out.dtype == out_dtype and out.shape == W.shape
    # float32 products summed over r, one scaling and one addition; then one rounding into out_dtype
    rank = B.shape[1]
    bound = (
        (rank + 3) * torch.finfo(torch.float32).eps * magnitude
        + torch.finfo(out_dtype).eps * expected.abs()
        + 1e-30
    )
    diff = (out.double() - expected).abs()
    assert bool((diff <= bound).all()), f"worst error {diff.max().item():.3g}"


def _dtypes(impl: str) -> list[torch.dtype]:
    # Under the Triton interpreter bf16 stores truncate instead of rounding: bf16 is checked on the
    # torch path and the reference only.
    return [torch.float32, torch.float16] + ([] if impl == "triton" else [torch.bfloat16])


CASES = [(impl, dtype) for impl in IMPLS for dtype in _dtypes(impl)]
CASE_IDS = [f"{impl}-{str(dtype).removeprefix('torch.')}" for impl, dtype in CASES]


@pytest.mark.parametrize("impl, dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_float64_definition(
    impl: str, dtype: torch.dtype, shape: tuple[int, int, int], transposed: bool
) -> None:
    W, B, A = _factors(*shape, dtype, transposed, seed=sum(shape))
    originals = (W.clone(), B.clone(), A.clone())
    out = IMPLS[impl](W, B, A, SCALE, transposed)
    _assert_close(out, W, B, A, SCALE, transposed, dtype)
    assert all(torch.equal(x, x0) for x, x0 in zip((W, B, A), originals))
    assert out.data_ptr() != W.data_ptr()


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_rows_longer_than_one_block(impl: str) -> None:
    W, B, A = _factors(*LONG_ROW, torch.bfloat16, False, seed=2)
    _assert_close(IMPLS[impl](W, B, A, -1.5), W, B, A, -1.5, False, torch.bfloat16)


@pytest.mark.parametrize("impl, dtype", CASES, ids=CASE_IDS)
def test_non_contiguous_inputs(impl: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(255, 2 * 257, generator=gen).to(dtype)[:, ::2]  # strided columns, [255, 257]
    B = torch.randn(17, 255, generator=gen).to(dtype).T  # transposed view, [255, 17]
    A = torch.randn(17, 300, generator=gen).to(dtype)[:, 5:262]  # slice of columns, [17, 257]
    assert not (W.is_contiguous() or B.is_contiguous() or A.is_contiguous())
    originals = (W.clone(), B.clone(), A.clone())
    _assert_close(IMPLS[impl](W, B, A, SCALE), W, B, A, SCALE, False, dtype)
    Wt = (
        torch.randn(255, 257, generator=gen).to(dtype).T
    )  # transposed layout (W is [in, out]): [257, 255], column-major
    _assert_close(IMPLS[impl](Wt, B, A, SCALE, True), Wt, B, A, SCALE, True, dtype)
    assert all(torch.equal(x, x0) for x, x0 in zip((W, B, A), originals))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_out_dtype(impl: str, out_dtype: torch.dtype) -> None:
    W, B, A = _factors(
        33, 65, 4, torch.float16 if out_dtype == torch.float32 else torch.float32, False, seed=4
    )
    _assert_close(IMPLS[impl](W, B, A, 2.0, out_dtype=out_dtype), W, B, A, 2.0, False, out_dtype)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_mixed_factor_dtypes(impl: str) -> None:
    """Factors stored in another dtype than W are read as they are and multiplied in float32."""
    W, B, A = _factors(40, 50, 3, torch.float32, False, seed=5)
    B16, A16 = B.half(), A.half()
    _assert_close(IMPLS[impl](W, B16, A16, SCALE), W, B16, A16, SCALE, False, torch.float32)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_zero_rank_returns_w(impl: str) -> None:
    W = torch.randn(9, 20)
    out = IMPLS[impl](W, torch.zeros(9, 0), torch.zeros(0, 20), SCALE)
    assert torch.equal(out, W)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_shapes_are_refused(impl: str) -> None:
    W, B, A = _factors(6, 5, 2, torch.float32, False, seed=1)
    with pytest.raises(ValueError, match="do not make"):
        IMPLS[impl](W, B, A.T.contiguous(), SCALE)
    with pytest.raises(ValueError, match="transposed"):
        IMPLS[impl](W, B, A, SCALE, True)
    with pytest.raises(ValueError, match="2-D"):
        IMPLS[impl](W.reshape(-1), B, A, SCALE)
    with pytest.raises(ValueError, match="non-float"):
        IMPLS[impl](W.long(), B, A, SCALE)


def test_dispatcher_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    W, B, A = _factors(20, 30, 4, torch.float32, False, seed=8)
    for impl in IMPLS:
        monkeypatch.setenv("WORKBENCH_KERNELS", impl)
        _assert_close(lora_delta_add(W, B, A, SCALE), W, B, A, SCALE, False, torch.float32)
        with monkeypatch.context() as patch:  # and really calls the implementation it names
            patch.setattr(
                f"workbench_kernels.lora_delta.lora_delta_add_{impl}", lambda *args: torch.full((1,), 3.0)
            )
            assert torch.equal(lora_delta_add(W, B, A, SCALE), torch.full((1,), 3.0))
