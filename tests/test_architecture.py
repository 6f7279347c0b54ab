"""Where a tensor sits, from its name alone: layer index, module kind, layer count."""

from __future__ import annotations

import pytest

from workbench.architecture import describe, layer_count, place


@pytest.mark.parametrize(
    ("name", "layer", "module"),
    [
        ("model.layers.0.self_attn.q_proj.weight", 0, "self_attn.q_proj.weight"),
        ("model.layers.7.mlp.down_proj.weight", 7, "mlp.down_proj.weight"),
        ("transformer.h.3.attn.c_attn.weight", 3, "attn.c_attn.weight"),
        ("transformer.h.10.mlp.c_fc.bias", 10, "mlp.c_fc.bias"),
        ("bert.encoder.layer.5.attention.self.query.weight", 5, "attention.self.query.weight"),
        ("encoder.layer.2.intermediate.dense.weight", 2, "intermediate.dense.weight"),
        ("blocks.4.norm1.weight", 4, "norm1.weight"),
        ("gpt_neox.layers.6.attention.query_key_value.weight", 6, "attention.query_key_value.weight"),
        ("model.decoder.layers.8.self_attn.k_proj.weight", 8, "self_attn.k_proj.weight"),
        ("transformer.blocks.9.ffn.up_proj.weight", 9, "ffn.up_proj.weight"),
        ("model.language_model.layers.12.mlp.gate_proj.weight", 12, "mlp.gate_proj.weight"),
        ("h.2.attn.weight", 2, "attn.weight"),
        ("model.layers.123.input_layernorm.weight", 123, "input_layernorm.weight"),
    ],
)
def test_layer_index_for_common_layouts(name: str, layer: int, module: str) -> None:
    p = place(name)
    assert p.layer_index == layer
    assert p.module == module


@pytest.mark.parametrize(
    "template",
    [
        "model.layers.{}.self_attn.o_proj.weight",
        "transformer.h.{}.mlp.c_proj.weight",
        "encoder.layer.{}.output.dense.weight",
        "blocks.{}.attn.qkv.weight",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight",
    ],
)
def test_one_never_matches_inside_eleven(template: str) -> None:
    assert place(template.format(1)).layer_index == 1
    assert place(template.format(11)).layer_index == 11
    assert place(template.format(111)).layer_index == 111
    assert place(template.format(10)).layer_index == 10


def test_index_at_the_end_of_the_name() -> None:
    assert place("model.layers.11").layer_index == 11


def test_the_first_layer_container_wins_over_nested_indices() -> None:
    """Mixture-of-experts weights: 'experts.11' is not a layer, 'layers.3' is."""
    assert place("model.layers.3.block_sparse_moe.experts.11.w1.weight").layer_index == 3


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.embed_tokens.weight", "embedding"),
        ("transformer.wte.weight", "embedding"),
        ("transformer.wpe.weight", "embedding"),
        ("gpt_neox.embed_in.weight", "embedding"),
        ("bert.embeddings.word_embeddings.weight", "embedding"),
        ("model.norm.weight", "final_norm"),
        ("transformer.ln_f.weight", "final_norm"),
        ("gpt_neox.final_layer_norm.weight", "final_norm"),
        ("model.decoder.final_layer_norm.bias", "final_norm"),
        ("lm_head.weight", "head"),
        ("embed_out.weight", "head"),
        ("score.weight", "head"),
        ("classifier.bias", "head"),
    ],
)
def test_tensors_outside_layers(name: str, kind: str) -> None:
    p = place(name)
    assert p.layer_index is None
    assert p.module_kind == kind
    assert p.module == name


@pytest.mark.parametrize(
    "name",
    [
        "foo.bar.weight",
        "model.layers.x.weight",  # no index
        "model.layers1.weight",  # no delimiter
        "mylayers.3.weight",  # container inside a longer word
        "layers3.weight",
        "model.hh.3.weight",
        "encoder.blockx.3.layer.x.weight",  # (encoder.block.3 is T5's block 3: test_encoder_decoder.py)
        "weight",
    ],
)
def test_unknown_layouts_have_no_layer(name: str) -> None:
    p = place(name)
    assert p.layer_index is None
    assert p.module_kind == "other"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.0.self_attn.q_proj.weight", "attention"),
        ("model.layers.0.self_attn.o_proj.weight", "attention"),
        ("model.layers.0.mlp.gate_proj.weight", "mlp"),
        ("model.layers.0.mlp.down_proj.weight", "mlp"),
        ("model.layers.0.input_layernorm.weight", "norm"),
        ("model.layers.0.post_attention_layernorm.weight", "norm"),
        ("transformer.h.0.ln_1.weight", "norm"),
        ("transformer.h.0.attn.c_attn.weight", "attention"),
        ("transformer.h.0.mlp.c_fc.weight", "mlp"),
        ("encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
        ("encoder.layer.0.attention.output.dense.weight", "attention"),
        ("encoder.layer.0.output.dense.weight", "mlp"),
        ("model.layers.0.block_sparse_moe.gate.weight", "layer_other"),
    ],
)
def test_module_kind_inside_layers(name: str, kind: str) -> None:
    assert place(name).module_kind == kind


def test_layer_count_from_config() -> None:
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert layer_count(names, {"num_hidden_layers": 32}) == 32
    assert layer_count(names, {"n_layer": 12}) == 12
    assert layer_count(names, {"num_layers": 6}) == 6
    assert layer_count(names, {"n_layers": 5}) == 5


def test_layer_count_from_names() -> None:
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.11.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    assert layer_count(names) == 12
    assert layer_count(names, {}) == 12
    assert layer_count(names, {"num_hidden_layers": 0}) == 12  # unusable config values are ignored
    assert layer_count(names, {"num_hidden_layers": "32"}) == 12
    assert layer_count(names, {"model_type": "llama"}) == 12


def test_layer_count_without_layers() -> None:
    assert layer_count(["embed.weight", "head.weight"]) == 0
    assert layer_count([]) == 0


def test_tiny_family_layout(tiny_family) -> None:
    """The generated Llama-shaped models: 4 layers, 9 tensors per layer, 3 outside."""
    import json

    from safetensors import safe_open

    with safe_open(tiny_family["base"] / "model.safetensors", "pt") as f:
        names = list(f.keys())
    config = json.loads((tiny_family["base"] / "config.json").read_text())
    assert layer_count(names, config) == 4 == layer_count(names)
    places = [place(n) for n in names]
    for i in range(4):
        assert sum(p.layer_index == i for p in places) == 9
    outside = sorted(p.module_kind for p in places if p.layer_index is None)
    assert outside == ["embedding", "final_norm", "head"]


def test_describe() -> None:
    assert (
        describe({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) == "LlamaForCausalLM (llama)"
    )
    assert describe(None) == "unknown (no config.json)"
    assert describe({"model_type": "gpt2"}) == "unknown (gpt2)"
