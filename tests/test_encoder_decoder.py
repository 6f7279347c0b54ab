"""Encoder-decoder models (T5, BART): their encoder and decoder layers share their numbers. Tensor-wise
merges place T5's tensors by block (``block.N``, not the sub-layer ``layer.M`` inside it) and reload in
transformers whole; methods that take whole layers from one model and layer stacking are refused by
name at validate, since a layer index alone cannot say which stack is meant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_failures import COMMANDS, assert_failed, invoke
from click.testing import CliRunner
from safetensors.torch import load_file

from workbench.architecture import encoder_decoder, place

transformers = pytest.importorskip("transformers")


def _family(root: Path, make) -> dict[str, Path]:
    torch.manual_seed(0)
    base = make()
    folders = {}
    for i, name in enumerate(("base", "ft1", "ft2")):
        model = base if i == 0 else make()
        if i:
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * torch.randn_like(parameter))
        folders[name] = root / name
        model.save_pretrained(folders[name], safe_serialization=True)
    return folders


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2
    )
    return _family(tmp_path_factory.mktemp("t5"), lambda: transformers.T5ForConditionalGeneration(config))


@pytest.fixture(scope="module")
def bart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    config = transformers.BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    return _family(tmp_path_factory.mktemp("bart"), lambda: transformers.BartForConditionalGeneration(config))


def test_t5_tensors_are_placed_by_block_not_by_sub_layer() -> None:
    assert place("decoder.block.1.layer.2.DenseReluDense.wi.weight").layer_index == 1
    assert place("encoder.block.2.layer.0.SelfAttention.q.weight").layer_index == 2
    assert encoder_decoder(["encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.x"])
    assert encoder_decoder(["model.encoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.weight"])
    assert not encoder_decoder(["bert.encoder.layer.0.output.dense.weight"])  # an encoder alone
    assert not encoder_decoder(["model.layers.0.mlp.up_proj.weight"])


def _recipe(tmp_path: Path, family: dict[str, Path], body: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(body.format(**{k: json.dumps(str(v)) for k, v in family.items()}))
    return path


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_a_tensor_wise_merge_reloads_whole(
    cli: CliRunner, tmp_path: Path, arch: str, request: pytest.FixtureRequest
) -> None:
    family = request.getfixturevalue(arch)
    recipe = _recipe(tmp_path, family, "method: linear\nmodels: [{ft1}, {ft2}]\n")
    out = tmp_path / "out"
    result = invoke(cli, "run", recipe, out)
    assert result.exit_code == 0, result.output
    model_cls = transformers.AutoModelForSeq2SeqLM
    merged, info = model_cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    a, b = (load_file(family[k] / "model.safetensors") for k in ("ft1", "ft2"))
    name = next(n for n in a if ".1." in n and n.endswith("weight") and a[n].dim() == 2)
    torch.testing.assert_close(merged.state_dict()[name], (a[name] + b[name]) / 2, rtol=1e-5, atol=1e-6)


@COMMANDS
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_layer_swap_is_refused_by_name(
    cli: CliRunner, tmp_path: Path, command: str, arch: str, request: pytest.FixtureRequest
) -> None:
    family = request.getfixturevalue(arch)
    recipe = _recipe(
        tmp_path, family, "method: layer_swap\nmodels: [{ft1}, {ft2}]\nparameters: {{bottom: 1}}\n"
    )
    out = tmp_path / "out"
    assert_failed(invoke(cli, command, recipe, out), out, "layer_swap", "encoder-decoder", str(family["ft1"]))


@COMMANDS
def test_stacking_an_encoder_decoder_model_is_refused_by_name(
    cli: CliRunner, tmp_path: Path, command: str, t5: dict[str, Path]
) -> None:
    recipe = _recipe(
        tmp_path,
        t5,
        "method: passthrough\nslices:\n  - sources: [{{model: {ft1}, layer_range: [0, 2]}}]\n"
        "  - sources: [{{model: {ft2}, layer_range: [1, 3]}}]\n",
    )
    out = tmp_path / "out"
    assert_failed(invoke(cli, command, recipe, out), out, "encoder-decoder", "slices", str(t5["ft1"]))
