"""Spherical linear interpolation of two tensors (as in mergekit and FusionBench).

With directions u = v / ||v|| (Frobenius norm; a tensor with norm <= 1e-8 is left unnormalised)
and d = <u0, u1>: if |d| > 0.9995 the result is the lerp (1 - t) v0 + t v1; otherwise, with
omega = arccos d, sin((1 - t) omega) / sin omega * v0 + sin(t omega) / sin omega * v1, the
coefficients multiplying the original tensors. t = 0 and t = 1 return the endpoints exactly.

The fast path never converts whole tensors: norms and the dot product are accumulated over
cache-sized blocks, and the result is one blocked weighted sum written in the output dtype. The
Triton path does the same in two launches: a reduction kernel writes each block's three float32
partial sums (||v0||², ||v1||², <v0, v1>), which are added on the host in float64, then the
weighted-sum kernel writes the result.
"""

from __future__ import annotations

import math

import torch

from workbench_kernels import block_size, implementation, jit, tl
from workbench_kernels.weighted_sum import BLOCK, weighted_sum_torch, weighted_sum_triton

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


@jit
def _slerp_partial_sums_kernel(v0_ptr, v1_ptr, partials_ptr, n, BLOCK: tl.constexpr):
    """One program per BLOCK elements: its (||v0||², ||v1||², <v0, v1>) in float32, at row pid."""
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(v0_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(v1_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(partials_ptr + pid * 3, tl.sum(x * x, axis=0))
    tl.store(partials_ptr + pid * 3 + 1, tl.sum(y * y, axis=0))
    tl.store(partials_ptr + pid * 3 + 2, tl.sum(x * y, axis=0))


def slerp_statistics_triton(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """(||v0||², ||v1||², <v0, v1>): per-block float32 partial sums from the kernel, added in
    float64 on the host so that the error does not grow with the number of blocks."""
    a, b = v0.contiguous().reshape(-1), v1.contiguous().reshape(-1)
    n = a.numel()
    if n == 0:
        return 0.0, 0.0, 0.0
    block = block_size()
    programs = -(-n // block)
    partials = torch.empty((programs, 3), dtype=torch.float32, device=a.device)
    _slerp_partial_sums_kernel[(programs,)](a, b, partials, n, BLOCK=block)
    sq0, sq1, dot = partials.double().sum(dim=0).tolist()
    return sq0, sq1, dot


def slerp_triton(v0: torch.Tensor, v1: torch.Tensor, t: float, compute_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Statistics by the reduction kernel, the result by the weighted-sum kernel. The kernels
    compute in float32; another compute dtype takes the blocked torch path."""
    out_dtype = out_dtype or compute_dtype
    if compute_dtype != torch.float32:
        return slerp_torch(v0, v1, t, compute_dtype, out_dtype)
    if t == 0.0 or t == 1.0:
        return (v0 if t == 0.0 else v1).to(out_dtype)
    sq0, sq1, dot = slerp_statistics_triton(v0, v1)
    c0, c1 = slerp_coefficients(math.sqrt(sq0), math.sqrt(sq1), dot, t)
    return weighted_sum_triton([v0, v1], [c0, c1], compute_dtype, out_dtype)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, compute_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dispatch on the inputs' device (see :func:`workbench_kernels.implementation`)."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes {list(v0.shape)} and {list(v1.shape)} differ")
    impl = implementation(v0.device)
    if impl == "reference":
        return slerp_reference(v0, v1, t, compute_dtype).to(out_dtype or compute_dtype)
    if impl == "triton":
        return slerp_triton(v0, v1, t, compute_dtype, out_dtype)
    return slerp_torch(v0, v1, t, compute_dtype, out_dtype)
