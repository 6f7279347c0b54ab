"""Exact k-th largest magnitude over many tensors, streamed, without sorting or holding them.

TIES trims each task vector to its top-k entries by magnitude over the *whole model* (one threshold
per task vector), but a model does not fit in memory as one vector. Non-negative float32 values
order like their bit patterns read as integers, so a two-pass radix select finds the exact
threshold: pass 1 counts the upper 16 bits of every |x| in a 65536-bin histogram, which locates the
bin holding the k-th largest; pass 2 counts the lower 16 bits of the values in that bin. Memory is
two histograms, whatever the model size; the inputs are read twice.
"""

from __future__ import annotations

from typing import Iterable

import torch

BINS = 1 << 16
#: Elements converted at a time (bounds the int64 temporaries of ``bincount``).
BLOCK = 1 << 20


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    bits = x.detach().reshape(-1).to(torch.float32).abs().view(torch.int32)
    if bool((bits > 0x7F800000).any()):
        raise ValueError("magnitude threshold: the values hold NaN")
    return bits


class KthLargestMagnitude:
    """Feed every tensor to :meth:`count` (pass 1), call :meth:`locate`, feed them again to
    :meth:`refine` (pass 2), then :meth:`threshold` is the exact k-th largest ``|x|`` (1-based)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self.total = 0
        self._high = torch.zeros(BINS, dtype=torch.int64)
        self._low = torch.zeros(BINS, dtype=torch.int64)
        self._bin: int | None = None
        self._rank_in_bin = 0

    def count(self, x: torch.Tensor) -> None:
        bits = _magnitude_bits(x)
        for start in range(0, bits.numel(), BLOCK):
            block = bits[start : start + BLOCK]
            self._high += torch.bincount((block >> 16).long(), minlength=BINS)
        self.total += bits.numel()

    def locate(self) -> None:
        if self.k > self.total:
            raise ValueError(f"k = {self.k} exceeds the {self.total} values counted")
        # Walk the bins from the largest magnitudes down until k values are covered.
        from_top = torch.flip(self._high, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(self.k)))
        self._bin = BINS - 1 - index
        above = int(from_top[index - 1]) if index > 0 else 0
        self._rank_in_bin = self.k - above

    def refine(self, x: torch.Tensor) -> None:
        if self._bin is None:
            raise RuntimeError("call locate() after the counting pass")
        bits = _magnitude_bits(x)
        for start in range(0, bits.numel(), BLOCK):
            block = bits[start : start + BLOCK]
            inside = block[(block >> 16) == self._bin]
            if inside.numel():
                self._low += torch.bincount((inside & 0xFFFF).long(), minlength=BINS)

    def threshold(self) -> float:
        if self._bin is None:
            raise RuntimeError("call locate() and refine() first")
        from_top = torch.flip(self._low, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(self._rank_in_bin)))
        low = BINS - 1 - index
        bits = torch.tensor([(self._bin << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32)[0])


def kth_largest_magnitude(tensors: Iterable[torch.Tensor], k: int) -> float:
    """Both passes over an in-memory collection (the streaming engine calls the passes itself)."""
    items = list(tensors)
    select = KthLargestMagnitude(k)
    for x in items:
        select.count(x)
    select.locate()
    for x in items:
        select.refine(x)
    return select.threshold()


def kth_largest_magnitude_reference(tensors: Iterable[torch.Tensor], k: int) -> float:
    """By sorting everything: the definition, for tests."""
    values = torch.cat([x.detach().reshape(-1).to(torch.float32).abs() for x in tensors])
    return float(torch.sort(values, descending=True).values[k - 1])
