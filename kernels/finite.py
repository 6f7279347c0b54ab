"""Whether a tensor holds no NaN or Inf: the engine asks it of every merged tensor.

The reference is ``isfinite(x).all()``. The torch path takes the smallest and the largest element
in one ``aminmax`` pass: both are finite exactly when every element is (a NaN propagates to both,
an infinity is the largest or the smallest); on one thread it reads bf16 about 18x faster than a
float32 sum (7.7 against 144 ms for 32.8M elements here). The CPU kernel (Numba) counts, per chunk
and on both cores, the elements whose magnitude is not at most the largest float32, which NaN and
Inf are not.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from workbench_kernels import cpu, implementation

_LARGEST = np.float32(np.finfo(np.float32).max)


def all_finite_reference(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def all_finite_torch(x: torch.Tensor) -> bool:
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


@cpu.kernel
def _count_non_finite_numba(x, kind, counts):  # pragma: no cover (compiled)
    n = x.size
    for chunk in numba.prange(counts.size):
        start, m = cpu.span(chunk, n)
        values = cpu.decoded(x, start, m, kind)
        bad = 0
        for j in range(values.size):
            bad += np.int32(not abs(values[j]) <= _LARGEST)
        counts[chunk] = bad


def all_finite_numba(x: torch.Tensor) -> bool:
    if not cpu.supported(x):
        return all_finite_torch(x)
    counts = np.empty(cpu.chunks(x.numel()), dtype=np.int64)
    _count_non_finite_numba(cpu.array(x), cpu.KINDS[x.dtype], counts)
    return not counts.any()


def all_finite(x: torch.Tensor) -> bool:
    """True for tensors without NaN/Inf (and for empty and integer tensors). On CPU the torch path
    by default: its one ``aminmax`` pass is as fast as the Numba count, without Numba's start-up."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    impl = implementation(x.device, numba_on_cpu=False)
    if impl == "reference":
        return all_finite_reference(x)
    return all_finite_numba(x) if impl == "numba" else all_finite_torch(x)
