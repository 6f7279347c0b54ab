"""Exact order statistics (the value at a given rank of the sorted data) of float32 data.

Methods that rank parameters across a whole model (PCB-merging's quantile clipping and drop
threshold) need ``sorted(x)[k]`` over billions of values that never sit in memory together.
``RadixSelect`` finds it exactly in two streaming passes: float32 values are mapped to int32 keys
whose order is the float order, the first pass counts the top 16 key bits (65536 bins), the second
counts the low 16 bits inside the bin that holds each rank. Memory is a few histograms, whatever the
model size. ``kth_smallest`` is the in-memory version (unlike ``torch.quantile`` it has no
input-size limit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_BINS = 1 << 16
_HALF = 1 << 15
_LOW = _BINS - 1
_MAGNITUDE = 0x7FFFFFFF


def sortable_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys whose order is the order of the float32 values of ``x`` (NaN aside).

    Non-negative floats keep their bit pattern; negative ones get their magnitude bits flipped, so
    a larger magnitude gives a smaller (negative) key. int32 keeps this and the histograms cheap
    (``bincount`` on int32 measured ~8x faster than on int64).
    """
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
    flip = bits >> 31  # -1 for negative floats, else 0 (arithmetic shift)
    flip &= _MAGNITUDE
    flip ^= bits
    return flip


def key_to_value(key: int) -> float:
    """The float32 value of one key (inverse of :func:`sortable_keys`)."""
    bits = key if key >= 0 else key ^ _MAGNITUDE
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def kth_smallest(x: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """``sorted(x.flatten())[k]`` (0-based) for each k in ``ranks``, of data in memory.

    The same two histogram passes as :class:`RadixSelect`, with the keys computed once: on 2 cores
    this measured several times faster than ``torch.kthvalue`` on multi-million-element tensors.
    """
    select = RadixSelect(ranks)
    keys = sortable_keys(x)
    select.coarse_keys(keys)
    select.start_fine()
    select.fine_keys(keys)
    return select.values()


class RadixSelect:
    """Exact ``sorted(stream)[k]`` for several ranks ``k`` of one float32 stream, in two passes.

    Feed every chunk of the stream to :meth:`coarse`, call :meth:`start_fine`, feed the same chunks
    (same values, any order or chunking) to :meth:`fine`, then read :meth:`values`.
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self.ranks = list(ranks)
        self.count = 0
        self._coarse = torch.zeros(_BINS, dtype=torch.int64)
        self._bins: list[int] = []
        self._offsets: list[int] = []  # rank of each k inside its coarse bin
        self._fine: dict[int, torch.Tensor] = {}

    def coarse(self, x: torch.Tensor) -> None:
        self.coarse_keys(sortable_keys(x))

    def fine(self, x: torch.Tensor) -> None:
        self.fine_keys(sortable_keys(x))

    def coarse_keys(self, keys: torch.Tensor) -> None:
        self.count += keys.numel()
        self._coarse += torch.bincount((keys >> 16) + _HALF, minlength=_BINS).cpu()

    def start_fine(self) -> None:
        cumulative = torch.cumsum(self._coarse, 0)
        for k in self.ranks:
            if not 0 <= k < self.count:
                raise ValueError(f"rank {k} is outside 0..{self.count - 1}")
            b = int(torch.searchsorted(cumulative, torch.tensor(k, dtype=torch.int64), right=True))
            self._bins.append(b)
            self._offsets.append(k - (int(cumulative[b - 1]) if b > 0 else 0))
        self._fine = {b: torch.zeros(_BINS, dtype=torch.int64) for b in set(self._bins)}

    def fine_keys(self, keys: torch.Tensor) -> None:
        high = keys >> 16
        for b, hist in self._fine.items():
            inside = keys[high == b - _HALF]
            if inside.numel():
                hist += torch.bincount(inside & _LOW, minlength=_BINS).cpu()

    def values(self) -> list[float]:
        out = []
        for b, offset in zip(self._bins, self._offsets):
            cumulative = torch.cumsum(self._fine[b], 0)
            low = int(torch.searchsorted(cumulative, torch.tensor(offset, dtype=torch.int64), right=True))
            out.append(key_to_value((b - _HALF) * _BINS + low))
        return out
