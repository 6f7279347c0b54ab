"""The training loop shared by the zoo, MoLA experts and routers: AdamW, warm-up then cosine decay.

Determinism comes from seeding everything a run touches: the weight initialisation and the data
streams are seeded by the caller, and the loop itself draws no random numbers except through
``torch.manual_seed(seed)``. The zoo's builds run it single-threaded in worker processes, so a
model's weights do not depend on how the build schedules its jobs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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
            log(
                f"{label}: step {step + 1}/{steps}, loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - started:.1f} s)"
            )
    model.eval()
    return losses
