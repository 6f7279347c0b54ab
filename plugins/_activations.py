"""Activations for ``ot_fusion``'s activation-based ground cost, captured with forward hooks.

Each unit becomes a point whose coordinates are its activations over the same inputs in every
model (a bounded number of sequences, padding left out), standardised per unit as in Imfeld et
al. (2024): subtract the mean, divide by the standard deviation + 1e-9. Units are the residual
dimensions (the hidden states entering every layer and leaving the last, concatenated: one basis
for the whole stream), each attention head (its query outputs; a key/value head its key and value
outputs), and each MLP hidden unit (the input of ``down_proj``: act(gate) · up). Inputs come from an
evaluator's data batches (e.g. a zoo task's validation split) or from a text file cut into
sequences with the anchor's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import RecipeError

if TYPE_CHECKING:
    from workbench.registry import Registry


@dataclass
class Activations:
    """Per-unit activation vectors (rows: units; columns: the sampled token positions)."""

    resid: torch.Tensor
    query: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (heads, head_dim * tokens)
    key_value: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (kv heads, 2 * head_dim * tokens)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (intermediate, tokens)


def standardised(units: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, divided by its standard deviation + 1e-9."""
    centred = units - units.mean(dim=1, keepdim=True)
    return centred / (centred.std(dim=1, keepdim=True) + 1e-9)


def input_batches(data: dict[str, Any], samples: int, seed: int, anchor: Path, registry: "Registry") -> list[dict[str, torch.Tensor]]:
    """At most ``samples`` sequences as model inputs: ``{evaluator, options}`` or ``{text, seq_len}``."""
    if "evaluator" in data:
        from workbench.evaluation import make_evaluators
        from workbench.recipe import EvaluatorSpec

        [evaluator] = make_evaluators([EvaluatorSpec(name=data["evaluator"], options=dict(data.get("options") or {}))], registry)
        batches, total = [], 0
        for batch in evaluator.batches(samples, seed):
            keep = min(samples - total, batch["input_ids"].shape[0])
            batches.append({"input_ids": batch["input_ids"][:keep], "attention_mask": batch["attention_mask"][:keep]})
            total += keep
            if total >= samples:
                break
        return batches
    if "text" in data:
        from transformers import AutoTokenizer

        text_file = Path(data["text"])
        if not text_file.is_file():
            raise RecipeError(f"ot_fusion: data.text = {text_file} does not exist.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(anchor)
        except Exception as exc:
            raise RecipeError(f"ot_fusion: data.text needs a tokenizer in the anchor folder {anchor} ({type(exc).__name__}: {exc}).") from exc
        ids = tokenizer(text_file.read_text(), return_tensors="pt")["input_ids"][0]
        length = int(data.get("seq_len", 64))
        rows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:samples]
        if not rows:
            raise RecipeError(f"ot_fusion: {text_file} holds fewer than seq_len = {length} tokens.")
        stacked = torch.stack(rows)
        return [{"input_ids": stacked, "attention_mask": torch.ones_like(stacked)}]
    raise RecipeError("ot_fusion: cost 'activations' needs data: {evaluator: NAME, options: {...}} or {text: FILE, seq_len: N}.")


def capture(path: Path, batches: list[dict[str, torch.Tensor]], heads: int, kv_heads: int, head_dim: int) -> Activations:
    """Run one Llama-style model on the batches and collect every unit's activations."""
    from workbench.evaluator import load_model

    module = load_model(path, tokenizer=False).module
    layers = module.model.layers
    collected: dict[str, list[torch.Tensor]] = {}
    mask_now: list[torch.Tensor] = []

    def keep(key: str, values: torch.Tensor) -> None:  # (batch, seq, features) -> (tokens, features)
        collected.setdefault(key, []).append(values.detach()[mask_now[0]].float())

    hooks = []
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        hooks.append(attention.q_proj.register_forward_hook(lambda m, i, o, k=f"q{index}": keep(k, o)))
        hooks.append(attention.k_proj.register_forward_hook(lambda m, i, o, k=f"k{index}": keep(k, o)))
        hooks.append(attention.v_proj.register_forward_hook(lambda m, i, o, k=f"v{index}": keep(k, o)))
        hooks.append(mlp.down_proj.register_forward_pre_hook(lambda m, i, k=f"m{index}": keep(k, i[0])))
    try:
        with torch.no_grad():
            for batch in batches:
                mask_now[:] = [batch["attention_mask"].bool()]
                out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
                for depth, hidden in enumerate(out.hidden_states):
                    keep(f"h{depth}", hidden)
    finally:
        for hook in hooks:
            hook.remove()
        del module

    def units(key: str, groups: int) -> torch.Tensor:  # (tokens, groups * width) -> (groups, width * tokens)
        values = torch.cat(collected[key])
        return values.reshape(values.shape[0], groups, -1).permute(1, 2, 0).reshape(groups, -1)

    resid = torch.cat([torch.cat(collected[f"h{d}"]).T for d in range(len(layers) + 1)], dim=1)
    acts = Activations(standardised(resid))
    for index in range(len(layers)):
        acts.query[index] = standardised(units(f"q{index}", heads))
        acts.key_value[index] = standardised(torch.cat([units(f"k{index}", kv_heads), units(f"v{index}", kv_heads)], dim=1))
        acts.mlp[index] = standardised(torch.cat(collected[f"m{index}"]).T)
    return acts
