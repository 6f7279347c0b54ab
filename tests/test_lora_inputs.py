"""LoRA adapters as inputs: PEFT folders read as ``BASE+ADAPTER`` wherever a model is expected.

Adapters are written here by hand (safetensors + JSON, PEFT's key names), and every expectation
is W + scale · B @ A computed in the test from those tensors (scale = alpha / r, alpha / √r with
rsLoRA, per-module overrides), independently of the reader under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from merging import merge, q
from safetensors.torch import save_file

from workbench.errors import CheckpointError

TARGETS = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.2.self_attn.v_proj",
)


def write_peft(
    folder: Path,
    base: Path,
    shapes: dict[str, tuple[int, ...]],
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    **config: Any,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT LoRA folder with random A and B for TARGETS; returns {module: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    ranks = config.get("rank_pattern", {})
    for module in TARGETS:
        out, inp = shapes[f"{module}.weight"]
        rank = ranks.get(module, r)
        a, b = torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)
        factors[module] = (a, b)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "down_proj", "v_proj"],
        "base_model_name_or_path": str(base),
    } | config
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return factors


@pytest.fixture(scope="module")
def shapes(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in weights["base"].items()}


def expected(
    base: dict[str, torch.Tensor],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scales: dict[str, float],
) -> dict[str, torch.Tensor]:
    out = {name: t.float().clone() for name, t in base.items()}
    for module, (a, b) in factors.items():
        out[f"{module}.weight"] += scales[module] * (b @ a)
    return out


@pytest.mark.parametrize(
    "config, scale",
    [
        ({}, lambda module, rank: 8 / 4),
        ({"use_rslora": True}, lambda module, rank: 8 / math.sqrt(4)),
        (
            {"rank_pattern": {TARGETS[1]: 2}, "alpha_pattern": {"down_proj": 6}},
            lambda module, rank: (6 if module.endswith("down_proj") else 8) / rank,
        ),
    ],
)
def test_base_plus_adapter_reads_w_plus_scaled_ba(
    tmp_path: Path,
    tiny_family: dict[str, Path],
    weights: dict[str, dict[str, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
    config: dict[str, Any],
    scale: Any,
) -> None:
    factors = write_peft(tmp_path / "adapter", tiny_family["base"], shapes, **config)
    merged = merge(
        tmp_path,
        f"method: linear\nmodels: [{q(str(tiny_family['base']) + '+' + str(tmp_path / 'adapter'))}]\n"
        f"output: {{dtype: float32}}\n",
    )
    want = expected(weights["base"], factors, {m: scale(m, a.shape[0]) for m, (a, _) in factors.items()})
    # the reader stores W + ΔW back in W's dtype (bf16): within half a bf16 step of the float32 sum
    for name, tensor in want.items():
        torch.testing.assert_close(merged[name], tensor.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)


def test_an_adapter_folder_alone_stands_for_its_base_plus_itself(
    tmp_path: Path,
    tiny_family: dict[str, Path],
    weights: dict[str, dict[str, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    factors = write_peft(tmp_path / "adapter", tiny_family["base"], shapes)
    merged = merge(
        tmp_path,
        f"method: task_arithmetic\nbase: {q(tiny_family['base'])}\n"
        f"models: [{q(tmp_path / 'adapter')}]\nparameters: {{weight: 0.5}}\noutput: {{dtype: float32}}\n",
    )
    base = weights["base"]
    for module, (a, b) in factors.items():
        name = f"{module}.weight"
        adapted = (base[name].float() + 2.0 * (b @ a)).to(torch.bfloat16).float()
        torch.testing.assert_close(
            merged[name], base[name].float() + 0.5 * (adapted - base[name].float()), rtol=1e-6, atol=1e-6
        )
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"].float())


def test_fan_in_fan_out_adapters_change_the_transposed_weight(tmp_path: Path) -> None:
    """GPT-2 style Conv1D weights are stored (in, out); PEFT then stores ΔWᵀ's factors as usual."""
    from workbench.checkpoint.adapted import AdaptedReader
    from workbench.checkpoint.folder import SafetensorsFolder
    from workbench.checkpoint.lora_adapter import LoraAdapter

    base = tmp_path / "base"
    base.mkdir()
    weight = torch.randn(6, 10)  # (in 6, out 10)
    save_file({"transformer.h.0.mlp.c_fc.weight": weight}, str(base / "model.safetensors"))
    a, b = torch.randn(2, 6), torch.randn(10, 2)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {
            "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": a,
            "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight": b,
        },
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "fan_in_fan_out": True})
    )
    reader = AdaptedReader(SafetensorsFolder(base), [LoraAdapter(adapter)])
    torch.testing.assert_close(reader.read("transformer.h.0.mlp.c_fc.weight"), weight + (b @ a).T)
    torch.testing.assert_close(
        reader.read("transformer.h.0.mlp.c_fc.weight", rows=(2, 5)), (weight + (b @ a).T)[2:5]
    )


