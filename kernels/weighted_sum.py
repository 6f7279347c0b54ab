"""N-way weighted sum with the dtype conversion fused: ``out = sum_i w_i * x_i``.

The core of linear merging and of task arithmetic written as ``(1 - lambda * sum w) * base +
sum (lambda * w_i) * x_i``. The fast torch path accumulates into one buffer in the compute dtype,
reading each input in its stored dtype (no full-precision copy of every input), so memory is one
accumulator whatever N is. Inputs with weight 0 are skipped entirely, so a zero weight removes a
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


def weighted_sum_torch(tensors: Sequence[torch.Tensor], weights: Sequence[float], compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One accumulator; each input is read once in its stored dtype and added with ``alpha``."""
    _check(tensors, weights)
    terms = [(x, w) for x, w in zip(tensors, weights) if w != 0.0]
    if not terms:
        return torch.zeros(tensors[0].shape, dtype=compute_dtype, device=tensors[0].device)
    first, w0 = terms[0]
    acc = torch.mul(first, w0) if first.dtype == compute_dtype else first.to(compute_dtype).mul_(w0)
    for x, w in terms[1:]:
        acc.add_(x, alpha=w)
    return acc


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dispatch: ``WORKBENCH_KERNELS=reference`` forces the reference; otherwise the fast torch path."""
    if selected_impl() == "reference":
        return weighted_sum_reference(tensors, weights, compute_dtype)
    return weighted_sum_torch(tensors, weights, compute_dtype)


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
