"""Where every tensor of a supported architecture sits in ``ot_fusion``'s transport-map flow graph.

Each weight has an output axis and an input axis, and each axis lies in a *space* whose units are
permuted (or softly matched) between models, or in None (tokens, positions, classes: never
permuted). The residual stream has a space per position, because the paper's residual policies
give it a map per sublayer: ``embed`` (leaving the embeddings), ``resid_in`` / ``resid_mid`` /
``resid_out`` (entering a layer, after its attention's residual join, leaving it), ``final``
(leaving the last layer), and the two branches that join it, ``attn_out`` (the attention output
projection) and ``mlp_out`` (the MLP's down projection). The other spaces are ``q`` (query heads,
moved whole), ``kv`` (key/value heads), ``heads`` (an input axis holding the attention heads'
outputs) and ``mlp`` (hidden units). A fused tensor (GPT-2's ``c_attn``) lists one space per part
of its output axis. GPT-2 stores weights as (in, out) (``Conv1D``); vectors (biases, norm
weights) have an output axis only. ``modules`` names the submodules of the architecture's base
model (transformers ``AutoModel``) whose activations the activation-based cost reads.
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
    modules: "Modules"
    prefix: str = ""  # optional prefix of global names (BertForMaskedLM's 'bert.')

    def role(self, name: str) -> tuple[int | None, Role] | None:
        match = self.layer.match(name)
        if match:
            found = self.layer_roles.get(match[2])
            return (int(match[1]), found) if found else None
        found = (
            self.global_roles.get(name.removeprefix(self.prefix))
            if self.prefix
            else self.global_roles.get(name)
        )
        return (None, found) if found else None


@dataclass(frozen=True)
class Modules:
    """Submodule paths in the base model: the layer list, then (relative to a layer) the query,
    key and value projections (or one fused ``qkv``), the attention output projection, the MLP's
    down projection (its input is the MLP's hidden units), and where the residual stream after
    the attention join is seen: ``(path, 'input')`` of a pre-LN norm or ``(path, 'output')``."""

    layers: str
    attn_out: str
    mlp_out: str
    mid: tuple[str, str]
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""


def _linear(out: Space, inp: Space = None) -> Role:
    return Role((out,), inp)


_IN, _MID, _OUT = _linear("resid_in"), _linear("resid_mid"), _linear("resid_out")
_ATTN_BIAS, _MLP_BIAS = _linear("attn_out"), _linear("mlp_out")
_EMBEDDING = _linear(None, "embed")

LLAMA = Layout(
    "llama",
    re.compile(r"^model\.layers\.(\d+)\.(.+)$"),
    {
        "self_attn.q_proj.weight": _linear("q", "resid_in"),
        "self_attn.k_proj.weight": _linear("kv", "resid_in"),
        "self_attn.v_proj.weight": _linear("kv", "resid_in"),
        "self_attn.q_proj.bias": _linear("q"),
        "self_attn.k_proj.bias": _linear("kv"),
        "self_attn.v_proj.bias": _linear("kv"),
        "self_attn.o_proj.weight": _linear("attn_out", "heads"),
        "mlp.gate_proj.weight": _linear("mlp", "resid_mid"),
        "mlp.up_proj.weight": _linear("mlp", "resid_mid"),
        "mlp.down_proj.weight": _linear("mlp_out", "mlp"),
        "input_layernorm.weight": _IN,
        "post_attention_layernorm.weight": _MID,
    },
    {
        "model.embed_tokens.weight": _EMBEDDING,
        "lm_head.weight": _linear(None, "final"),
        "model.norm.weight": _linear("final"),
    },
    "model.embed_tokens.weight",
    Modules(
        "layers",
        "self_attn.o_proj",
        "mlp.down_proj",
        ("post_attention_layernorm", "input"),
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
    ),
)

GPT2 = Layout(
    "gpt2",
    re.compile(r"^transformer\.h\.(\d+)\.(.+)$"),
    {
        "ln_1.weight": _IN,
        "ln_1.bias": _IN,
        "ln_2.weight": _MID,
        "ln_2.bias": _MID,
        "attn.c_attn.weight": Role(("q", "kv", "kv"), "resid_in", conv1d=True),
        "attn.c_attn.bias": Role(("q", "kv", "kv")),
        "attn.c_proj.weight": Role(("attn_out",), "heads", conv1d=True),
        "attn.c_proj.bias": _ATTN_BIAS,
        "mlp.c_fc.weight": Role(("mlp",), "resid_mid", conv1d=True),
        "mlp.c_fc.bias": _linear("mlp"),
        "mlp.c_proj.weight": Role(("mlp_out",), "mlp", conv1d=True),
        "mlp.c_proj.bias": _MLP_BIAS,
    },
    {
        "transformer.wte.weight": _EMBEDDING,
        "transformer.wpe.weight": _EMBEDDING,
        "lm_head.weight": _linear(None, "final"),
        "transformer.ln_f.weight": _linear("final"),
        "transformer.ln_f.bias": _linear("final"),
    },
    "transformer.wte.weight",
    Modules("h", "attn.c_proj", "mlp.c_proj", ("ln_2", "input"), qkv="attn.c_attn"),
)

BERT = Layout(
    "bert",
    re.compile(r"^(?:bert\.)?encoder\.layer\.(\d+)\.(.+)$"),
    {
        "attention.self.query.weight": _linear("q", "resid_in"),
        "attention.self.query.bias": _linear("q"),
        "attention.self.key.weight": _linear("kv", "resid_in"),
        "attention.self.key.bias": _linear("kv"),
        "attention.self.value.weight": _linear("kv", "resid_in"),
        "attention.self.value.bias": _linear("kv"),
        "attention.output.dense.weight": _linear("attn_out", "heads"),
        "attention.output.dense.bias": _ATTN_BIAS,
        # post-LN: the norm after each residual join carries the stream's map at that point
        "attention.output.LayerNorm.weight": _MID,
        "attention.output.LayerNorm.bias": _MID,
        "intermediate.dense.weight": _linear("mlp", "resid_mid"),
        "intermediate.dense.bias": _linear("mlp"),
        "output.dense.weight": _linear("mlp_out", "mlp"),
        "output.dense.bias": _MLP_BIAS,
        "output.LayerNorm.weight": _OUT,
        "output.LayerNorm.bias": _OUT,
    },
    {
        "embeddings.word_embeddings.weight": _EMBEDDING,
        "embeddings.position_embeddings.weight": _EMBEDDING,
        "embeddings.token_type_embeddings.weight": _EMBEDDING,
        "embeddings.LayerNorm.weight": _linear("embed"),
        "embeddings.LayerNorm.bias": _linear("embed"),
        # The pooler's outputs and the MLM head's classes are not permuted; the MLM transform feeds the
        # decoder tied to the word embeddings, so its output lies in the embeddings' basis.
        "pooler.dense.weight": _linear(None, "final"),
        "pooler.dense.bias": _linear(None),
        "cls.predictions.transform.dense.weight": _linear("embed", "final"),
        "cls.predictions.transform.dense.bias": _linear("embed"),
        "cls.predictions.transform.LayerNorm.weight": _linear("embed"),
        "cls.predictions.transform.LayerNorm.bias": _linear("embed"),
        "cls.predictions.decoder.weight": _EMBEDDING,
        "cls.predictions.decoder.bias": _linear(None),
        "cls.predictions.bias": _linear(None),
    },
    "embeddings.word_embeddings.weight",
    Modules(
        "encoder.layer",
        "attention.output.dense",
        "output.dense",
        ("attention.output", "output"),
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
    ),
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
        raise RecipeError(
            "ot_fusion needs each model's config.json with its layer count, head count and hidden size."
        )
    head_dim = int(config.get("head_dim") or hidden // heads)
    return int(layers), int(heads), int(config.get("num_key_value_heads") or heads), head_dim
