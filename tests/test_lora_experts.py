"""Layer-wise LoRA experts: the runtime (routing, exactness against plain LoRA, save/load), the
allocation patterns, and the ``lora_experts`` method on a tiny Llama with three adapters.

Expected values are computed here from the adapters' tensors (read with safetensors) and with
numpy, never by the code under test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from merging import add_word_tokenizer, load_dir, merge, q
from safetensors.torch import load_file, save_file

from workbench.errors import RecipeError
from workbench.modeling.allocation import group_sizes, per_layer
from workbench.modeling.mola import ExpertSet, MoLALinear, gates, load_mola, save_experts, wrap

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER, LAYERS = 48, 32, 64, 4
MODULES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[3, 9, 4, 17, 22, 5, 8, 1]])


# --------------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------------


def test_gates_keep_the_top_k_softmax_weights_renormalised() -> None:
    router = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    got = gates(router, x, top_k=2).numpy()
    logits = x.double().numpy() @ router.double().numpy().T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for row in range(3):
        top = np.argsort(-probs[row])[:2]
        want = np.zeros(5)
        want[top] = probs[row, top] / probs[row, top].sum()
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-7)
        assert (got[row] > 0).sum() == 2 and got[row].sum() == pytest.approx(1.0)
    torch.testing.assert_close(
        gates(router, x, top_k=9), torch.softmax(x @ router.T, dim=-1)
    )  # k above E: all experts


def test_one_expert_equals_the_plain_lora_exactly() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(8, 6, bias=False)
    a, b, scale = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), 2.0
    layer = MoLALinear(
        base, ExpertSet(a[None], b[None], torch.tensor([scale]), torch.randn(1, 8, generator=g), top_k=2)
    )
    x = torch.randn(5, 8, generator=g)
    with torch.no_grad():  # PEFT's forward, up to float32 rounding (the runtime scales before B)
        torch.testing.assert_close(layer(x), base(x) + (x @ a.T @ b.T) * scale, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny float32 Llama with a word tokenizer, three LoRA adapters on it, and a text."""
    root = tmp_path_factory.mktemp("mola")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    add_word_tokenizer(root / "base", VOCAB)
    weights = load_file(root / "base" / "model.safetensors")
    adapters = []
    for index, strength in enumerate((1.0, 0.5, 0.25)):
        g = torch.Generator().manual_seed(10 + index)
        tensors = {}
        for layer in range(LAYERS):
            for module in MODULES:
                path = f"model.layers.{layer}.{module}"
                out, inp = weights[f"{path}.weight"].shape
                tensors[f"base_model.model.{path}.lora_A.weight"] = 0.2 * torch.randn(2, inp, generator=g)
                tensors[f"base_model.model.{path}.lora_B.weight"] = (
                    strength * (layer + 1) * 0.2 * torch.randn(out, 2, generator=g)
                )
        folder = root / f"adapter{index}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(root / "base")}
            )
        )
        adapters.append(folder)
    texts = []  # three "tasks" with their own words (16 each), so their inputs differ
    for index in range(3):
        texts.append(root / f"text{index}.txt")
        words = torch.randint(
            16 * index, 16 * (index + 1), (200,), generator=torch.Generator().manual_seed(20 + index)
        )
        texts[-1].write_text(" ".join(f"w{i}" for i in words.tolist()))
    return {"base": root / "base", "adapters": adapters, "texts": texts}


def delta_of(adapter: Path, name: str) -> torch.Tensor:
    tensors = load_file(adapter / "adapter_model.safetensors")
    module = name.removesuffix(".weight")
    return 2.0 * (
        tensors[f"base_model.model.{module}.lora_B.weight"]
        @ tensors[f"base_model.model.{module}.lora_A.weight"]
    )


