"""Learning the coefficients of ``atlas``: θ(Λ) = θ₀ + Σ_t λ[t, b(n), k(e)] τ_t, only Λ trained.

The base model is loaded once; every step builds the trained tensors from Λ and runs the model on
them through ``torch.func.functional_call``, so gradients reach Λ alone (the base and the task
vectors are constants). Each step takes one batch per task and averages the tasks' losses (aTLAS
splits one joint batch evenly across its tasks), then AdamW with gradient clipping. Every
``eval_every`` steps the same objective on held-out sequences decides which Λ is kept, so a run
that overfits its few examples keeps its best point.

Objectives: ``cross_entropy`` on the labelled tokens (aTLAS), or ``entropy`` of the predictions
(AdaMerging, no labels): at the end of each prompt, where the answer starts, for data that marks
a prompt (labels -100 before the answer), else at every token. Label values never enter it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from workbench.errors import RecipeError

Objective = Literal["cross_entropy", "entropy"]
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    objective: Objective
    steps: int
    lr: float
    weight_decay: float
    grad_clip: float
    batch_size: int
    eval_every: int
    seed: int


@dataclass
class Sequences:
    """One task's sequences, right-padded to a common length (padding: mask 0, label -100)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def take(self, index: torch.Tensor) -> Batch:
        mask = self.attention_mask[index]
        length = max(int(mask.sum(1).max()), 1)
        batch = {"input_ids": self.input_ids[index, :length], "attention_mask": mask[:, :length]}
        if self.labels is not None:
            batch["labels"] = self.labels[index, :length]
        return batch


def sequences(batches: list[Batch]) -> Sequences:
    """Concatenate an evaluator's batches (each padded to its own length)."""
    length = max(int(b["input_ids"].shape[1]) for b in batches)
    labelled = all("labels" in b for b in batches)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.cat(
            [torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=value) for b in batches]
        )

    return Sequences(pad("input_ids", 0), pad("attention_mask", 0), pad("labels", -100) if labelled else None)


def split(data: Sequences, holdout: float, generator: torch.Generator) -> tuple[Sequences, Sequences | None]:
    """A random ``holdout`` share of the sequences (at least one) kept aside for choosing the step."""
    count = len(data)
    kept = min(max(1, round(holdout * count)), count - 1) if holdout > 0 and count > 1 else 0
    order = torch.randperm(count, generator=generator)

    def part(index: torch.Tensor) -> Sequences:
        return Sequences(
            data.input_ids[index],
            data.attention_mask[index],
            None if data.labels is None else data.labels[index],
        )

    return part(order[kept:]), (part(order[:kept]) if kept else None)


def objective_terms(logits: torch.Tensor, batch: Batch, objective: Objective) -> tuple[torch.Tensor, int]:
    """(sum over the positions the objective reads, their count) for one batch."""
    logits = logits[:, :-1].float()
    labels = batch.get("labels")
    if objective == "cross_entropy":
        if labels is None:
            raise RecipeError(
                "atlas: objective 'cross_entropy' needs labelled data (an evaluator's "
                "batches or a text file); use objective 'entropy' for unlabelled data."
            )
        targets = labels[:, 1:]
        count = int((targets != -100).sum())
        return torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        ), count
    if labels is None:
        scored, prompted = (
            batch["attention_mask"][:, 1:].bool(),
            torch.zeros(logits.shape[0], dtype=torch.bool),
        )
    else:
        scored, prompted = labels[:, 1:] != -100, labels[:, 0] == -100
    first = scored & (scored.long().cumsum(1) == 1)  # the prediction of each answer's first token
    used = torch.where(prompted[:, None], first, scored)
    log_p = torch.log_softmax(logits[used], dim=-1)
    return -(log_p.exp() * log_p).sum(), int(used.sum())


