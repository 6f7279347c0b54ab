"""The data a data-driven method runs models on (``ot_fusion``'s activations, ``atlas``' objective,
``lora_experts``' routers): an evaluator's data batches (e.g. a zoo task's validation split) or a
text file cut into sequences with the anchor's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import RecipeError

if TYPE_CHECKING:
    from workbench.method import PluginLookup


def input_batches(
    data: dict[str, Any],
    samples: int,
    seed: int,
    anchor: Path,
    registry: "PluginLookup | None",
    who: str = "ot_fusion",
) -> list[dict[str, torch.Tensor]]:
    """At most ``samples`` sequences as model inputs (with labels where the evaluator gives them):
    ``{evaluator, options}`` or ``{text, seq_len}`` (cut with ``anchor``'s tokenizer). ``who``
    names the method in error messages."""
    if "evaluator" in data:
        if registry is None:  # a PrepareContext built by hand, without the run's registry
            raise RecipeError(f"{who}: data from evaluator '{data['evaluator']}' needs the run's registry.")
        evaluator = registry.make_evaluator(data["evaluator"], dict(data.get("options") or {}))
        batches, total = [], 0
        for batch in evaluator.batches(samples, seed):
            keep = min(samples - total, batch["input_ids"].shape[0])
            batches.append(
                {
                    key: value[:keep]
                    for key, value in batch.items()
                    if key in ("input_ids", "attention_mask", "labels")
                }
            )
            total += keep
            if total >= samples:
                break
        return batches
    if "text" in data:
        from transformers import AutoTokenizer

        text_file = Path(data["text"])
        if not text_file.is_file():
            raise RecipeError(f"{who}: data.text = {text_file} does not exist.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(anchor)
        except Exception as exc:
            raise RecipeError(
                f"{who}: data.text needs a tokenizer in {anchor} ({type(exc).__name__}: {exc})."
            ) from exc
        ids = tokenizer(text_file.read_text(), return_tensors="pt")["input_ids"][0]
        length = int(data.get("seq_len", 64))
        rows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:samples]
        if not rows:
            raise RecipeError(f"{who}: {text_file} holds fewer than seq_len = {length} tokens.")
        stacked = torch.stack(rows)
        return [{"input_ids": stacked, "attention_mask": torch.ones_like(stacked), "labels": stacked.clone()}]
    raise RecipeError(
        f"{who}: the data must be {{evaluator: NAME, options: {{...}}}} or {{text: FILE, seq_len: N}}."
    )
