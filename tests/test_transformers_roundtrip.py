"""Real Hugging Face architectures through the merge engine and back into ``transformers``.

Tiny Llama, GPT-2 and BERT models are built here from small configs (random init, fixed seeds; the
fine-tunes are small perturbations of a base), saved as safetensors, merged with every method that
applies, and the output must reload with ``safetensors`` and with ``transformers``: no missing or
unexpected weights, the weights transformers holds are the merged ones, a forward pass is finite,
and a merge that selects one model reproduces that model's logits exactly.

GPT-2 ties its head to the embeddings (``lm_head`` is not stored) and uses Conv1D weights stored
(in, out); BERT numbers its blocks ``encoder.layer.N`` and ties its MLM decoder to the embeddings.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from workbench.engine.run import run_recipe
from workbench.recipe.schema import parse_recipe

transformers = pytest.importorskip("transformers")

VOCAB = 96
SEQ = 12


@dataclass(frozen=True)
class Family:
    arch: str
    dirs: dict[str, Path]  # base, ft1, ft2
    auto: Any  # the AutoModel class that loads it


def _llama() -> Any:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2() -> Any:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.BertForMaskedLM(config)


BUILDERS = {
    "llama": (_llama, "AutoModelForCausalLM"),
    "gpt2": (_gpt2, "AutoModelForCausalLM"),
    "bert": (_bert, "AutoModelForMaskedLM"),
}


def save(model: Any, directory: Path) -> Path:
    kwargs = (
        {"safe_serialization": True}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters
        else {}
    )
    model.save_pretrained(directory, **kwargs)
    assert (directory / "model.safetensors").is_file()
    return directory


@pytest.fixture(scope="session", params=list(BUILDERS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A base model and two fine-tunes (base plus a small seeded perturbation of every weight)."""
    arch = request.param
    build, auto_name = BUILDERS[arch]
    root = tmp_path_factory.mktemp(f"hf-{arch}")
    torch.manual_seed(1234)
    model = build().eval()
    dirs = {"base": save(model, root / "base")}
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for variant in (1, 2):
        g = torch.Generator().manual_seed(100 + variant)
        with torch.no_grad():
            for name, param in model.named_parameters():
                ref = base_state[name]
                noise = torch.randn(ref.shape, generator=g)
                param.copy_(
                    ref + noise * (0.05 * float(ref.std()) if ref.numel() > 1 else 0.05) + 0.01 * noise
                )
        dirs[f"ft{variant}"] = save(model, root / f"ft{variant}")
    return Family(arch, dirs, getattr(transformers, auto_name))


def q(path: Path) -> str:
    return json.dumps(str(path))


def stored(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors
    return tensors


def load_hf(family: Family, directory: Path) -> Any:
    model, info = family.auto.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def logits(model: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits


def run(tmp_path: Path, text: str) -> Path:
    out = tmp_path / "merged"
    run_recipe(parse_recipe(text), out=out)
    return out


def check_reload(family: Family, out: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """The output reloads with safetensors (same names and shapes as the inputs) and with transformers
    (every stored weight is the one transformers uses); the forward pass is finite."""
    merged = stored(out)
    original = stored(family.dirs["base"])
    assert {k: tuple(v.shape) for k, v in merged.items()} == {k: tuple(v.shape) for k, v in original.items()}
    assert {v.dtype for v in merged.values()} == {v.dtype for v in original.values()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == json.loads((family.dirs["base"] / "config.json").read_text())["model_type"]
    model = load_hf(family, out)
    state = model.state_dict()
    for name, value in merged.items():
        assert name in state, name
        assert torch.equal(state[name].to(value.dtype), value), name
    y = logits(model)
    assert y.shape == (2, SEQ, VOCAB)
    assert bool(torch.isfinite(y).all())
    return merged, model


def close(out: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor) -> bool:
    return bool(
        ((out.double() - expected).abs() <= 8 * torch.finfo(torch.float32).eps * magnitude + 1e-30).all()
    )


# --------------------------------------------------------------------------------------------------


def test_fixture_models_are_distinct(family):
    base, ft1, ft2 = (stored(family.dirs[k]) for k in ("base", "ft1", "ft2"))
    assert set(base) == set(ft1) == set(ft2)
    assert all(not torch.equal(ft1[k], ft2[k]) for k in base)
    if family.arch == "gpt2":
        assert "lm_head.weight" not in base and any(".attn.c_attn.weight" in k for k in base)
    if family.arch == "bert":
        assert any(".encoder.layer.1." in k for k in base)


def test_linear_merge_roundtrip(tmp_path, family):
    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(d["ft1"])}
    parameters: {{weight: 0.3}}
  - model: {q(d["ft2"])}
    parameters: {{weight: 0.7}}
""",
    )
    merged, model = check_reload(family, out)
    a, b = stored(d["ft1"]), stored(d["ft2"])
    for name, value in merged.items():
        expected = 0.3 * a[name].double() + 0.7 * b[name].double()
        assert close(value, expected, 0.3 * a[name].double().abs() + 0.7 * b[name].double().abs()), name
    y, y1 = logits(model), logits(load_hf(family, d["ft1"]))
    assert not torch.allclose(y, y1)  # the merge really changed the model
    if family.arch == "gpt2":  # the head is tied to the merged embeddings
        assert torch.equal(model.lm_head.weight, merged["transformer.wte.weight"])


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v0, v1 = a.double(), b.double()
    n0, n1 = v0.norm().item(), v1.norm().item()
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    d = float((u0 * u1).sum())
    if abs(d) > 0.9995:
        c0, c1 = 1 - t, t
    else:
        om = math.acos(max(-1.0, min(1.0, d)))
        c0, c1 = math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)
    return c0 * v0 + c1 * v1, abs(c0) * v0.abs() + abs(c1) * v1.abs()


def test_slerp_merge_roundtrip(tmp_path, family):
    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: slerp
models: [{q(d["ft1"])}, {q(d["ft2"])}]
parameters: {{t: 0.4}}
""",
    )
    merged, _ = check_reload(family, out)
    a, b = stored(d["ft1"]), stored(d["ft2"])
    for name, value in merged.items():
        expected, magnitude = _slerp(0.4, a[name], b[name])
        # Near the parallel threshold fp32 and fp64 may pick different branches (they differ < 2e-4).
        assert bool(((value.double() - expected).abs() <= 2e-4 * magnitude + 1e-30).all()), name


def test_task_arithmetic_merge_roundtrip(tmp_path, family):
    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: task_arithmetic
base: {q(d["base"])}
models:
  - model: {q(d["ft1"])}
    parameters: {{weight: 1.0}}
  - model: {q(d["ft2"])}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.8}}
