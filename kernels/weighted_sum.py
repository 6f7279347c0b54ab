"""N-way weighted sum with the dtype conversion fused: ``out = sum_i w_i * x_i``.

The core of linear merging and of task arithmetic written as ``(1 - lambda * sum w) * base +
sum (lambda * w_i) * x_i``. The fast torch path accumulates block by block into one cache-sized
buffer in the compute dtype, reading each input in its stored dtype (no full-precision copy of any
input) and writing each block in the output dtype, so memory is the output plus one small buffer
whatever N is. Inputs with weight 0 are skipped entirely, so a zero weight removes a
model's influence even where it holds NaN or Inf.
"""

from __future__ import annotations

from typing import Sequence

import torch

from workbench_kernels import selected_impl


def weighted_sum_reference(tensors: Sequence[torch.Tensor], weights: Sequence[float], compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain definition: every input with a non-zero weight converted, scaled, then summed in order."""
    _check(tensors, weights)
    terms = [(x, w) for x, w in zip(tensors, weights) if w != 0.0]
    if not terms:
        return torch.zeros(tensors[0].shape, dtype=compute_dtype, device=tensors[0].device)
    total = terms[0][0].to(compute_dtype) * terms[0][1]
    for x, w in terms[1:]:
        total = total + x.to(compute_dtype) * w
    return total


#: Elements per block of the fast path: the accumulator (1 MiB in float32) stays in cache while
#: every input is added, which measured ~10x faster on 2 cores than whole-tensor ops.
BLOCK = 1 << 18


def weighted_sum_torch(tensors: Sequence[torch.Tensor], weights: Sequence[float], compute_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Blocked: one cache-sized accumulator; inputs are read in their stored dtype, added with
    ``alpha``, and each block is converted straight into the output dtype."""
    _check(tensors, weights)
    out_dtype = out_dtype or compute_dtype
    first = tensors[0]
    terms = [(x.reshape(-1), w) for x, w in zip(tensors, weights) if w != 0.0]
    out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    if not terms:
        return out.zero_()
    flat_out = out.view(-1)
    n = flat_out.numel()
    acc_buffer = torch.empty(min(BLOCK, n), dtype=compute_dtype, device=first.device)
    (x0, w0), rest = terms[0], terms[1:]
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        acc = acc_buffer[: stop - start]
        acc.copy_(x0[start:stop]).mul_(w0)
        for x, w in rest:
            acc.add_(x[start:stop], alpha=w)
        flat_out[start:stop].copy_(acc)
    return out


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], compute_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dispatch: ``WORKBENCH_KERNELS=reference`` forces the reference; otherwise the fast torch path."""
    if selected_impl() == "reference":
        return weighted_sum_reference(tensors, weights, compute_dtype).to(out_dtype or compute_dtype)
    return weighted_sum_torch(tensors, weights, compute_dtype, out_dtype)


def _check(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not tensors:
        raise ValueError("weighted_sum needs at least one tensor")
    if len(tensors) != len(weights):
        raise ValueError(f"weighted_sum got {len(tensors)} tensors but {len(weights)} weights")
    shape = tensors[0].shape
    for i, x in enumerate(tensors):
        if x.shape != shape:
            raise ValueError(f"weighted_sum: tensor {i} has shape {list(x.shape)}, expected {list(shape)}")
        if not x.is_floating_point():
            raise ValueError(f"weighted_sum: tensor {i} has non-float dtype {x.dtype}")
