"""Spherical linear interpolation of two tensors (as in mergekit and FusionBench).

With directions u = v / ||v|| (Frobenius norm; a tensor with norm <= 1e-8 is left unnormalised)
and d = <u0, u1>: if |d| > 0.9995 the result is the lerp (1 - t) v0 + t v1; otherwise, with
omega = arccos d, sin((1 - t) omega) / sin omega * v0 + sin(t omega) / sin omega * v1, the
coefficients multiplying the original tensors. t = 0 and t = 1 return the endpoints exactly.

The fast path never converts whole tensors: norms and the dot product are accumulated over
cache-sized blocks, and the result is one blocked weighted sum written in the output dtype.
"""

from __future__ import annotations

import math

import torch

from workbench_kernels import selected_impl
from workbench_kernels.weighted_sum import BLOCK, weighted_sum_torch

PARALLEL_THRESHOLD = 0.9995
SMALL_NORM = 1e-8


def slerp_coefficients(norm0: float, norm1: float, dot: float, t: float) -> tuple[float, float]:
    """The weights of v0 and v1, from the norms and the raw dot product of the two tensors."""
    d = dot / ((norm0 if norm0 > SMALL_NORM else 1.0) * (norm1 if norm1 > SMALL_NORM else 1.0))
    if abs(d) > PARALLEL_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, d)))
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp_reference(v0: torch.Tensor, v1: torch.Tensor, t: float, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition, on whole tensors converted to the compute dtype."""
    a, b = v0.to(compute_dtype), v1.to(compute_dtype)
    if t == 0.0:
        return a
    if t == 1.0:
        return b
    n0, n1 = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    c0, c1 = slerp_coefficients(n0, n1, float(torch.dot(a.reshape(-1), b.reshape(-1))), t)
    return c0 * a + c1 * b


def slerp_torch(v0: torch.Tensor, v1: torch.Tensor, t: float, compute_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Blocked statistics (accumulated in float64 across blocks), then one blocked weighted sum."""
    out_dtype = out_dtype or compute_dtype
    if t == 0.0 or t == 1.0:
        return (v0 if t == 0.0 else v1).to(out_dtype)
    a, b = v0.reshape(-1), v1.reshape(-1)
    n = a.numel()
    buf_a = torch.empty(min(BLOCK, n), dtype=compute_dtype, device=a.device)
    buf_b = torch.empty_like(buf_a)
    sq0 = sq1 = dot = 0.0
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        x, y = buf_a[: stop - start].copy_(a[start:stop]), buf_b[: stop - start].copy_(b[start:stop])
        sq0 += float(torch.dot(x, x))
        sq1 += float(torch.dot(y, y))
        dot += float(torch.dot(x, y))
    c0, c1 = slerp_coefficients(math.sqrt(sq0), math.sqrt(sq1), dot, t)
    return weighted_sum_torch([v0, v1], [c0, c1], compute_dtype, out_dtype)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, compute_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dispatch: ``WORKBENCH_KERNELS=reference`` forces the reference; otherwise the blocked path."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes {list(v0.shape)} and {list(v1.shape)} differ")
    if selected_impl() == "reference":
        return slerp_reference(v0, v1, t, compute_dtype).to(out_dtype or compute_dtype)
    return slerp_torch(v0, v1, t, compute_dtype, out_dtype)