def test_all_b_zero_is_the_base_and_save_load_keeps_the_outputs(
    tmp_path: Path, family: dict[str, Any]
) -> None:
    base = transformers.LlamaForCausalLM.from_pretrained(family["base"]).eval()
    expected = _logits(base, IDS)
    g = torch.Generator().manual_seed(3)
    zero_b, random_b = {}, {}
    for layer in range(LAYERS):
        for module in MODULES:
            path = f"model.layers.{layer}.{module}"
            out, inp = base.get_submodule(path).weight.shape
            a, router = torch.randn(3, 2, inp, generator=g), torch.randn(3, inp, generator=g)
            zero_b[path] = ExpertSet(a, torch.zeros(3, out, 2), torch.ones(3), router, top_k=2)
            random_b[path] = ExpertSet(a, torch.randn(3, out, 2, generator=g), torch.ones(3), router, top_k=2)
    wrap(base, zero_b)
    assert torch.equal(_logits(base, IDS), expected)
    model = transformers.LlamaForCausalLM.from_pretrained(family["base"]).eval()
    wrap(model, random_b)
    in_memory = _logits(model, IDS)
    assert not torch.allclose(in_memory, expected, atol=1e-3)
    import shutil

    shutil.copytree(family["base"], tmp_path / "saved")
    save_experts(tmp_path / "saved", random_b, {"source": "test"})
    loaded = load_mola(tmp_path / "saved")
    assert torch.equal(_logits(loaded, IDS), in_memory)
    generated = loaded.generate(
        IDS, max_new_tokens=4, do_sample=False, pad_token_id=0
    )  # the wrapped model generates
    assert generated.shape == (1, IDS.shape[1] + 4) and torch.equal(generated[:, : IDS.shape[1]], IDS)
    assert int(generated[0, IDS.shape[1]]) == int(
        in_memory[0, -1].argmax()
    )  # greedy: the first new token is the top logit


# --------------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------------


