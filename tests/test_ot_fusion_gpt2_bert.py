"""ot_fusion on GPT-2 (fused c_attn, Conv1D layout, LayerNorm with bias) and BERT (post-LN, biases).

As for Llama: A′ is A with residual dimensions, heads and MLP units permuted consistently (the
permutations are written out here per architecture, independently of the plugin's layout tables);
A′ computes the same function, fusing A with A′ by EMD gives A back (from weights or from
activations read off each architecture's modules), averaging does not. Heterogeneous fusion of a
narrower MLP takes the anchor's shapes and runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from merging import add_word_tokenizer, load_dir, merge, q, word_text
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER, LAYERS, VOCAB = 32, 4, 48, 2, 64
HEAD_DIM = HIDDEN // HEADS


def head_rows(order: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in order])


def permute_gpt2(state: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    resid = torch.randperm(HIDDEN, generator=g)
    out = {}
    for name, w in state.items():
        if name in ("transformer.wte.weight", "transformer.wpe.weight"):
            w = w[:, resid]
        elif ".ln_" in name:
            w = w[resid]
        out[name] = w
    for layer in range(LAYERS):
        p = f"transformer.h.{layer}."
        heads, units = head_rows(torch.randperm(HEADS, generator=g)), torch.randperm(INTER, generator=g)
        qkv = torch.cat([heads, heads + HIDDEN, heads + 2 * HIDDEN])  # the same head order in q, k and v
        out[p + "attn.c_attn.weight"] = state[p + "attn.c_attn.weight"][resid][:, qkv]  # Conv1D: (in, out)
        out[p + "attn.c_attn.bias"] = state[p + "attn.c_attn.bias"][qkv]
        out[p + "attn.c_proj.weight"] = state[p + "attn.c_proj.weight"][heads][:, resid]
        out[p + "attn.c_proj.bias"] = state[p + "attn.c_proj.bias"][resid]
        out[p + "mlp.c_fc.weight"] = state[p + "mlp.c_fc.weight"][resid][:, units]
        out[p + "mlp.c_fc.bias"] = state[p + "mlp.c_fc.bias"][units]
        out[p + "mlp.c_proj.weight"] = state[p + "mlp.c_proj.weight"][units][:, resid]
        out[p + "mlp.c_proj.bias"] = state[p + "mlp.c_proj.bias"][resid]
    return out


def permute_bert(state: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    resid = torch.randperm(HIDDEN, generator=g)
    out = {}
    for name, w in state.items():
        if name.endswith("_embeddings.weight"):
            w = w[:, resid]
        elif "LayerNorm" in name:
            w = w[resid]
        elif name == "cls.predictions.transform.dense.weight":
            w = w[resid][:, resid]
        elif name == "cls.predictions.transform.dense.bias":
            w = w[resid]
        out[name] = w
    for layer in range(LAYERS):
        p = f"bert.encoder.layer.{layer}."
        heads, units = head_rows(torch.randperm(HEADS, generator=g)), torch.randperm(INTER, generator=g)
        for part in ("query", "key", "value"):
            out[p + f"attention.self.{part}.weight"] = state[p + f"attention.self.{part}.weight"][heads][
                :, resid
            ]
            out[p + f"attention.self.{part}.bias"] = state[p + f"attention.self.{part}.bias"][heads]
        out[p + "attention.output.dense.weight"] = state[p + "attention.output.dense.weight"][resid][:, heads]
        out[p + "attention.output.dense.bias"] = state[p + "attention.output.dense.bias"][resid]
        out[p + "intermediate.dense.weight"] = state[p + "intermediate.dense.weight"][units][:, resid]
        out[p + "intermediate.dense.bias"] = state[p + "intermediate.dense.bias"][units]
        out[p + "output.dense.weight"] = state[p + "output.dense.weight"][resid][:, units]
        out[p + "output.dense.bias"] = state[p + "output.dense.bias"][resid]
    return out


ARCHITECTURES: dict[
    str,
    tuple[Callable[[], Any], Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]],
] = {
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_positions=32,
                n_embd=HIDDEN,
                n_layer=LAYERS,
                n_head=HEADS,
                n_inner=INTER,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        permute_gpt2,
    ),
    "bert": (
        lambda: transformers.BertForMaskedLM(
            transformers.BertConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=INTER,
                max_position_embeddings=32,
            )
        ),
        permute_bert,
    ),
}


def _logits(folder: Path, arch: str) -> torch.Tensor:
    auto = transformers.AutoModelForCausalLM if arch == "gpt2" else transformers.AutoModelForMaskedLM
    model = auto.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 7, 3, 9, 12, 5]])).logits


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    arch = request.param
    build, permute = ARCHITECTURES[arch]
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for param in model.parameters():  # norms and biases that differ per unit
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(root / "a")
    permuted = permute(load_file(root / "a" / "model.safetensors"), torch.Generator().manual_seed(1))
    (root / "b").mkdir()
    save_file(permuted, str(root / "b" / "model.safetensors"), metadata={"format": "pt"})
    (root / "b" / "config.json").write_text((root / "a" / "config.json").read_text())
    return arch, root / "a", root / "b"


def test_the_permuted_copy_computes_the_same_function(pair: tuple[str, Path, Path]) -> None:
    arch, a, b = pair
    torch.testing.assert_close(_logits(a, arch), _logits(b, arch), rtol=1e-4, atol=1e-5)


def test_emd_fusion_returns_the_anchor_and_averaging_does_not(
    tmp_path: Path, pair: tuple[str, Path, Path]
) -> None:
    arch, a, b = pair
    fused = merge(tmp_path, f"method: ot_fusion\nmodels: [{q(a)}, {q(b)}]\nparameters: {{solver: emd}}\n")
    anchor = load_dir(a)
    for name, tensor in anchor.items():
        torch.testing.assert_close(fused[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    average = merge(tmp_path, f"method: linear\nmodels: [{q(a)}, {q(b)}]\n", name="average")
    assert max(float((average[n] - anchor[n]).abs().max()) for n in anchor) > 0.05
    torch.testing.assert_close(_logits(tmp_path / "out", arch), _logits(a, arch), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def text_pair(
    pair: tuple[str, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path, Path]:
    """The pair with a word-level tokenizer, and a text to run them on."""
    import shutil

    arch, a, b = pair
    root = tmp_path_factory.mktemp(f"{arch}_text")
    for source in (a, b):
        shutil.copytree(source, root / source.name)
        add_word_tokenizer(root / source.name, VOCAB)
    word_text(root / "text.txt", VOCAB)
    return arch, root / "a", root / "b", root / "text.txt"


@pytest.mark.parametrize("policy", ["shared", "mean", "weighted_matrix"])
def test_activation_costs_return_the_anchor(
    tmp_path: Path, text_pair: tuple[str, Path, Path, Path], policy: str
) -> None:
    """Activations are read from the architecture's own modules (GPT-2's fused c_attn split into q, k, v)."""
    arch, a, b, text = text_pair
    params = (
        f"{{solver: emd, cost: activations, resid_policy: {policy}, "
        f"data: {{text: {q(text)}, seq_len: 16}}, samples: 12}}"
    )
    fused = merge(tmp_path, f"method: ot_fusion\nmodels: [{q(a)}, {q(b)}]\nparameters: {params}\n")
    for name, tensor in load_dir(a).items():
        torch.testing.assert_close(fused[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_heterogeneous_mlp_width_takes_the_anchors_shapes_and_runs(
    tmp_path: Path, pair: tuple[str, Path, Path]
) -> None:
    """A model with a narrower MLP (40 units) fused into the anchor (48): GPT-2 and BERT tie the head
    dimension to the hidden width, so with heads moved whole only the MLP width may differ."""
    arch, a, _ = pair
    build, _ = ARCHITECTURES[arch]
    torch.manual_seed(4)
    model = build()
    config = model.config
    setattr(config, "n_inner" if arch == "gpt2" else "intermediate_size", 40)
    narrow = tmp_path / "narrow"
    type(model)(config).save_pretrained(narrow)
    fused = merge(
        tmp_path,
        f"method: ot_fusion\nmodels: [{q(a)}, {q(narrow)}]\nparameters: {{solver: sinkhorn, resid_policy: mean}}\n",
    )
    anchor = load_dir(a)
    assert {n: tuple(t.shape) for n, t in fused.items()} == {n: tuple(t.shape) for n, t in anchor.items()}
    assert any(not torch.equal(fused[n], anchor[n]) for n in anchor)
    maps = load_file(tmp_path / "out" / "ot_fusion" / "maps.safetensors")
    assert tuple(maps["models.1.layers.0.mlp"].shape) == (40, 48)
    logits = _logits(tmp_path / "out", arch)
    assert logits.shape == (1, 6, VOCAB) and torch.isfinite(logits).all()


def test_other_head_dimensions_are_refused(tmp_path: Path, pair: tuple[str, Path, Path]) -> None:
    from workbench.errors import RecipeError

    arch, a, _ = pair
    build, _ = ARCHITECTURES[arch]
    model = build()
    config = model.config
    setattr(config, "n_embd" if arch == "gpt2" else "hidden_size", 24)  # 4 heads of 6 dimensions, not 8
    type(model)(config).save_pretrained(tmp_path / "narrow")
    with pytest.raises(
        RecipeError,
        match=re.escape(
            "has (2, 4, 4, 6) (layers, heads, key/value heads, head dim) "
            "where the anchor has (2, 4, 4, 8); heads move whole"
        ),
    ):
        merge(tmp_path, f"method: ot_fusion\nmodels: [{q(a)}, {q(tmp_path / 'narrow')}]\n")
    assert not (tmp_path / "out").exists()
