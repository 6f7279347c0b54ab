"""A LoRA change added to its weight: ``out = W + scale · B @ A`` (``(B @ A)ᵀ`` when ``transposed``).

W is [out, in] (or [in, out] when transposed, GPT-2's Conv1D layout), B is [out, r], A is [r, in].
Everything is computed in float32 and rounded once into the output dtype (W's by default), in the
order the definition gives: the product, then the scaling, then the addition of W.

Three implementations: the reference (whole tensors), the blocked torch path (CPU: a few rows at
a time through one cache-sized float32 buffer, so neither a float32 copy of W nor a full ΔW ever
exists) and a Triton kernel (one program per output tile: the rank is walked in chunks with
``tl.dot`` in IEEE float32, W's tile is added and the tile stored in the output dtype). All three
read every input in its stored dtype and layout: views (a slice of rows, a transpose) cost no copy.
"""

from __future__ import annotations

import math

import torch

from workbench_kernels import block_size, implementation, jit, tl

#: Elements of the float32 buffer of the torch path (1 MiB): a block of rows stays in cache while
#: its product is scaled, W is added and the result converted.
BLOCK = 1 << 18


def _factors(
    W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked shapes; returns ``(left, right)`` with ``out = W + scale · left @ right`` (views)."""
    for name, x in (("W", W), ("B", B), ("A", A)):
        if x.ndim != 2:
            raise ValueError(f"lora_delta_add: {name} must be 2-D, got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"lora_delta_add: {name} has non-float dtype {x.dtype}")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_delta_add: B {list(B.shape)} and A {list(A.shape)} do not make B @ A")
    left, right = (A.T, B.T) if transposed else (B, A)
    expected = (left.shape[0], right.shape[1])
    if tuple(W.shape) != expected:
        raise ValueError(
            f"lora_delta_add: W is {list(W.shape)}, but "
            f"the{' transposed' if transposed else ''} delta is {list(expected)}"
        )
    return left, right


def lora_delta_add_reference(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    transposed: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The definition on whole float32 tensors."""
    _factors(W, B, A, transposed)
    delta = (B.float() @ A.float()) * scale
    return (W.float() + (delta.T if transposed else delta)).to(out_dtype or W.dtype)


def lora_delta_add_torch(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    transposed: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Row-blocked: each block's product goes into one float32 buffer, is scaled, gets W's rows
    added (read in W's dtype) and is converted into the output."""
    left, right = _factors(W, B, A, transposed)
    rows, cols = W.shape
    out = torch.empty((rows, cols), dtype=out_dtype or W.dtype, device=W.device)
    if out.numel() == 0:
        return out
    right = right.float()  # [r, cols]: as small as the factors
    step = max(1, BLOCK // cols)
    buffer = torch.empty((min(step, rows), cols), dtype=torch.float32, device=W.device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = buffer[: stop - start]
        torch.mm(left[start:stop].float(), right, out=block)
        block.mul_(scale).add_(W[start:stop])
        out[start:stop].copy_(block)
    return out


@jit
def _lora_delta_add_kernel(
    w_ptr,
    left_ptr,
    right_ptr,
    out_ptr,
    rows,
    cols,
    rank,
    scale,
    stride_w_row,
    stride_w_col,
    stride_left_row,
    stride_left_k,
    stride_right_k,
    stride_right_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per output tile: float32 ``left @ right`` over the rank in BLOCK_K chunks (the
    masked tail reads zeros, so a rank below tl.dot's minimum of 16 needs no other path), then
    ``acc * scale + W`` stored in the output dtype. The output is contiguous."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok, col_ok = row < rows, col < cols
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for k_start in range(0, rank, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        k_ok = k < rank
        left = tl.load(
            left_ptr + row[:, None] * stride_left_row + k[None, :] * stride_left_k,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        right = tl.load(
            right_ptr + k[:, None] * stride_right_k + col[None, :] * stride_right_col,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(left, right, acc, input_precision="ieee")
    tile_ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(
        w_ptr + row[:, None] * stride_w_row + col[None, :] * stride_w_col, mask=tile_ok, other=0.0
    ).to(tl.float32)
    result = acc * scale + w
    tl.store(out_ptr + row[:, None] * cols + col[None, :], result.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _power_of_two_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(0, value - 1).bit_length()))


def lora_delta_add_triton(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    transposed: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Launcher: tiles sized to the matrix within :func:`block_size`'s budget (at least 16 on
    every side, tl.dot's minimum); strides are passed as they are, so views are never copied."""
    left, right = _factors(W, B, A, transposed)
    rows, cols = W.shape
    rank = left.shape[1]
    out = torch.empty((rows, cols), dtype=out_dtype or W.dtype, device=W.device)
    if out.numel() == 0:
        return out
    budget = max(block_size(), 4096)  # elements per tile: 64 x 64 on a GPU
    block_rows = _power_of_two_between(rows, 16, math.isqrt(budget))
    block_cols = _power_of_two_between(cols, 16, budget // block_rows)
    block_k = _power_of_two_between(rank, 16, 32)
    grid = (-(-rows // block_rows), -(-cols // block_cols))
    _lora_delta_add_kernel[grid](
        W,
        left,
        right,
        out,
        rows,
        cols,
        rank,
        float(scale),
        W.stride(0),
        W.stride(1),
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        BLOCK_K=block_k,
    )
    return out


def lora_delta_add(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    transposed: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dispatch on W's device (see :func:`workbench_kernels.implementation`)."""
    impl = implementation(W.device)
    if impl == "reference":
        return lora_delta_add_reference(W, B, A, scale, transposed, out_dtype)
    if impl == "triton":
        return lora_delta_add_triton(W, B, A, scale, transposed, out_dtype)
    return lora_delta_add_torch(W, B, A, scale, transposed, out_dtype)
