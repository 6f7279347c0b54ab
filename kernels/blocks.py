"""A tensor's inputs as consecutive flat blocks, loaded on demand.

Statistics of a whole tensor (top-k thresholds, L1 norms, slerp's norms and dot product) are
gathered from :class:`Blocks` in as many passes as they need, so that a merge never holds a whole
large tensor: the engine's inputs are memory-mapped, so loading a block again costs page faults,
not a copy. :meth:`Blocks.whole` wraps tensors already in memory as a single block, which is how
the whole-tensor entry points of the ops call the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

#: One block's flat inputs: the models' blocks (in order) and the base's block (None without one).
Loaded = tuple[list[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Blocks:
    """``starts[i]`` is the flat index of block i's first element; ``load(i)`` returns its inputs,
    flattened, the same values on every call."""

    numel: int
    starts: Sequence[int]
    load: Callable[[int], Loaded]

    @staticmethod
    def whole(xs: Sequence[torch.Tensor], base: torch.Tensor | None) -> Blocks:
        flat = ([x.reshape(-1) for x in xs], None if base is None else base.reshape(-1))
        numel = (base if base is not None else xs[0]).numel()
        return Blocks(numel, [0], lambda i: flat)

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor | None]]:
        """(start, models, base) of every block, in order."""
        for i, start in enumerate(self.starts):
            xs, base = self.load(i)
            yield start, xs, base

    def select(self, models: Sequence[int]) -> Blocks:
        """The same blocks with only these models (base unchanged)."""

        def load(i: int) -> Loaded:
            xs, base = self.load(i)
            return [xs[m] for m in models], base

        return Blocks(self.numel, self.starts, load)
