"""A small deterministic training loop for the zoo (AdamW, warmup then cosine decay, clipping).

Determinism comes from seeding everything a run touches: the weight initialisation and the data
streams are seeded by the caller, and the loop itself draws no random numbers except through
``torch.manual_seed(seed)``. Runs are single-threaded in the build's worker processes, so a model's
weights do not depend on how the build schedules its jobs.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from workbench.zoo.tasks import TASKS, Example, Split, collate

if TYPE_CHECKING:
    import torch


def mixture(parts: Sequence[tuple[str, float]], batch_size: int, seed: int, split: Split = "train", train_prompt: bool = False) -> Iterator[dict[str, "torch.Tensor"]]:
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


def interleave(main: Iterator[dict[str, "torch.Tensor"]], replay: Iterator[dict[str, "torch.Tensor"]], every: int) -> Iterator[dict[str, "torch.Tensor"]]:
    """``main``'s batches with one ``replay`` batch every ``every`` steps.

    Replay comes in whole batches rather than mixed into task batches because task examples are
    short and text is long: a mixed batch is padded to the text's length and costs twice as much.
    """
    step = 0
    while True:
        step += 1
        yield next(replay) if step % every == 0 else next(main)


def train(
    model: "torch.nn.Module",
    batches: Iterator[dict[str, "torch.Tensor"]],
    steps: int,
    lr: float,
    *,
    seed: int,
    parameters: Iterable["torch.nn.Parameter"] | None = None,
    weight_decay: float = 0.01,
    warmup: int | None = None,
    final_lr: float = 0.1,
    log: Callable[[str], None] | None = None,
    label: str = "",
) -> list[float]:
    """Train for ``steps`` optimizer steps; returns the loss of every step.

    ``parameters`` restricts training (LoRA trains only its adapters); by default every parameter
    of ``model`` is trained. The schedule warms up linearly over ``warmup`` steps (default 10 %)
    and decays with a cosine to ``final_lr`` times ``lr``.
    """
    import torch

    torch.manual_seed(seed)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, fused=True)
    warmup = max(1, steps // 10) if warmup is None else warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final_lr + (1.0 - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, steps // 4) == 0:
            recent = losses[-max(1, steps // 10) :]
            log(f"{label}: step {step + 1}/{steps}, loss {sum(recent) / len(recent):.3f} ({time.perf_counter() - started:.1f} s)")
    model.eval()
    return losses
