"""``workbench moe``: mergekit-moe configs built into Mixtral / Qwen2-MoE / Qwen3-MoE folders.

The inputs are generated here: a tiny Llama base whose embeddings give three groups of words three
orthogonal directions (so hidden-state gates can tell the groups apart), and three experts whose MLPs
are the base's scaled differently (so every expert is visibly its own). Expected tensors are read from
the input files with safetensors, independently of the code under test.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_failures import WIDE, assert_failed, invoke
from click.testing import CliRunner, Result
from merging import load_dir, q
from safetensors.torch import save_file

from workbench.checkpoint.synthetic import SIZES, LlamaShape, write_family, write_model
from workbench.cli.main import main
from workbench.errors import OutputError
from workbench.moe.build import build_moe
from workbench.moe.config import parse_config
from workbench.registry import get_registry

EXPERTS = 3
GROUP = 10  # words w{10(e+1)} .. w{10(e+1)+9} belong to expert e
#: Share of a held-out prompt's words that layer 0 must route (top-1) to the prompt's expert.
ROUTED_SHARE = 0.8
MLP = ("gate_proj", "up_proj", "down_proj")


def word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer: <unk>, <s>, </s> are ids 0, 1, 2 (the config's bos/eos), word w<i> is id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)


def group_words(expert: int) -> list[str]:
    start = GROUP * (expert + 1)
    return [f"w{i}" for i in range(start, start + GROUP)]


def rewrite(folder: Path, change: dict[str, torch.Tensor]) -> None:
    tensors = load_dir(folder)
    tensors.update(change)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    base, *experts = write_family(root, "tiny", fine_tunes=EXPERTS)
    shape = SIZES["tiny"]
    tensors = load_dir(base)
    embed = tensors["model.embed_tokens.weight"].float()
    directions, _ = torch.linalg.qr(
        torch.randn(shape.hidden_size, EXPERTS, generator=torch.Generator().manual_seed(3))
    )
    for e in range(EXPERTS):
        ids = [int(w[1:]) for w in group_words(e)]
        embed[ids] = 16.0 * directions[:, e] + 0.3 * embed[ids]
    rewrite(base, {"model.embed_tokens.weight": embed.to(torch.bfloat16)})
    word_tokenizer(base, shape.vocab_size)
    for e, folder in enumerate(experts):
        weights = load_dir(folder)
        rewrite(
            folder,
            {
                n: (t.float() * (1.0 + 0.5 * (e + 1))).to(torch.bfloat16)
                for n, t in weights.items()
                if ".mlp." in n
            },
        )
    bare = root / "bare"  # the base without a tokenizer
    write_model(bare, shape)
    other = root / "other"  # an expert of another shape
    write_model(other, LlamaShape(64, 128, 4, 4, 2, 256), variant=1)
    return {"base": base, **{f"ft{e + 1}": p for e, p in enumerate(experts)}, "bare": bare, "other": other}


def config_text(
    family: dict[str, Path],
    gate_mode: str = "hidden",
    extra: str = "",
    base: str = "base",
    groups: tuple[int, ...] = tuple(range(EXPERTS)),
) -> str:
    """Expert e (model ft<e+1>) with two prompts of the words of group ``groups[e]``."""
    lines = [f"base_model: {q(family[base])}", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts:"]
    for e in range(EXPERTS):
        words = group_words(groups[e])
        lines += [
            f"  - source_model: {q(family[f'ft{e + 1}'])}",
            "    positive_prompts:",
            f"      - {' '.join(words[:4])}",
            f"      - {' '.join(words[4:7])}",
        ]
    return "\n".join(lines) + "\n" + extra


def build(tmp_path: Path, text: str, name: str = "out", **options: object) -> Path:
    out = tmp_path / name
    build_moe(parse_config(text, "moe.yml"), get_registry(), out, **options)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def hidden_out(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("hidden"), config_text(family))


def load_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_loads_as_mixtral_and_generates(hidden_out: Path) -> None:
    from transformers import MixtralForCausalLM

    model = load_model(hidden_out)
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_local_experts == EXPERTS and model.config.num_experts_per_tok == 2
    written = load_dir(hidden_out)
    state = model.state_dict()
    assert set(written) == set(state)
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name  # transformers holds exactly what was written
    ids = torch.tensor([[1, 10, 11, 12]])
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert generated.shape == (1, 8)
    for name in ("tokenizer.json", "mergekit_moe_config.yml", "README.md", "workbench_manifest.json"):
        assert (hidden_out / name).is_file(), name
    result = CliRunner().invoke(main, ["verify", str(hidden_out)])
    assert result.exit_code == 0, result.output


def test_tensors_come_from_base_and_experts(family: dict[str, Path], hidden_out: Path) -> None:
    written = load_dir(hidden_out)
    base = load_dir(family["base"])
    experts = [load_dir(family[f"ft{e + 1}"]) for e in range(EXPERTS)]
    layers = SIZES["tiny"].num_hidden_layers
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(written[name], tensor), name  # bit for bit
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp."
        gate_up = written[prefix + "experts.gate_up_proj"]
        down = written[prefix + "experts.down_proj"]
        for e, expert in enumerate(experts):
            gate, up = (expert[f"{prefix}{p}.weight"] for p in ("gate_proj", "up_proj"))
            assert torch.equal(gate_up[e], torch.cat([gate, up])), (layer, e)
            assert torch.equal(down[e], expert[f"{prefix}down_proj.weight"]), (layer, e)
        assert written[prefix + "gate.weight"].shape == (EXPERTS, SIZES["tiny"].hidden_size)
    assert not any(n.endswith(f"mlp.{p}.weight") for n in written for p in MLP)


def test_hidden_gates_route_each_experts_words(family: dict[str, Path], hidden_out: Path) -> None:
    model = load_model(hidden_out)
    for e in range(EXPERTS):
        words = group_words(e)
        held_out = [int(w[1:]) for w in words[7:] + words[:2]]  # words 7-9 are in no prompt
        ids = torch.tensor([[1, *held_out]])
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits[0]
        chosen = logits.argmax(dim=-1)[1:]  # the words, not <s>
        share = float((chosen == e).float().mean())
        assert share >= ROUTED_SHARE, (e, chosen.tolist())


def test_hidden_gate_of_layer_0_is_the_mean_last_embedding(family: dict[str, Path], hidden_out: Path) -> None:
    """Layer 0's input is the embedding: its router row is the normalised mean embedding of the
    prompts' last words (mergekit's `hidden` takes the last token), up to bf16 rounding."""
    embed = load_dir(family["base"])["model.embed_tokens.weight"].float()
    gates = load_dir(hidden_out)["model.layers.0.mlp.gate.weight"].float()
    for e in range(EXPERTS):
        words = group_words(e)
        last = [int(words[3][1:]), int(words[6][1:])]
        expected = embed[last].mean(dim=0)
        expected /= expected.norm()
        assert torch.allclose(gates[e], expected, atol=2 * 2**-9), e


def test_negative_prompts_and_cheap_embed(family: dict[str, Path], tmp_path: Path) -> None:
    words = group_words(0)
    text = config_text(family, "cheap_embed").replace(
        f"      - {' '.join(group_words(0)[4:7])}\n",
        f"      - {' '.join(words[4:7])}\n    negative_prompts: [{words[9]}]\n",
    )
    written = load_dir(build(tmp_path, text))
    embed = load_dir(family["base"])["model.embed_tokens.weight"].float()

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm()

    positive = unit(embed[[1, *[int(w[1:]) for w in words[:4]], 1, *[int(w[1:]) for w in words[4:7]]]].sum(0))
    expected = unit(positive - unit(embed[[1, int(words[9][1:])]].sum(0)))
    for layer in range(SIZES["tiny"].num_hidden_layers):  # the same row in every layer
        gate = written[f"model.layers.{layer}.mlp.gate.weight"]
        assert gate.shape == (EXPERTS, SIZES["tiny"].hidden_size)
        assert torch.allclose(gate[0].float(), expected, atol=2**-9)


def test_random_gates_are_seeded(family: dict[str, Path], tmp_path: Path) -> None:
    text = config_text(family, "random", base="bare")  # no tokenizer needed
    first = load_dir(build(tmp_path, text, "a", seed=1))
    again = load_dir(build(tmp_path, text, "b", seed=1))
    other = load_dir(build(tmp_path, text, "c", seed=2))
    name = "model.layers.2.mlp.gate.weight"
    assert first[name].shape == (EXPERTS, SIZES["tiny"].hidden_size)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first[name], other[name])
    assert abs(float(first[name].float().std()) - 1.0) < 0.25  # standard normal rows
    assert not (tmp_path / "a" / "tokenizer.json").exists()


def test_noise_and_residual_scale(family: dict[str, Path], tmp_path: Path) -> None:
    text = config_text(family, "random").replace(
        f"  - source_model: {q(family['ft2'])}\n",
        f"  - source_model: {q(family['ft2'])}\n    noise_scale: 0.01\n    residual_scale: 0.5\n",
    )
    written = load_dir(build(tmp_path, text, "a"))
    again = load_dir(build(tmp_path, text, "b"))
    ft2 = load_dir(family["ft2"])
    gate_up = written["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up, again["model.layers.1.mlp.experts.gate_up_proj"])  # seeded noise
    clean = torch.cat([ft2[f"model.layers.1.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")]).float()
    noise = gate_up[1].float() - clean
    assert 0.005 < float(noise.std()) < 0.02
    ft1 = load_dir(family["ft1"])
    assert torch.equal(
        gate_up[0], torch.cat([ft1[f"model.layers.1.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")])
    )
    down = written["model.layers.1.mlp.experts.down_proj"][1].float()
    scaled = ft2["model.layers.1.mlp.down_proj.weight"].float() * 0.5
    assert float((down - scaled).abs().max()) < 0.1 * float(scaled.abs().max())  # halved, plus noise


def test_per_expert_layout_loads_the_same(family: dict[str, Path], hidden_out: Path, tmp_path: Path) -> None:
    out = build(tmp_path, config_text(family, "cheap_embed"), per_expert=True)
    written = load_dir(out)
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in written
    assert "model.layers.0.block_sparse_moe.gate.weight" in written
    fused = load_dir(hidden_out)
    state = load_model(out).state_dict()  # transformers fuses the per-expert tensors on load
    for name, tensor in fused.items():
        if "experts" in name:
            assert torch.equal(state[name], tensor), name


def test_qwen2_moe_with_a_shared_expert(family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import Qwen2MoeForCausalLM

    words = group_words(2)
    text = config_text(family, "cheap_embed").replace(
        f"  - source_model: {q(family['ft3'])}", "  - source_model: _"
    )
    text = text.split("  - source_model: _")[0] + (
        f"shared_experts:\n  - source_model: {q(family['ft3'])}\n    positive_prompts: [{' '.join(words)}]\n"
        "    residual_scale: 0.25\n"
    )
    out = build(tmp_path, text)
    model = load_model(out)
    assert isinstance(model, Qwen2MoeForCausalLM) and model.config.num_experts == 2
    written = load_dir(out)
    ft3 = load_dir(family["ft3"])
    shared = "model.layers.3.mlp.shared_expert."
    assert torch.equal(written[shared + "up_proj.weight"], ft3["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(
        written[shared + "down_proj.weight"],
        (ft3["model.layers.3.mlp.down_proj.weight"].float() * 0.25).to(torch.bfloat16),
    )
    assert written["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, SIZES["tiny"].hidden_size)
    assert not written["model.layers.0.self_attn.q_proj.bias"].any()  # Llama base: zero q/k/v biases
    ids = torch.tensor([[1, 30, 31]])
    assert model.generate(
        ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids)
    ).shape == (1, 6)


def test_qwen3_moe(tmp_path: Path) -> None:
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    for e in (1, 2):
        (tmp_path / f"ft{e}").mkdir()
        tensors = load_dir(tmp_path / "base")
        tensors = {
            n: (t.float() * (1 + e)).to(torch.bfloat16) if ".mlp." in n else t for n, t in tensors.items()
        }
        save_file(tensors, tmp_path / f"ft{e}" / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / f"ft{e}" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    text = (
        f"base_model: {q(tmp_path / 'base')}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {q(tmp_path / 'ft1')}\n  - source_model: {q(tmp_path / 'ft2')}\n"
    )
    out = build(tmp_path, text)
    model = load_model(out)
    assert isinstance(model, transformers.Qwen3MoeForCausalLM)
    written = load_dir(out)
    base = load_dir(tmp_path / "base")
    assert torch.equal(
        written["model.layers.1.self_attn.k_norm.weight"], base["model.layers.1.self_attn.k_norm.weight"]
    )
    assert written["model.layers.1.mlp.experts.down_proj"].shape == (2, 32, 48)


@pytest.mark.parametrize(
    "error",
    [OSError("disk on fire"), OSError(errno.ENOSPC, "No space left on device")],
    ids=["error", "disk full"],
)
def test_failure_while_writing_leaves_nothing(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    import workbench.moe.build as build_module

    calls = []
    real = build_module.materialize

    def failing(*args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 20:  # in the middle of the first shard
            raise error
        return real(*args)

    monkeypatch.setattr(build_module, "materialize", failing)
    expected = OutputError if error.errno == errno.ENOSPC else OSError
    with pytest.raises(expected, match="disk on fire|ran out of space"):
        build(tmp_path, config_text(family, "random"))
    assert len(calls) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out, out.partial or out.lock


def _cli(tmp_path: Path, text: str, *extra: str) -> tuple[Result, Path]:
    config = tmp_path / "moe.yml"
    config.write_text(text)
    out = tmp_path / "out"
    return invoke(CliRunner(), "moe", config, out, *extra), out


def test_cli_builds_with_a_summary(family: dict[str, Path], tmp_path: Path) -> None:
    result, out = _cli(tmp_path, config_text(family, "random"), "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "Mixtral with 3 experts" in result.output
    assert "not a power of two" in result.output
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == EXPERTS


BAD_CONFIGS = {
    "unknown key": (
        lambda f: config_text(f) + "expert_per_token: 1\n",
        ["moe.yml:", "unknown key 'expert_per_token'"],
    ),
    "missing expert model": (
        lambda f: config_text(f).replace(str(f["ft2"]), str(f["ft2"]) + "-gone"),
        ["experts[1].source_model", "does not exist"],
    ),
    "base without a tokenizer": (lambda f: config_text(f, base="bare"), ["base_model", "no tokenizer files"]),
    "expert of another shape": (
        lambda f: config_text(f).replace(str(f["ft3"]), str(f["other"])),
        ["experts[2].source_model", "mlp.gate_proj.weight", "has shape [128, 64]", "[176, 64]"],
    ),
    "unknown gate mode": (lambda f: config_text(f, "learned"), ["gate_mode", "unknown gate_mode 'learned'"]),
    "too few experts": (
        lambda f: config_text(f) + "experts_per_token: 4\n",
        ["experts_per_token", "only 3 experts"],
    ),
    "same prompts": (
        lambda f: config_text(f, groups=(0, 0, 0)),
        ["moe.yml:4: experts", "same positive and negative prompts"],
    ),
    "same experts": (
        lambda f: config_text(f).replace(str(f["ft2"]), str(f["ft1"])).replace(str(f["ft3"]), str(f["ft1"])),
        ["every expert is the same model", "--i-understand-this-is-not-useful-without-training"],
    ),
    "no prompts": (
        lambda f: (
            config_text(f)
            .replace(f"      - {' '.join(group_words(1)[:4])}\n", "")
            .replace(f"      - {' '.join(group_words(1)[4:7])}\n", "")
        ),
        ["experts[1]", "has no positive_prompts"],
    ),
    "integer dtype": (
        lambda f: config_text(f).replace("dtype: bfloat16", "dtype: int64"),
        ["dtype", "int64"],
    ),
    "deepseek output": (
        lambda f: config_text(f, "random") + f"shared_experts:\n  - source_model: {q(f['ft1'])}\n",
        ["shared_experts", "DeepSeek MoE", "architecture: qwen"],
    ),
    "no such architecture": (
        lambda f: config_text(f) + "architecture: gemma\n",
        ["architecture", "no output architecture is called 'gemma'"],
    ),
    "a merge recipe": (lambda f: "merge_method: linear\nmodels: []\n", ["merge_method", "workbench run"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_are_refused_by_name(family: dict[str, Path], tmp_path: Path, case: str) -> None:
    make, fragments = BAD_CONFIGS[case]
    result, out = _cli(tmp_path, make(family))
    assert_failed(result, out, *fragments)
    assert not out.with_name("out.lock").exists()


def test_existing_output_needs_overwrite(family: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    config = tmp_path / "moe.yml"
    config.write_text(config_text(family, "random"))
    result = CliRunner().invoke(main, ["moe", str(config), "--out", str(tmp_path / "out")], env=WIDE)
    assert result.exit_code == 2 and "already exists" in result.output
    result = CliRunner().invoke(
        main, ["moe", str(config), "--out", str(tmp_path / "out"), "--overwrite", "-q"], env=WIDE
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_output_card_passes_the_push_check(hidden_out: Path) -> None:
    """`workbench push` checks the card first; a mixture's recipe block is its config (base, experts)."""
    from workbench.engine.card import check_card

    data = check_card(hidden_out)
    assert "merge" in data["tags"]
