"""Where a tensor sits in a model: its layer index and module kind, from its name alone.

Layer indices are matched between delimiters (``.1.`` never matches inside ``.11.``), for the common
layouts of Hugging Face models. Names outside any layer are classified as embeddings, final norm,
head or other. Unknown layouts still merge; they just have no layer index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Containers of repeated blocks, longest first so ``gpt_neox.layers`` wins over ``layers``.
LAYER_CONTAINERS = (
    "model.language_model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.blocks",
    "transformer.h",
    "encoder.layers",
    "encoder.layer",
    "decoder.layers",
    "model.layers",
    "layers",
    "blocks",
    "block",  # T5: encoder.block.N.layer.M (M numbers the sub-layers of block N)
    "layer",
    "h",
)
_LAYER_RE = re.compile(
    r"(?:^|\.)(?P<container>"
    + "|".join(re.escape(c) for c in LAYER_CONTAINERS)
    + r")\.(?P<index>\d+)(?:\.|$)"
)

_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_in|tok_embeddings|embed_positions|embeddings)(\.|$)"
)
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|cls|classifier|score|qa_outputs|pooler)(\.|$)")
_FINAL_NORM = re.compile(r"(^|\.)(norm|ln_f|final_layer_norm|final_layernorm|final_norm|LayerNorm)(\.|$)")

#: Norms first: ``post_attention_layernorm`` and ``attention.output.LayerNorm`` are norms, not attention.
_KINDS = (
    ("norm", re.compile(r"norm|ln_|layernorm|LayerNorm")),
    (
        "attention",
        re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value|qkv|c_attn|wq|wk|wv|wo\b"),
    ),
    (
        "mlp",
        re.compile(
            r"mlp|ffn|feed_forward|intermediate|gate_proj|up_proj|down_proj|fc1|fc2|c_fc|dense_h_to_4h|dense_4h_to_h|w1|w2|w3|output\.dense"
        ),
    ),
)

#: config.json keys that give the number of layers, by architecture family.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class TensorPlace:
    layer_index: int | None
    module_kind: str  # attention | mlp | norm | embedding | head | final_norm | layer_other | other
    module: str  # the name inside its layer (``self_attn.q_proj.weight``) or the full name outside


def place(name: str) -> TensorPlace:
    """Classify one tensor name."""
    match = _LAYER_RE.search(name)
    if match:
        module = name[match.end() :]
        for kind, pattern in _KINDS:
            if pattern.search(module):
                return TensorPlace(int(match["index"]), kind, module)
        return TensorPlace(int(match["index"]), "layer_other", module)
    if _EMBEDDING.search(name):
        return TensorPlace(None, "embedding", name)
    if _FINAL_NORM.search(name):
        return TensorPlace(None, "final_norm", name)
    if _HEAD.search(name):
        return TensorPlace(None, "head", name)
    return TensorPlace(None, "other", name)


def renumber_layer(name: str, index: int) -> str:
    """``name`` moved to layer ``index`` (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.7...``)."""
    match = _LAYER_RE.search(name)
    if not match:
        raise ValueError(f"tensor '{name}' is not inside a layer")
    return name[: match.start("index")] + str(index) + name[match.end("index") :]


def layer_count(names: Iterable[str], config: dict[str, Any] | None = None) -> int:
    """Number of layers: from the config when it says, else one more than the highest index seen."""
    for key in LAYER_COUNT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    indices = [p.layer_index for p in map(place, names) if p.layer_index is not None]
    return max(indices) + 1 if indices else 0


#: Sizes a config gives that must be positive whole numbers where it gives them (null: not set).
SIZE_KEYS = (
    *LAYER_COUNT_KEYS,
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_head",
    "d_model",
)


_STACK = re.compile(r"(?:^|\.)(?P<stack>encoder|decoder)\.(?:block|layers?)\.\d+\.")


def encoder_decoder(names: Iterable[str]) -> bool:
    """Whether the weights hold both an encoder stack and a decoder stack (T5, BART, Whisper, ...): their
    layers have the same numbers, so a layer index alone does not say which layer is meant."""
    found = {m["stack"] for m in map(_STACK.search, names) if m}
    return found == {"encoder", "decoder"}


#: transformers 5's fused expert weights of a mixture-of-experts layer (Mixtral, Qwen-MoE): one
#: ``[experts, ...]`` tensor per projection (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``),
#: where older checkpoints hold one matrix per expert (``block_sparse_moe.experts.3.w1``).
_FUSED_EXPERTS = re.compile(r"(?:^|\.)experts\.[A-Za-z_]+$")


def fused_experts(name: str, shape: tuple[int, ...]) -> int | None:
    """The number of experts a fused expert tensor stacks along dimension 0, or None for any other
    tensor: methods whose statistics are per matrix (a top-k, an L1 norm) take them per expert, as
    they do for the per-expert matrices of the older layout."""
    return shape[0] if len(shape) == 3 and _FUSED_EXPERTS.search(name) else None


#: The Llama family's embedding, whose width is the config's ``hidden_size`` (other layouts may embed
#: narrower and project: ALBERT's ``embedding_size``, OPT's ``word_embed_proj_dim``).
LLAMA_EMBEDDING = "model.embed_tokens.weight"


def config_problem(config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a model's config cannot describe its weights (``shapes``: name -> shape), or None: a size
    that is not a positive whole number, weights in more layers than it counts, a Llama-family
    embedding of another width than ``hidden_size``. Fewer layers than it counts is left alone: a model
    may share one layer's weights among several (ALBERT)."""
    names = list(shapes)
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            return f"'{key}' is {_shown(value)}, not a positive whole number"
    counted = next((k for k in LAYER_COUNT_KEYS if config.get(k) is not None), None)
    indices = [p.layer_index for p in map(place, names) if p.layer_index is not None]
    if counted is not None and indices and max(indices) >= config[counted]:
        last = max(indices)
        return (
            f"'{counted}' is {config[counted]}, but the weights have layers up to {last} ({last + 1} layers)"
        )
    embedding = shapes.get(LLAMA_EMBEDDING)
    width = config.get("hidden_size")
    if width is not None and embedding is not None and len(embedding) == 2 and embedding[1] != width:
        return f"'hidden_size' is {width}, but {LLAMA_EMBEDDING} is {list(embedding)}"
    return None


def _shown(value: Any) -> str:
    """An untrusted value in a message: repr, at most a hundred characters."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def describe(config: dict[str, Any] | None) -> str:
    """A short architecture label from config.json ('LlamaForCausalLM (llama)')."""
    if not config:
        return "unknown (no config.json)"
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    label = ", ".join(archs) if archs else "unknown"
    return f"{label} ({model_type})" if model_type else label