@dataclass
class TrainedTensors:
    """The tensors whose coefficients are learned, and how Λ reaches each element."""

    base: dict[str, torch.Tensor]  # θ₀ (the loaded model's own parameters)
    task_vectors: dict[str, torch.Tensor]  # [T, *shape]
    blocks: dict[str, int]  # tensor -> block index into Λ
    assignments: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # tensor -> partition of each element (K > 1)

    def merged(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, base in self.base.items():
            coefficients = lam[:, self.blocks[name], :].to(base.dtype)  # [T, K]
            vectors = self.task_vectors[name]
            if name in self.assignments:
                out[name] = base + (coefficients[:, self.assignments[name].long()] * vectors).sum(0)
            else:
                out[name] = base + torch.tensordot(coefficients[:, 0], vectors, dims=1)
        return out


@dataclass
class LearnResult:
    lam: torch.Tensor  # the kept Λ, [T, B, K]
    best_step: int
    history: list[
        dict[str, float | None]
    ]  # per evaluation: step, mean training loss since the last, held-out loss
    seconds: float


def _evaluate(
    model: torch.nn.Module, merged: dict[str, torch.Tensor], tasks: list[Sequences], settings: Settings
) -> float:
    """The objective over every held-out sequence, averaged per task, then over tasks."""
    from torch.func import functional_call

    losses = []
    with torch.no_grad():
        for data in tasks:
            total, count = torch.zeros(()), 0
            for start in range(0, len(data), settings.batch_size):
                batch = data.take(torch.arange(start, min(start + settings.batch_size, len(data))))
                logits = functional_call(
                    model,
                    merged,
                    args=(),
                    kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                ).logits
                part, n = objective_terms(logits, batch, settings.objective)
                total, count = total + part, count + n
            losses.append(float(total) / max(count, 1))
    return sum(losses) / len(losses)


def learn(
    model: torch.nn.Module,
    tensors: TrainedTensors,
    lam: torch.Tensor,
    train: list[Sequences],
    held_out: list[Sequences] | None,
    settings: Settings,
    note: Callable[[str], None],
) -> LearnResult:
    """Train Λ (a copy of ``lam``) on the tasks' sequences; return the Λ with the best held-out
    objective (the last one without held-out data)."""
    from torch.func import functional_call

    started = time.perf_counter()
    model.eval()  # no dropout: the objective is a function of Λ alone
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # Λ is kept in float64 (the merge computes in float32): a coefficient that training leaves
    # alone stays exactly the value it was given, e.g. task arithmetic's λ.
    lam = torch.nn.Parameter(lam.detach().to(torch.float64).clone())
    optimizer = torch.optim.AdamW([lam], lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    orders = [torch.empty(0, dtype=torch.long) for _ in train]
    history: list[dict[str, float | None]] = []
    best = (math.inf, 0, lam.detach().clone())
    running: list[float] = []

    def checkpoint(step: int) -> None:
        nonlocal best
        running_mean = sum(running) / len(running) if running else None
        record: dict[str, float | None] = {"step": step, "train_loss": running_mean}
        if held_out:
            record["held_out_loss"] = score = _evaluate(
                model, tensors.merged(lam.detach()), held_out, settings
            )
            if score < best[0]:
                best = (score, step, lam.detach().clone())
        history.append(record)
        running.clear()
        trained = f" {record['train_loss']:.4f}" if running_mean is not None else " (start)"
        shown = f", held-out {score:.4f}" if held_out else ""
        note(f"atlas: step {step}/{settings.steps}: {settings.objective}{trained}{shown}")

    checkpoint(0)
    for step in range(1, settings.steps + 1):
        total = torch.zeros(())
        merged = tensors.merged(lam)
        for t, data in enumerate(train):
            size = min(settings.batch_size, len(data))
            if len(orders[t]) < size:  # a new epoch: the rest of this one, then a fresh order
                orders[t] = torch.cat([orders[t], torch.randperm(len(data), generator=generator)])
            index, orders[t] = orders[t][:size], orders[t][size:]
            batch = data.take(index)
            logits = functional_call(
                model,
                merged,
                args=(),
                kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            ).logits
            part, count = objective_terms(logits, batch, settings.objective)
            total = total + part / max(count, 1)
        loss = total / len(train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([lam], settings.grad_clip)
        optimizer.step()
        running.append(float(loss.detach()))
        if step % settings.eval_every == 0 or step == settings.steps:
            checkpoint(step)
    kept = best if held_out else (math.nan, settings.steps, lam.detach().clone())
    return LearnResult(kept[2], kept[1], history, time.perf_counter() - started)