""",
    )
    merged, _ = check_reload(family, out)
    base, a, b = stored(d["base"]), stored(d["ft1"]), stored(d["ft2"])
    for name, value in merged.items():
        x0, x1, x2 = base[name].double(), a[name].double(), b[name].double()
        expected = x0 + 0.8 * (1.0 * (x1 - x0) + 0.5 * (x2 - x0))
        magnitude = 2.2 * x0.abs() + 0.8 * x1.abs() + 0.4 * x2.abs()
        assert close(value, expected, magnitude), name


def test_task_arithmetic_single_finetune_reproduces_its_logits(tmp_path, family):
    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: task_arithmetic
base: {q(d["base"])}
models: [{q(d["ft2"])}]
parameters: {{lambda: 1.0}}
""",
    )
    _, model = check_reload(family, out)
    assert torch.equal(logits(model), logits(load_hf(family, d["ft2"])))


def test_linear_self_merge_reproduces_logits(tmp_path, family):
    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: linear
models: [{q(d["ft1"])}, {q(d["ft1"])}]
""",
    )
    merged, model = check_reload(family, out)
    original = stored(d["ft1"])
    for name, value in merged.items():
        assert torch.equal(value, original[name]), name
    assert torch.equal(logits(model), logits(load_hf(family, d["ft1"])))


@pytest.mark.parametrize("hot", ["base", "ft1", "ft2"])
def test_linear_one_hot_reproduces_logits(tmp_path, family, hot):
    d = family.dirs
    entries = "\n".join(
        f"  - model: {q(d[k])}\n    parameters: {{weight: {1.0 if k == hot else 0.0}}}"
        for k in ("base", "ft1", "ft2")
    )
    out = run(tmp_path, f"method: linear\nmodels:\n{entries}\n")
    _, model = check_reload(family, out)
    assert torch.equal(logits(model), logits(load_hf(family, d[hot])))


def test_slerp_endpoint_reproduces_logits(tmp_path, family):
    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: slerp
models: [{q(d["ft1"])}, {q(d["ft2"])}]
parameters: {{t: 1.0}}
""",
    )
    _, model = check_reload(family, out)
    assert torch.equal(logits(model), logits(load_hf(family, d["ft2"])))


def test_bf16_output_reloads_as_bf16(tmp_path, family):
    """output.dtype rewrites config.json's dtype, so transformers loads the merge in that dtype."""
    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: linear
models: [{q(d["ft1"])}, {q(d["ft2"])}]
output: {{dtype: bfloat16}}
""",
    )
    merged = stored(out)
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = load_hf(family, out)
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    for name, value in merged.items():
        assert torch.equal(state[name], value), name
    assert bool(torch.isfinite(logits(model).float()).all())


LAYER_PATTERNS = {
    "llama": r"^model\.layers\.(\d+)\.",
    "gpt2": r"^transformer\.h\.(\d+)\.",
    "bert": r"^bert\.encoder\.layer\.(\d+)\.",
}


def test_layer_gradient_follows_each_architectures_layers(tmp_path, family):
    """weight gradients [1, 0] / [0, 1] over 2 layers: layer 0 (and every tensor outside the layers)
    comes from ft1, layer 1 from ft2, whatever the architecture names its blocks."""
    import re

    d = family.dirs
    out = run(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(d["ft1"])}
    parameters: {{weight: [1.0, 0.0]}}
  - model: {q(d["ft2"])}
    parameters: {{weight: [0.0, 1.0]}}
""",
    )
    merged, _ = check_reload(family, out)
    a, b = stored(d["ft1"]), stored(d["ft2"])
    pattern = re.compile(LAYER_PATTERNS[family.arch])
    layers_seen = set()
    for name, value in merged.items():
        m = pattern.match(name)
        source = b if m and int(m[1]) == 1 else a
        if m:
            layers_seen.add(int(m[1]))
        assert torch.equal(value, source[name]), name
    assert layers_seen == {0, 1}