def test_group_patterns_split_layers_evenly_with_extras_outside_first() -> None:
    assert group_sizes(32, 4) == [8, 8, 8, 8]
    assert group_sizes(6, 4) == [2, 1, 1, 2]
    assert per_layer("2-4-6-8", 6) == [2, 2, 4, 6, 8, 8]
    assert per_layer("8-6-4-2", 6) == [8, 8, 6, 4, 2, 2]
    assert group_sizes(7, 3) == [2, 3, 2] and group_sizes(8, 3) == [3, 2, 3]
    for layers in range(4, 40):  # a pattern and its reverse cost the same wherever a symmetric split exists
        if (layers % 4) % 2 == 0:
            assert (
                sum(per_layer("2-4-6-8", layers))
                == sum(per_layer("8-6-4-2", layers))
                == sum(per_layer("5-5-5-5", layers))
            )
        assert sum(per_layer("1-2-3", layers - 1)) == sum(per_layer("3-2-1", layers - 1))
    assert per_layer([1, 2, 3], 3) == [1, 2, 3]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("2-x", "is not a pattern like '2-4-6-8'"),
        ([1, 2], "2 counts for a model with 3 layers"),
        ("1-0-1", "at least one expert"),
        ("1-1-1-1", "has 4 groups, but the model has only 3 layers"),
    ],
)
def test_bad_allocations_are_named(spec: Any, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        per_layer(spec, 3)


# --------------------------------------------------------------------------------------------------
# The lora_experts method
# --------------------------------------------------------------------------------------------------


def _recipe(family: dict[str, Any], parameters: str, data: bool = True) -> str:
    models = "\n".join(
        f"  - model: {q(adapter)}"
        + (f"\n    parameters: {{data: {{text: {q(text)}, seq_len: 8}}}}" if data else "")
        for adapter, text in zip(family["adapters"], family["texts"])
    )
    return f"method: lora_experts\nbase: {q(family['base'])}\nmodels:\n{models}\nparameters: {parameters}\n"


def test_uniform_experts_run_and_the_base_weights_are_kept(tmp_path: Path, family: dict[str, Any]) -> None:
    out = merge(tmp_path, _recipe(family, "{allocation: uniform, top_k: 2}"))
    base = load_dir(family["base"])
    assert all(torch.equal(out[n], t) for n, t in base.items())
    config = json.loads((tmp_path / "out" / "mola" / "mola_config.json").read_text())
    assert config["allocation"]["per_layer"] == [3] * LAYERS and len(config["modules"]) == LAYERS * len(
        MODULES
    )
    experts = load_file(tmp_path / "out" / "mola" / "experts.safetensors")
    name = "model.layers.2.mlp.down_proj"
    for e, adapter in enumerate(family["adapters"]):  # each expert is its adapter: s_e B_e A_e = ΔW_e
        got = experts[f"{name}.scale"][e] * (experts[f"{name}.lora_B"][e] @ experts[f"{name}.lora_A"][e])
        torch.testing.assert_close(got, delta_of(adapter, f"{name}.weight"))
    from workbench.evaluator import load_model

    model = load_model(tmp_path / "out", tokenizer=False).module  # evaluation runs the experts
    plain = transformers.LlamaForCausalLM.from_pretrained(family["base"]).eval()
    assert not torch.allclose(_logits(model, IDS), _logits(plain, IDS), atol=1e-4)


@pytest.mark.parametrize("overflow", ["pick", "merge"])
def test_fewer_slots_than_adapters_pick_or_merge_by_change(
    tmp_path: Path, family: dict[str, Any], overflow: str
) -> None:
    """Adapter 0 changes every layer most, then 1, then 2; layer 0 has one slot, layer 3 two."""
    merge(
        tmp_path,
        _recipe(family, f"{{allocation: [1, 3, 3, 2], overflow: {overflow}, router: random}}", data=False),
    )
    config = json.loads((tmp_path / "out" / "mola" / "mola_config.json").read_text())
    assert config["allocation"]["per_layer"] == [1, 3, 3, 2]
    names = [a.name for a in family["adapters"]]
    if overflow == "pick":
        assert config["experts_per_layer"]["0"] == [[names[0]]] and config["experts_per_layer"]["3"] == [
            [names[0]],
            [names[1]],
        ]
    else:
        assert config["experts_per_layer"]["0"] == [names] and config["experts_per_layer"]["3"] == [
            [names[0]],
            names[1:],
        ]
        experts = load_file(tmp_path / "out" / "mola" / "experts.safetensors")
        module = "model.layers.3.self_attn.q_proj"
        merged = experts[f"{module}.scale"][1] * (
            experts[f"{module}.lora_B"][1] @ experts[f"{module}.lora_A"][1]
        )
        want = delta_of(family["adapters"][1], f"{module}.weight") + delta_of(
            family["adapters"][2], f"{module}.weight"
        )
        torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


def test_pattern_allocations_are_capped_at_the_adapter_count(tmp_path: Path, family: dict[str, Any]) -> None:
    merge(tmp_path, _recipe(family, "{allocation: 1-2-3-4, router: random}", data=False))
    config = json.loads((tmp_path / "out" / "mola" / "mola_config.json").read_text())
    assert config["allocation"] == {"requested": "1-2-3-4", "per_layer": [1, 2, 3, 3]}
    assert config["parameters"] == sum(
        count * (2 * (inp + out) + inp)
        for layer, count in enumerate([1, 2, 3, 3])
        for out, inp in ((HIDDEN, HIDDEN), (16, HIDDEN), (HIDDEN, INTER))
    )


def test_collapse_without_data_adds_the_mean_of_the_experts(tmp_path: Path, family: dict[str, Any]) -> None:
    out = merge(
        tmp_path, _recipe(family, "{allocation: uniform, router: random, collapse: true}", data=False)
    )
    assert not (tmp_path / "out" / "mola").exists()
    base = load_dir(family["base"])
    for layer in range(LAYERS):
        for module in MODULES:
            name = f"model.layers.{layer}.{module}.weight"
            want = base[name] + sum(delta_of(a, name) for a in family["adapters"]) / 3
            torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)


