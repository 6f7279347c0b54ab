"""Activations for ``ot_fusion``'s activation-based ground cost, captured with forward hooks.

Each unit becomes a point whose coordinates are its activations over the same inputs in every
model (a bounded number of sequences, padding left out), standardised per unit as in Imfeld et
al. (2024): subtract the mean, divide by the standard deviation + 1e-9. Units are the residual
dimensions (the hidden states entering every layer and leaving the last, concatenated, for one
map of the whole stream; or those leaving the embeddings, and each branch's output, for the
per-sublayer residual policies), each attention head (its query outputs; a key/value head its key
and value outputs), and each MLP hidden unit (the input of the down projection, e.g. act(gate) · up).
The modules hooked come from the layout (Llama, GPT-2, BERT). Inputs come from
:func:`workbench_plugins.methods._data.input_batches`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import RecipeError

if TYPE_CHECKING:
    from workbench_plugins.methods.ot_fusion.layouts import Layout


@dataclass
class Activations:
    """Per-unit activation vectors (rows: units; columns: the sampled token positions), standardised,
    and the mean absolute value of each residual dimension where residual and branch join (the
    weighted residual policies' statistic)."""

    resid: torch.Tensor  # the hidden states entering every layer and leaving the last, concatenated
    embed: torch.Tensor  # the hidden states leaving the embeddings
    query: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (heads, head_dim * tokens)
    key_value: dict[int, torch.Tensor] = field(
        default_factory=dict
    )  # layer -> (kv heads, 2 * head_dim * tokens)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (intermediate, tokens)
    attn_out: dict[int, torch.Tensor] = field(
        default_factory=dict
    )  # layer -> (hidden, tokens): attention branch output
    mlp_out: dict[int, torch.Tensor] = field(
        default_factory=dict
    )  # layer -> (hidden, tokens): MLP branch output
    magnitude: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # 'in.L', 'attn.L', 'mid.L', 'mlp.L' -> (hidden,) mean |x|


def standardised(units: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, divided by its standard deviation + 1e-9."""
    centred = units - units.mean(dim=1, keepdim=True)
    return centred / (centred.std(dim=1, keepdim=True) + 1e-9)


def capture(
    path: Path, layout: "Layout", batches: list[dict[str, torch.Tensor]], heads: int, kv_heads: int
) -> Activations:
    """Run one model (its transformers base model) on the batches and collect every unit's activations."""
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    quiet = transformers_logging.get_verbosity()
    # the base model leaves the LM head unused: expected, not worth a warning
    transformers_logging.set_verbosity_error()
    try:
        module = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as exc:
        raise RecipeError(
            f"ot_fusion: transformers cannot load {path} for activations ({type(exc).__name__}: {exc})."
        ) from exc
    finally:
        transformers_logging.set_verbosity(quiet)
    names = layout.modules
    layers = module.get_submodule(names.layers)
    collected: dict[str, list[torch.Tensor]] = {}
    mask_now: list[torch.Tensor] = []

    def keep(key: str, values: torch.Tensor) -> None:  # (batch, seq, features) -> (tokens, features)
        collected.setdefault(key, []).append(values.detach()[mask_now[0]].float())

    def on_output(path: str, key: str, layer: torch.nn.Module) -> Any:
        return layer.get_submodule(path).register_forward_hook(
            lambda m, i, o: keep(key, o[0] if isinstance(o, tuple) else o)
        )

    def on_input(path: str, key: str, layer: torch.nn.Module) -> Any:
        return layer.get_submodule(path).register_forward_pre_hook(lambda m, i: keep(key, i[0]))

    hooks = []
    for index, layer in enumerate(layers):
        if names.qkv:
            hooks.append(on_output(names.qkv, f"qkv{index}", layer))
        else:
            hooks += [on_output(getattr(names, part), f"{part}{index}", layer) for part in ("q", "k", "v")]
        hooks += [
            on_output(names.attn_out, f"a{index}", layer),
            on_output(names.mlp_out, f"o{index}", layer),
            on_input(names.mlp_out, f"m{index}", layer),
        ]
        hooks.append((on_input if names.mid[1] == "input" else on_output)(names.mid[0], f"mid{index}", layer))
    try:
        with torch.no_grad():
            for batch in batches:
                mask_now[:] = [batch["attention_mask"].bool()]
                out = module(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                )
                for depth, hidden in enumerate(out.hidden_states):
                    keep(f"h{depth}", hidden)
    finally:
        for hook in hooks:
            hook.remove()
        del module

    def tokens(key: str) -> torch.Tensor:  # (tokens, features)
        return torch.cat(collected[key])

    def units(
        values: torch.Tensor, groups: int
    ) -> torch.Tensor:  # (tokens, groups * width) -> (groups, width * tokens)
        return values.reshape(values.shape[0], groups, -1).permute(1, 2, 0).reshape(groups, -1)

    depth = len(layers)
    acts = Activations(
        standardised(torch.cat([tokens(f"h{d}").T for d in range(depth + 1)], dim=1)),
        standardised(tokens("h0").T),
    )
    for index in range(depth):
        if names.qkv:
            query, key, value = tokens(f"qkv{index}").chunk(3, dim=1)
        else:
            query, key, value = (tokens(f"{part}{index}") for part in ("q", "k", "v"))
        acts.query[index] = standardised(units(query, heads))
        acts.key_value[index] = standardised(torch.cat([units(key, kv_heads), units(value, kv_heads)], dim=1))
        acts.mlp[index] = standardised(tokens(f"m{index}").T)
        attn, mlp = tokens(f"a{index}"), tokens(f"o{index}")
        acts.attn_out[index], acts.mlp_out[index] = standardised(attn.T), standardised(mlp.T)
        for key, values in (
            ("in", tokens(f"h{index}")),
            ("attn", attn),
            ("mid", tokens(f"mid{index}")),
            ("mlp", mlp),
        ):
            acts.magnitude[f"{key}.{index}"] = values.abs().mean(dim=0)
    return acts
