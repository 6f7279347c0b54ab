"""DARE's random drop, from a counter-based generator: the same mask on any device, thread count or
block order.

Element ``i`` of a tensor is kept when ``bits(i, seed) >> 8 < round(density * 2**24)``, where
``bits`` is a 32-bit hash of the element's flat index keyed by the 64-bit seed:
``h(h(i ^ seed_lo) ^ seed_hi)``, with ``h`` the integer hash
``x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15`` (mod 2**32; constants
from Chris Wellons' hash-prospector search, chosen for low bias). A counter-based generator needs no
state, so any block of any tensor is drawn independently, in parallel, on CPU or GPU, with identical
bits. Both multipliers are below 2**31, so the torch path computes exactly in int64 without overflow.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from workbench_kernels import block_size, cpu, implementation, jit, tl

MASK32 = 0xFFFFFFFF
_M1 = 0x21F0AAAD
_M2 = 0x735A2D97
#: Uniform draws have 24 bits: enough resolution for any density, exact in float32 as well.
RESOLUTION = 1 << 24
#: Elements per block of the torch path (int64 temporaries stay in cache).
BLOCK = 1 << 16


def keep_below(density: float) -> int:
    """Draws below this (of ``RESOLUTION``) are kept: ``round(density * 2**24)``."""
    return max(0, min(RESOLUTION, round(density * RESOLUTION)))


def seed_words(seed: int) -> tuple[int, int]:
    """The low and high 32 bits of a 64-bit seed."""
    return seed & MASK32, (seed >> 32) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The hash on an int64 tensor of values below 2**32 (products stay below 2**63)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def draws(start: int, count: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 24-bit draws of elements ``start .. start + count - 1`` (int64)."""
    lo, hi = seed_words(seed)
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return hash32(hash32(index ^ lo) ^ hi) >> 8


def keep_mask_reference(
    numel: int, density: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The definition on the whole tensor at once."""
    _check(numel)
    return draws(0, numel, seed, device) < keep_below(density)


def keep_mask_torch(
    numel: int, density: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Blocked, so the int64 temporaries stay in cache."""
    _check(numel)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    threshold = keep_below(density)
    for start in range(0, numel, BLOCK):
        count = min(BLOCK, numel - start)
        torch.lt(draws(start, count, seed, device), threshold, out=out[start : start + count])
    return out


@jit
def hash32_triton(x):
    """The hash on uint32 values (wrapping multiplication)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@jit
def draws_triton(offsets, seed_lo, seed_hi):
    """24-bit draws of the elements at ``offsets`` (int64 < 2**32), as int32."""
    x = hash32_triton(offsets.to(tl.uint32) ^ seed_lo.to(tl.uint32))
    x = hash32_triton(x ^ seed_hi.to(tl.uint32))
    return (x >> 8).to(tl.int32)


@cpu.helper
def hash32_numba(x: np.uint32) -> np.uint32:
    """The hash on one uint32 (products truncated to 32 bits)."""
    x = x ^ (x >> np.uint32(16))
    x = np.uint32(x * np.uint32(_M1))
    x = x ^ (x >> np.uint32(15))
    x = np.uint32(x * np.uint32(_M2))
    return x ^ (x >> np.uint32(15))


@cpu.helper
def draw_numba(index: int, seed_lo: np.uint32, seed_hi: np.uint32) -> np.uint32:
    """The 24-bit draw of the element at flat ``index`` (< 2**32)."""
    return hash32_numba(hash32_numba(np.uint32(index) ^ seed_lo) ^ seed_hi) >> np.uint32(8)


@jit
def _keep_mask_kernel(out_ptr, n, seed_lo, seed_hi, threshold, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = draws_triton(offsets, seed_lo, seed_hi) < threshold
    tl.store(out_ptr + offsets, keep.to(tl.int8), mask=offsets < n)


def keep_mask_triton(
    numel: int, density: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    _check(numel)
    out = torch.empty(numel, dtype=torch.int8, device=device)
    if numel:
        lo, hi = seed_words(seed)
        block = block_size()
        _keep_mask_kernel[(-(-numel // block),)](out, numel, lo, hi, keep_below(density), BLOCK=block)
    return out.view(torch.bool)


@cpu.kernel
def _keep_mask_kernel_numba(out, seed_lo, seed_hi, threshold):  # pragma: no cover (compiled)
    for chunk in numba.prange(cpu.chunks(out.size)):
        start, m = cpu.span(chunk, out.size)
        dst = out[start : start + m]
        for j in range(dst.size):
            dst[j] = draw_numba(start + j, seed_lo, seed_hi) < threshold


def keep_mask_numba(
    numel: int, density: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The CPU kernel: the draws of both cores' chunks, straight into the mask."""
    _check(numel)
    if torch.device(device).type != "cpu" or not cpu.usable():
        return keep_mask_torch(numel, density, seed, device)
    out = torch.empty(numel, dtype=torch.bool)
    lo, hi = seed_words(seed)
    _keep_mask_kernel_numba(out.numpy(), np.uint32(lo), np.uint32(hi), np.uint32(keep_below(density)))
    return out


def keep_mask(
    shape: tuple[int, ...] | torch.Size, density: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """DARE's keep-mask of a tensor of this shape: Bernoulli(density) per element, fixed by the seed."""
    numel = 1
    for d in shape:
        numel *= d
    impl = implementation(torch.device(device))
    make = {
        "reference": keep_mask_reference,
        "torch": keep_mask_torch,
        "numba": keep_mask_numba,
        "triton": keep_mask_triton,
    }[impl]
    return make(numel, density, seed, device).view(tuple(shape))


def _check(numel: int) -> None:
    if numel >= 1 << 32:
        raise ValueError(f"DARE masks index elements with 32 bits; a tensor of {numel} elements is too large")
