"""DELLA's MagPrune keep-mask (arXiv 2406.11617; mergekit 0.1.5's ``della_magprune``): entries of a
task vector are kept at random with a probability that grows with their magnitude's rank in their row.

In each slice along dimension 1 (a row of a matrix; a 1-D tensor is one row of its own), the entries
are ranked by magnitude, r = 0 for the smallest up to n − 1, and entry j is kept with probability
``p_j = (density − epsilon) + 2·epsilon·r_j / (n − 1)``: the mean keep probability is ``density``, the
largest entries are kept more often. The draws come from DARE's counter-based generator
(:mod:`workbench_kernels.dare`: a 24-bit draw per flat index, keyed by the seed), so a block of rows
is drawn on its own, identically on any device, thread count or blocking; an entry is kept when
``draw < p_j·2**24``. Equal magnitudes rank by position (a stable sort), where mergekit's argsort
picks among them arbitrarily. A slice of one entry (n = 1, where mergekit divides 0 by 0) gets
``p = density``.

The kept entries are then rescaled, over the whole tensor, so that the L1 norm of the task vector is
unchanged (mergekit), or each one by 1/p_j (the paper's unbiased rescaling): see ``rescale_factor``
in :mod:`workbench_kernels.sparsify`.

Two implementations with identical results: :func:`magprune_torch` (the definition, on whole
tensors of probabilities and draws) and :func:`magprune_numba` (the CPU kernel: from each row's
stable sort order, every entry's draw and keep decision in one pass over both cores, with no
probability, rank or draw tensor; measured 3x faster on a 4M-element block, most of what is left
being the sort).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from workbench_kernels import cpu, implementation
from workbench_kernels.dare import RESOLUTION, draw_numba, draws, seed_words


def check_band(density: float, epsilon: float) -> None:
    """mergekit's rule: the probabilities must lie in (0, 1) when anything is dropped."""
    if 0.0 < density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(
            f"density {density} ± epsilon {epsilon} must lie inside (0, 1); "
            f"choose epsilon below {min(density, 1.0 - density):g}"
        )


def keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_j of every entry (float64, ``tau``'s shape), ranks taken along dimension 1 (the whole vector
    of a 1-D tensor). ``tau`` must hold whole slices: whole rows of a matrix, or a whole vector."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    n = rows.shape[1]
    if n < 2:
        return torch.full(tau.shape, density, dtype=torch.float64, device=tau.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(n, device=tau.device).view(1, n, *([1] * (rows.dim() - 2))).expand_as(order)
    ranks.scatter_(1, order, positions)
    del order
    low = density - epsilon
    return (ranks.to(torch.float64) * (2.0 * epsilon / (n - 1)) + low).view(tau.shape)


def _check_draws(offset: int, numel: int) -> None:
    if offset + numel > 1 << 32:
        raise ValueError(f"MagPrune draws index elements with 32 bits; {offset + numel} are too many")


def magprune_torch(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int,
    offset: int = 0,
    *,
    inverse_probability: bool = False,
    probabilities: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition (see :func:`magprune`), for any shape and device."""
    if density >= 1.0:
        return tau
    if density <= 0.0:
        return tau.zero_()
    check_band(density, epsilon)
    _check_draws(offset, tau.numel())
    p = keep_probabilities(tau, density, epsilon) if probabilities is None else probabilities
    keep = draws(offset, tau.numel(), seed, tau.device).view(tau.shape) < p * RESOLUTION
    tau.masked_fill_(keep.logical_not_(), 0.0)
    return tau.div_(p.to(tau.dtype)) if inverse_probability else tau


@cpu.kernel
def _magprune_kernel_numba(tau, order, low, step, seed_lo, seed_hi, offset, inverse):  # pragma: no cover
    rows, n = tau.shape
    for i in numba.prange(rows):
        first = offset + i * n
        for r in range(n):
            j = order[i, r]
            p = r * step + low
            if draw_numba(first + j, seed_lo, seed_hi) < p * RESOLUTION:
                if inverse:
                    tau[i, j] = tau[i, j] / np.float32(p)
            else:
                tau[i, j] = 0.0


def magprune_numba(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int,
    offset: int = 0,
    *,
    inverse_probability: bool = False,
    probabilities: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CPU kernel, for contiguous float32 matrices and vectors on CPU (others, and probabilities
    given beforehand, take :func:`magprune_torch`)."""
    if (
        not 0.0 < density < 1.0
        or probabilities is not None
        or tau.dim() > 2
        or tau.dtype != torch.float32
        or tau.device.type != "cpu"
        or not tau.is_contiguous()
        or not cpu.usable()
    ):
        return magprune_torch(
            tau,
            density,
            epsilon,
            seed,
            offset,
            inverse_probability=inverse_probability,
            probabilities=probabilities,
        )
    check_band(density, epsilon)
    _check_draws(offset, tau.numel())
    rows = tau.view(1, -1) if tau.dim() < 2 else tau
    n = rows.shape[1]
    if n < 2:  # every entry at p = density: the torch path's rule
        return magprune_torch(tau, density, epsilon, seed, offset, inverse_probability=inverse_probability)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    lo, hi = seed_words(seed)
    _magprune_kernel_numba(
        rows.numpy(),
        order.numpy(),
        density - epsilon,
        2.0 * epsilon / (n - 1),
        np.uint32(lo),
        np.uint32(hi),
        offset,
        inverse_probability,
    )
    return tau


def magprune(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int,
    offset: int = 0,
    *,
    inverse_probability: bool = False,
    probabilities: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tau`` pruned in place: a block of whole slices starting at flat index ``offset`` of its tensor,
    with the dropped entries zeroed and, with ``inverse_probability``, each kept one divided by its p.
    ``density >= 1`` keeps everything (as in mergekit), ``<= 0`` nothing. ``probabilities``: this
    block's p, computed beforehand (a 1-D tensor merged in blocks ranks over the whole vector)."""
    run = magprune_numba if implementation(tau.device) == "numba" else magprune_torch
    return run(
        tau,
        density,
        epsilon,
        seed,
        offset,
        inverse_probability=inverse_probability,
        probabilities=probabilities,
    )