def test_prompt_routers_send_each_tasks_tokens_to_its_expert_most(
    tmp_path: Path, family: dict[str, Any]
) -> None:
    """Router row e points from the mean input to task e's mean input, so task e's tokens give
    expert e the largest mean gate (checked on the inputs of one module, recorded here)."""
    merge(tmp_path, _recipe(family, "{allocation: uniform, top_k: 3, router_scale: 4.0}"))
    experts = load_file(tmp_path / "out" / "mola" / "experts.safetensors")
    module = "model.layers.1.self_attn.q_proj"
    model = transformers.LlamaForCausalLM.from_pretrained(family["base"]).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(module).register_forward_pre_hook(lambda m, i: seen.append(i[0][0]))
    for e, text in enumerate(family["texts"]):
        ids = torch.tensor([int(w[1:]) for w in text.read_text().split()][: 8 * 25]).reshape(25, 8)
        seen.clear()
        with torch.no_grad():
            model(input_ids=ids)
        x = torch.cat([s.reshape(-1, HIDDEN) for s in seen]).double()
        probs = torch.softmax(x @ experts[f"{module}.router"].double().T, dim=-1).mean(dim=0)
        assert int(probs.argmax()) == e


def test_routers_from_prompts_need_each_adapters_data(tmp_path: Path, family: dict[str, Any]) -> None:
    with pytest.raises(
        RecipeError, match=r"router 'prompts' needs each adapter's task prompts; models\[0\] has no 'data'"
    ):
        merge(tmp_path, _recipe(family, "{allocation: uniform}", data=False))


def test_a_model_that_is_not_an_adapter_is_refused(tmp_path: Path, family: dict[str, Any]) -> None:
    recipe = (
        f"method: lora_experts\nbase: {q(family['base'])}\n"
        f"models: [{q(family['base'])}]\nparameters: {{router: random}}\n"
    )
    with pytest.raises(RecipeError, match=r"models\[0\] .* is not one LoRA adapter"):
        merge(tmp_path, recipe)
    assert not (tmp_path / "out").exists()


