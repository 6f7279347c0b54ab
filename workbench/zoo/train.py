"""The zoo's training batches: seeded mixtures of its tasks, and replay interleaved into them (the loop
that trains on them is :func:`workbench.modeling.training.train`)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from workbench.zoo.tasks import TASKS, Example, Split, collate

if TYPE_CHECKING:
    import torch


def mixture(
    parts: Sequence[tuple[str, float]],
    batch_size: int,
    seed: int,
    split: Split = "train",
    train_prompt: bool = False,
) -> Iterator[dict[str, "torch.Tensor"]]:
    """Endless batches drawn from several tasks with the given weights.

    Each task gets its own example stream (seeded by ``seed`` and its position in ``parts``), so
    adding a task to a mixture does not change the examples the others produce.
    """
    streams = [TASKS[name].stream(seed * 1000 + i, split) for i, (name, _) in enumerate(parts)]
    weights = [weight for _, weight in parts]
    rng = random.Random(f"mixture:{seed}")
    while True:
        chosen = rng.choices(range(len(streams)), weights, k=batch_size)
        examples: list[Example] = [next(streams[i]) for i in chosen]
        yield collate(examples, train_prompt=train_prompt)


def interleave(
    main: Iterator[dict[str, "torch.Tensor"]], replay: Iterator[dict[str, "torch.Tensor"]], every: int
) -> Iterator[dict[str, "torch.Tensor"]]:
    """``main``'s batches with one ``replay`` batch every ``every`` steps.

    Replay comes in whole batches rather than mixed into task batches because task examples are
    short and text is long: a mixed batch is padded to the text's length and costs twice as much.
    """
    step = 0
    while True:
        step += 1
        yield next(replay) if step % every == 0 else next(main)
