"""Spherical linear interpolation of two tensors (as in mergekit and FusionBench).

With directions u = v / ||v|| (Frobenius norm; a tensor with norm <= 1e-8 is left unnormalised)
and d = <u0, u1>: if |d| > 0.9995 the result is the lerp (1 - t) v0 + t v1; otherwise, with
omega = arccos d, sin((1 - t) omega) / sin omega * v0 + sin(t omega) / sin omega * v1, the
coefficients multiplying the original tensors. t = 0 and t = 1 return the endpoints exactly.

The fast paths never convert whole tensors: norms and the dot product are accumulated over
cache-sized blocks (of a tensor in memory, or of one given block by block, :func:`slerp_weights`),
and the result is a weighted sum written in the output dtype (the CPU kernel of
:mod:`workbench_kernels.weighted_sum` on CPU). The Triton path does the same in two launches: a
reduction kernel writes each block's three float32 partial sums (||v0||², ||v1||², <v0, v1>),
which are added on the host in float64, then the weighted-sum kernel writes the result.
"""

from __future__ import annotations

import math

import torch

from workbench_kernels import block_size, implementation, jit, tl
from workbench_kernels.blocks import Blocks
from workbench_kernels.weighted_sum import BLOCK, weighted_sum_numba, weighted_sum_torch, weighted_sum_triton

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


def slerp_reference(
    v0: torch.Tensor, v1: torch.Tensor, t: float, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The definition, on whole tensors converted to the compute dtype."""
    a, b = v0.to(compute_dtype), v1.to(compute_dtype)
    if t == 0.0:
        return a
    if t == 1.0:
        return b
    n0, n1 = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    c0, c1 = slerp_coefficients(n0, n1, float(torch.dot(a.reshape(-1), b.reshape(-1))), t)
    return c0 * a + c1 * b


def _sums_torch(
    a: torch.Tensor, b: torch.Tensor, compute_dtype: torch.dtype
) -> list[tuple[float, float, float]]:
    """(||a||², ||b||², <a, b>) of each ``BLOCK`` of two flat tensors, in the compute dtype."""
    n = a.numel()
    buf_a = torch.empty(min(BLOCK, n), dtype=compute_dtype, device=a.device)
    buf_b = torch.empty_like(buf_a)
    sums = []
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        x, y = buf_a[: stop - start].copy_(a[start:stop]), buf_b[: stop - start].copy_(b[start:stop])
        sums.append((float(torch.dot(x, x)), float(torch.dot(y, y)), float(torch.dot(x, y))))
    return sums


def slerp_weights(
    blocks: Blocks, t: float, compute_dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """The coefficients of v0 and v1 (``blocks`` holds the two tensors, no base), from the norms and
    the dot product accumulated block by block: partial sums per ``BLOCK`` (torch) or per program
    (Triton), added with ``math.fsum`` so that the grouping into blocks does not change them. The
    reference concatenates the blocks and takes whole-tensor norms."""
    (a, _), _ = blocks.load(0)
    impl = implementation(a.device)
    if impl == "reference":
        pairs = [xs for _, xs, _ in blocks]
        v0, v1 = (torch.cat([p[i] for p in pairs]).to(compute_dtype) for i in (0, 1))
        return slerp_coefficients(
            float(torch.linalg.vector_norm(v0)),
            float(torch.linalg.vector_norm(v1)),
            float(torch.dot(v0, v1)),
            t,
        )
    sums: list[tuple[float, float, float]] = []
    for _, (v0, v1), _ in blocks:
        if impl == "triton" and compute_dtype == torch.float32:
            sums.extend(slerp_statistics_triton(v0, v1))
        else:
            sums.extend(_sums_torch(v0, v1, compute_dtype))
    sq0, sq1, dot = (math.fsum(column) for column in zip(*sums)) if sums else (0.0, 0.0, 0.0)
    return slerp_coefficients(math.sqrt(sq0), math.sqrt(sq1), dot, t)


def slerp_torch(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Blocked statistics (see :func:`slerp_weights`), then one blocked weighted sum."""
    out_dtype = out_dtype or compute_dtype
    if t == 0.0 or t == 1.0:
        return (v0 if t == 0.0 else v1).to(out_dtype)
    c0, c1 = slerp_weights(Blocks.whole([v0, v1], None), t, compute_dtype)
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


def slerp_statistics_triton(v0: torch.Tensor, v1: torch.Tensor) -> list[tuple[float, float, float]]:
    """(||v0||², ||v1||², <v0, v1>) of each program's block: float32 partial sums from the kernel,
    added on the host in float64 so that the error does not grow with the number of blocks."""
    a, b = v0.contiguous().reshape(-1), v1.contiguous().reshape(-1)
    n = a.numel()
    if n == 0:
        return []
    block = block_size()
    programs = -(-n // block)
    partials = torch.empty((programs, 3), dtype=torch.float32, device=a.device)
    _slerp_partial_sums_kernel[(programs,)](a, b, partials, n, BLOCK=block)
    return [tuple(row) for row in partials.double().tolist()]  # type: ignore[misc]


def slerp_triton(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Statistics by the reduction kernel, the result by the weighted-sum kernel. The kernels
    compute in float32; another compute dtype takes the blocked torch path."""
    out_dtype = out_dtype or compute_dtype
    if compute_dtype != torch.float32:
        return slerp_torch(v0, v1, t, compute_dtype, out_dtype)
    if t == 0.0 or t == 1.0:
        return (v0 if t == 0.0 else v1).to(out_dtype)
    c0, c1 = slerp_weights(Blocks.whole([v0, v1], None), t, compute_dtype)
    return weighted_sum_triton([v0, v1], [c0, c1], compute_dtype, out_dtype)


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dispatch on the inputs' device (see :func:`workbench_kernels.implementation`)."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes {list(v0.shape)} and {list(v1.shape)} differ")
    impl = implementation(v0.device, numba_on_cpu=False)  # its sum is weighted_sum's: the torch path on CPU
    if impl == "reference":
        return slerp_reference(v0, v1, t, compute_dtype).to(out_dtype or compute_dtype)
    if impl == "triton":
        return slerp_triton(v0, v1, t, compute_dtype, out_dtype)
    if impl == "numba" and t not in (0.0, 1.0):  # the torch path's statistics, the CPU kernel's sum
        return weighted_sum_numba(
            [v0, v1], slerp_weights(Blocks.whole([v0, v1], None), t, compute_dtype), compute_dtype, out_dtype
        )
    return slerp_torch(v0, v1, t, compute_dtype, out_dtype)
