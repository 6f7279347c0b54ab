"""Where every tensor of a supported architecture sits in ``ot_fusion``'s transport-map flow graph.

Each weight has an output axis and an input axis, and each axis lies in a *space* whose units are
permuted (or softly matched) between models: ``resid`` (the residual stream, one map for the whole
network), ``q`` (query heads, moved whole), ``kv`` (key/value heads), ``heads`` (an input axis
that holds the attention heads' outputs), ``mlp`` (hidden units), or None (tokens, positions,
classes: never permuted). A fused tensor (GPT-2's ``c_attn``) lists one space per part of its
output axis. GPT-2 stores weights as (in, out) (``Conv1D``); vectors (biases, norm weights) have
an output axis only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from workbench.errors import RecipeError

Space = str | None


@dataclass(frozen=True)
class Role:
    out: tuple[Space, ...]
    inp: Space = None
    conv1d: bool = False


@dataclass(frozen=True)
class Layout:
    name: str
    layer: re.Pattern[str]  # group 1: layer index, group 2: the name inside the layer
    layer_roles: dict[str, Role]
    global_roles: dict[str, Role]
    embedding: str  # the token embedding (vocabulary × hidden), source of the weight-based residual map
    prefix: str = ""  # optional prefix of global names (BertForMaskedLM's 'bert.')

    def role(self, name: str) -> tuple[int | None, Role] | None:
        match = self.layer.match(name)
        if match:
            found = self.layer_roles.get(match[2])
            return (int(match[1]), found) if found else None
        found = self.global_roles.get(name.removeprefix(self.prefix)) if self.prefix else self.global_roles.get(name)
        return (None, found) if found else None


def _linear(out: Space, inp: Space = None) -> Role:
    return Role((out,), inp)


_RESID = _linear("resid")
_EMBEDDING = _linear(None, "resid")

LLAMA = Layout(
    "llama",
    re.compile(r"^model\.layers\.(\d+)\.(.+)$"),
    {
        "self_attn.q_proj.weight": _linear("q", "resid"),
        "self_attn.k_proj.weight": _linear("kv", "resid"),
        "self_attn.v_proj.weight": _linear("kv", "resid"),
        "self_attn.q_proj.bias": _linear("q"),
        "self_attn.k_proj.bias": _linear("kv"),
        "self_attn.v_proj.bias": _linear("kv"),
        "self_attn.o_proj.weight": _linear("resid", "heads"),
        "mlp.gate_proj.weight": _linear("mlp", "resid"),
        "mlp.up_proj.weight": _linear("mlp", "resid"),
        "mlp.down_proj.weight": _linear("resid", "mlp"),
        "input_layernorm.weight": _RESID,
        "post_attention_layernorm.weight": _RESID,
    },
    {"model.embed_tokens.weight": _EMBEDDING, "lm_head.weight": _EMBEDDING, "model.norm.weight": _RESID},
    "model.embed_tokens.weight",
)

GPT2 = Layout(
    "gpt2",
    re.compile(r"^transformer\.h\.(\d+)\.(.+)$"),
    {
        "ln_1.weight": _RESID, "ln_1.bias": _RESID, "ln_2.weight": _RESID, "ln_2.bias": _RESID,
        "attn.c_attn.weight": Role(("q", "kv", "kv"), "resid", conv1d=True),
        "attn.c_attn.bias": Role(("q", "kv", "kv")),
        "attn.c_proj.weight": Role(("resid",), "heads", conv1d=True),
        "attn.c_proj.bias": _RESID,
        "mlp.c_fc.weight": Role(("mlp",), "resid", conv1d=True),
        "mlp.c_fc.bias": _linear("mlp"),
        "mlp.c_proj.weight": Role(("resid",), "mlp", conv1d=True),
        "mlp.c_proj.bias": _RESID,
    },
    {
        "transformer.wte.weight": _EMBEDDING, "transformer.wpe.weight": _EMBEDDING, "lm_head.weight": _EMBEDDING,
        "transformer.ln_f.weight": _RESID, "transformer.ln_f.bias": _RESID,
    },
    "transformer.wte.weight",
)

BERT = Layout(
    "bert",
    re.compile(r"^(?:bert\.)?encoder\.layer\.(\d+)\.(.+)$"),
    {
        "attention.self.query.weight": _linear("q", "resid"), "attention.self.query.bias": _linear("q"),
        "attention.self.key.weight": _linear("kv", "resid"), "attention.self.key.bias": _linear("kv"),
        "attention.self.value.weight": _linear("kv", "resid"), "attention.self.value.bias": _linear("kv"),
        "attention.output.dense.weight": _linear("resid", "heads"), "attention.output.dense.bias": _RESID,
        "attention.output.LayerNorm.weight": _RESID, "attention.output.LayerNorm.bias": _RESID,
        "intermediate.dense.weight": _linear("mlp", "resid"), "intermediate.dense.bias": _linear("mlp"),
        "output.dense.weight": _linear("resid", "mlp"), "output.dense.bias": _RESID,
        "output.LayerNorm.weight": _RESID, "output.LayerNorm.bias": _RESID,
    },
    {
        "embeddings.word_embeddings.weight": _EMBEDDING, "embeddings.position_embeddings.weight": _EMBEDDING,
        "embeddings.token_type_embeddings.weight": _EMBEDDING,
        "embeddings.LayerNorm.weight": _RESID, "embeddings.LayerNorm.bias": _RESID,
        # The pooler's outputs and the MLM head's classes are not permuted; the MLM transform feeds the
        # decoder tied to the word embeddings, so its output stays in the residual basis.
        "pooler.dense.weight": _EMBEDDING, "pooler.dense.bias": _linear(None),
        "cls.predictions.transform.dense.weight": _linear("resid", "resid"), "cls.predictions.transform.dense.bias": _RESID,
        "cls.predictions.transform.LayerNorm.weight": _RESID, "cls.predictions.transform.LayerNorm.bias": _RESID,
        "cls.predictions.decoder.weight": _EMBEDDING, "cls.predictions.decoder.bias": _linear(None), "cls.predictions.bias": _linear(None),
    },
    "embeddings.word_embeddings.weight",
    prefix="bert.",
)

LAYOUTS = (LLAMA, GPT2, BERT)


def detect(names: list[str]) -> Layout:
    """The layout whose token embedding the model has."""
    for layout in LAYOUTS:
        if layout.embedding in names or layout.prefix + layout.embedding in names:
            return layout
    raise RecipeError(
        "ot_fusion handles Llama-style decoders, GPT-2 and BERT; this model has none of their token embeddings"
        f" ({', '.join(layout.embedding for layout in LAYOUTS)})."
    )


def embedding_name(layout: Layout, names: list[str]) -> str:
    return layout.embedding if layout.embedding in names else layout.prefix + layout.embedding


def dimensions(config: dict[str, Any] | None) -> tuple[int, int, int, int]:
    """(layers, heads, key/value heads, head dim) from a Llama, GPT-2 or BERT config."""
    config = config or {}
    heads = config.get("num_attention_heads", config.get("n_head"))
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    if not (heads and layers and hidden):
        raise RecipeError("ot_fusion needs each model's config.json with its layer count, head count and hidden size.")
    head_dim = int(config.get("head_dim") or hidden // heads)
    return int(layers), int(heads), int(config.get("num_key_value_heads") or heads), head_dim