def test_rows_of_an_adapted_tensor_are_the_rows_of_the_whole(
    tmp_path: Path, tiny_family: dict[str, Path], shapes: dict[str, tuple[int, ...]]
) -> None:
    from workbench.checkpoint.resolve import open_reference

    write_peft(tmp_path / "adapter", tiny_family["base"], shapes)
    from workbench.registry import load_registry

    _, reader = open_reference(load_registry(), f"{tiny_family['base']}+{tmp_path / 'adapter'}")
    with reader:
        name = f"{TARGETS[1]}.weight"
        assert torch.equal(reader.read(name, rows=(3, 9)), reader.read(name)[3:9])


def test_evaluation_loads_base_plus_adapter(
    tmp_path: Path,
    tiny_family: dict[str, Path],
    weights: dict[str, dict[str, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    pytest.importorskip("transformers")
    from workbench.evaluator import load_model

    factors = write_peft(tmp_path / "adapter", tiny_family["base"], shapes)
    loaded = dict(
        load_model(f"{tiny_family['base']}+{tmp_path / 'adapter'}", tokenizer=False).module.named_parameters()
    )
    for module, (a, b) in factors.items():
        torch.testing.assert_close(
            loaded[f"{module}.weight"].detach(), weights["base"][f"{module}.weight"].float() + 2.0 * (b @ a)
        )


def _bad_adapter(tmp_path: Path, shapes: dict[str, tuple[int, ...]], base: Path, case: str) -> Path:
    folder = tmp_path / "bad"
    write_peft(folder, base, shapes)
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    if case == "partner":
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    elif case == "dora":
        (folder / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
        )
    elif case == "embedding":
        save_file(
            tensors | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 256)},
            str(folder / "adapter_model.safetensors"),
        )
    elif case == "shape":
        save_file(
            tensors | {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)},
            str(folder / "adapter_model.safetensors"),
        )
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("partner", "module 'model.layers.0.self_attn.q_proj' has lora_A but not its partner"),
        ("dora", "DoRA adapters (use_dora) are not supported"),
        ("embedding", "tensor 'base_model.model.model.embed_tokens.lora_embedding_A' is not a LoRA factor"),
        ("shape", "'model.layers.0.self_attn.q_proj.weight' is (64, 64) in base"),
    ],
)
def test_bad_adapters_are_refused_by_name(
    tmp_path: Path, tiny_family: dict[str, Path], shapes: dict[str, tuple[int, ...]], case: str, message: str
) -> None:
    folder = _bad_adapter(tmp_path, shapes, tiny_family["base"], case)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge(tmp_path, f"method: linear\nmodels: [{q(str(tiny_family['base']) + '+' + str(folder))}]\n")
    assert not (tmp_path / "out").exists()


def test_a_plus_part_that_is_not_an_adapter_is_named(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    ref = f"{tiny_family['base']}+{tiny_family['ft1']}"
    with pytest.raises(
        CheckpointError, match=f"its part '{tiny_family['ft1']}' is not a PEFT adapter folder"
    ):
        merge(tmp_path, f"method: linear\nmodels: [{q(ref)}]\n")


def test_inspect_accepts_base_plus_adapter(
    tmp_path: Path, tiny_family: dict[str, Path], shapes: dict[str, tuple[int, ...]], cli: Any
) -> None:
    from workbench.cli.main import main

    write_peft(tmp_path / "adapter", tiny_family["base"], shapes)
    result = cli.invoke(main, ["inspect", f"{tiny_family['base']}+{tmp_path / 'adapter'}"])
    assert result.exit_code == 0, result.output
    assert "layers: 4" in result.output