def test_trained_routers_lower_the_loss_on_the_prompts(tmp_path: Path, family: dict[str, Any]) -> None:
    merge(
        tmp_path,
        _recipe(
            family, "{allocation: uniform, top_k: 2, router: trained, router_steps: 30, router_lr: 0.05}"
        ),
        name="trained",
    )
    merge(tmp_path, _recipe(family, "{allocation: uniform, top_k: 2}"), name="prompts")
    losses = {}
    for name in ("prompts", "trained"):
        model = load_mola(tmp_path / name)
        total = 0.0
        for text in family["texts"]:
            ids = torch.tensor([int(w[1:]) for w in text.read_text().split()][: 8 * 25]).reshape(25, 8)
            with torch.no_grad():
                total += float(model(input_ids=ids, labels=ids).loss)
        losses[name] = total
    a = load_file(tmp_path / "prompts" / "mola" / "experts.safetensors")
    b = load_file(tmp_path / "trained" / "mola" / "experts.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(".router"))  # experts frozen
    assert losses["trained"] < losses["prompts"] - 1e-3, losses


def test_router_training_with_top_1_is_refused(tmp_path: Path, family: dict[str, Any]) -> None:
    with pytest.raises(RecipeError, match="router 'trained' needs top_k >= 2"):
        merge(tmp_path, _recipe(family, "{top_k: 1, router: trained}"))


# --------------------------------------------------------------------------------------------------
# MoLA training
# --------------------------------------------------------------------------------------------------


def test_load_balancing_loss_is_one_when_routing_is_uniform() -> None:
    from workbench.lora.mola_train import load_balancing_loss

    experts, tokens = 4, 8
    probs = torch.full((tokens, experts), 1 / experts)
    chosen = torch.zeros(tokens, experts, dtype=torch.bool)
    for t in range(tokens):  # top-2, every expert chosen equally often
        chosen[t, [t % experts, (t + 1) % experts]] = True
    assert float(load_balancing_loss(probs, chosen)) == pytest.approx(1.0)
    skewed = torch.zeros(tokens, experts)
    skewed[:, 0] = 1.0
    assert float(load_balancing_loss(skewed, skewed > 0)) == pytest.approx(experts)  # all on one expert: E


def _text_batches(family: dict[str, Any]) -> Any:
    from itertools import cycle

    rows = [
        torch.tensor([int(w[1:]) for w in text.read_text().split()][: 8 * 25]).reshape(25, 8)
        for text in family["texts"]
    ]
    return cycle([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows])


def test_fresh_experts_start_at_the_base_and_count_as_the_allocation_says(family: dict[str, Any]) -> None:
    from workbench.lora.mola_train import new_experts

    model = transformers.LlamaForCausalLM.from_pretrained(family["base"]).eval()
    expected = _logits(model, IDS)
    experts = new_experts(
        model, [1, 2, 2, 3], rank=4, alpha=8, top_k=2, targets=("q_proj", "down_proj"), seed=0
    )
    wrap(model, experts)
    assert torch.equal(_logits(model, IDS), expected)  # B = 0
    assert {name: e.count for name, e in experts.items()} == {
        f"model.layers.{layer}.{m}": c
        for layer, c in enumerate([1, 2, 2, 3])
        for m in ("self_attn.q_proj", "mlp.down_proj")
    }
    per_expert = (
        4 * (HIDDEN + HIDDEN) + HIDDEN + 4 * (INTER + HIDDEN) + INTER
    )  # q_proj and down_proj: A, B and a router row
    assert sum(e.a.numel() + e.b.numel() + e.router.numel() for e in experts.values()) == per_expert * (
        1 + 2 + 2 + 3
    )


@pytest.mark.parametrize("aux_loss", [0.0, 0.01])
def test_training_lowers_the_loss_and_writes_a_folder_that_runs(
    tmp_path: Path, family: dict[str, Any], aux_loss: float
) -> None:
    from workbench.lora.mola_train import train_mola

    result = train_mola(
        family["base"],
        tmp_path / "mola",
        _text_batches(family),
        "1-2",
        steps=40,
        lr=1e-2,
        rank=4,
        top_k=2,
        aux_loss=aux_loss,
        seed=1,
    )
    assert result.experts_per_layer == [1, 1, 2, 2]
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    config = json.loads((tmp_path / "mola" / "mola" / "mola_config.json").read_text())
    assert config["allocation"]["per_layer"] == [1, 1, 2, 2] and config["parameters"] == result.parameters
    model = load_mola(tmp_path / "mola")
    batch = next(_text_batches(family))
    with torch.no_grad():
        trained_loss = float(model(**batch).loss)
        base_loss = float(transformers.LlamaForCausalLM.from_pretrained(family["base"]).eval()(**batch).loss)
    assert trained_loss < base_loss
    with pytest.raises(RecipeError, match="exists; choose another folder"):
        train_mola(family["base"], tmp_path / "mola", _text_batches(family), "1-2", steps=1)


def test_magnitude_allocation_counts_the_adapters_that_change_a_layer_enough(
    tmp_path: Path, family: dict[str, Any]
) -> None:
    merge(
        tmp_path, _recipe(family, "{allocation: magnitude, magnitude_share: 0.6, router: random}", data=False)
    )
    change = np.array(
        [
            [
                sum(
                    float(np.linalg.norm(delta_of(a, f"model.layers.{layer}.{m}.weight").double().numpy()))
                    for m in MODULES
                )
                for layer in range(LAYERS)
            ]
            for a in family["adapters"]
        ]
    )
    want = [max(1, int((change[:, layer] >= 0.6 * change.max(axis=1)).sum())) for layer in range(LAYERS)]
    config = json.loads((tmp_path / "out" / "mola" / "mola_config.json").read_text())
    assert config["allocation"]["per_layer"] == want and want != [3] * LAYERS
