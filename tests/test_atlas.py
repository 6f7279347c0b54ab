"""``atlas``: learned per-block task-vector coefficients (aTLAS) and the entropy objective (AdaMerging).

Expected values are computed here from the saved tensors (task arithmetic by hand, cross-entropy
over a grid of λ with transformers, entropies with plain torch), never by the method's code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from merging import add_word_tokenizer, load_dir, merge, q, word_text
from safetensors.torch import load_file, save_file

from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.recipe.schema import load_recipe

VOCAB = 24


def _config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )


def _fine_tune(base: Path, folder: Path, change: dict[str, torch.Tensor]) -> Path:
    """A copy of ``base`` with ``change`` added to some of its tensors."""
    tensors = load_file(base / "model.safetensors")
    folder.mkdir()
    save_file(
        {name: (t + change[name] if name in change else t).contiguous() for name, t in tensors.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text((base / "config.json").read_text())
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny float32 Llama with a word tokenizer, two fine-tunes changing every tensor, and a text."""
    root = tmp_path_factory.mktemp("atlas")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config()).save_pretrained(root / "base")
    add_word_tokenizer(root / "base", VOCAB)
    weights = load_file(root / "base" / "model.safetensors")
    fine_tunes = []
    for index in range(2):
        g = torch.Generator().manual_seed(100 + index)
        fine_tunes.append(
            _fine_tune(
                root / "base",
                root / f"ft{index}",
                {n: 0.05 * torch.randn(t.shape, generator=g) for n, t in weights.items()},
            )
        )
    text = root / "text.txt"
    word_text(text, VOCAB, words=600)
    return {"root": root, "base": root / "base", "fts": fine_tunes, "text": text, "weights": weights}


def _recipe(family: dict[str, Any], parameters: str, seed: int = 0, extra: str = "", tasks: int = 2) -> str:
    data = f"{{text: {q(family['text'])}, seq_len: 12}}"
    models = "\n".join(
        f"  - model: {q(ft)}\n    parameters: {{data: {data}}}" for ft in family["fts"][:tasks]
    )
    return (
        f"method: atlas\nbase: {q(family['base'])}\nseed: {seed}\n"
        f"models:\n{models}\nparameters: {parameters}\n{extra}"
    )


def _table(out: Path) -> dict[str, Any]:
    return json.loads((out / "coefficients" / "coefficients.json").read_text())


def test_learning_rate_zero_is_task_arithmetic_at_the_initial_lambda(
    tmp_path: Path, family: dict[str, Any]
) -> None:
    out = merge(tmp_path, _recipe(family, "{init: 0.4, lr: 0.0, steps: 3, batch_size: 4}"))
    fts = [load_dir(ft) for ft in family["fts"]]
    for name, base in family["weights"].items():
        expected = base + 0.4 * (fts[0][name] - base) + 0.4 * (fts[1][name] - base)
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6, msg=name)
    table = _table(tmp_path / "out")
    assert {v for rows in table["values"] for block in rows for v in block} == {0.4}
    ta = merge(
        tmp_path,
        f"method: task_arithmetic\nbase: {q(family['base'])}\n"
        f"models: [{q(family['fts'][0])}, {q(family['fts'][1])}]\nparameters: {{lambda: 0.4}}\n",
        "ta",
    )
    assert all(torch.equal(out[n], ta[n]) for n in out), (
        "atlas at lr 0 must compute task arithmetic exactly as that method does"
    )


def test_the_written_coefficients_reproduce_the_merge_as_task_arithmetic(
    tmp_path: Path, family: dict[str, Any]
) -> None:
    out = merge(tmp_path, _recipe(family, "{init: 0.3, lr: 0.05, steps: 4, batch_size: 4, holdout: 0}"))
    folder = tmp_path / "out" / "coefficients"
    table = _table(tmp_path / "out")
    values = {v for rows in table["values"] for block in rows for v in block}
    assert len(values) > 10, "the coefficients were not learned"
    weights = [json.loads((folder / f"weights.model{i}.json").read_text()) for i in range(2)]
    fts = [load_dir(ft) for ft in family["fts"]]
    for name, base in family["weights"].items():  # base + Σ λ_t(tensor) τ_t, from the files alone
        expected = base + weights[0][name] * (fts[0][name] - base) + weights[1][name] * (fts[1][name] - base)
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6, msg=name)
    rerun = run_recipe(load_recipe(folder / "task_arithmetic.yaml"), out=tmp_path / "again")
    again = load_dir(rerun.out_dir)
    assert all(torch.equal(out[n], again[n]) for n in out)
    rows = (folder / "coefficients.csv").read_text().splitlines()
    assert rows[0] == "model,block,partition,lambda" and len(rows) == 1 + 2 * len(table["blocks"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory, family: dict[str, Any]) -> dict[str, Any]:
    """One task vector that changes only the output head, and text sampled from base + 0.6 τ."""
    root = tmp_path_factory.mktemp("atlas-toy")
    head = family["weights"]["lm_head.weight"]
    tau = 3.0 * torch.randn(head.shape, generator=torch.Generator().manual_seed(7))
    ft = _fine_tune(family["base"], root / "ft", {"lm_head.weight": tau})
    model = transformers.LlamaForCausalLM.from_pretrained(family["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.copy_(head + 0.6 * tau)
        torch.manual_seed(3)
        starts = torch.randint(0, VOCAB, (96, 1))
        rows = model.generate(
            starts,
            attention_mask=torch.ones_like(starts),
            do_sample=True,
            top_k=0,
            max_new_tokens=15,
            min_new_tokens=15,
            pad_token_id=None,
            eos_token_id=None,
        )
    assert rows.shape == (96, 16)
    text = root / "sampled.txt"
    text.write_text(" ".join(f"w{i}" for i in rows.flatten().tolist()))
    # The cross-entropy of those sequences as a function of λ, on a fine grid (the optimum to recover).
    grid = torch.arange(0.0, 1.5001, 0.005)
    losses = []
    with torch.no_grad():
        for lam in grid:
            model.lm_head.weight.copy_(head + lam * tau)
            logits = model(rows).logits[:, :-1]
            losses.append(
                float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), rows[:, 1:].reshape(-1)))
            )
    return {"ft": ft, "text": text, "best": float(grid[int(torch.tensor(losses).argmin())])}


def test_a_known_best_coefficient_is_recovered(
    tmp_path: Path, family: dict[str, Any], toy: dict[str, Any]
) -> None:
    assert abs(toy["best"] - 0.6) < 0.15, "the sample should put the optimum near the λ it was drawn with"
    recipe = (
        f"method: atlas\nbase: {q(family['base'])}\nmodels:\n  - model: {q(toy['ft'])}\n"
        f"    parameters: {{data: {{text: {q(toy['text'])}, seq_len: 16}}}}\n"
        "parameters: {blocks: model, steps: 150, lr: 0.01, "
        "weight_decay: 0.0, batch_size: 96, holdout: 0.0, samples: 96}\n"
    )
    merge(tmp_path, recipe)
    [[[learned]]] = _table(tmp_path / "out")["values"]
    assert learned == pytest.approx(toy["best"], abs=0.02)


def test_a_fixed_seed_gives_the_same_coefficients_and_the_best_held_out_step_is_kept(
    tmp_path: Path, family: dict[str, Any]
) -> None:
    parameters = "{steps: 12, lr: 0.05, batch_size: 4, eval_every: 3, holdout: 0.25, blocks: layer}"
    first = merge(tmp_path, _recipe(family, parameters, seed=5), "a")
    second = merge(tmp_path, _recipe(family, parameters, seed=5), "b")
    merge(tmp_path, _recipe(family, parameters, seed=6), "c")
    assert _table(tmp_path / "a") == _table(tmp_path / "b")
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert _table(tmp_path / "a")["values"] != _table(tmp_path / "c")["values"], (
        "another seed draws other batches"
    )
    training = json.loads((tmp_path / "a" / "coefficients" / "training.json").read_text())
    held_out = {int(r["step"]): r["held_out_loss"] for r in training["history"]}
    assert sorted(held_out) == [0, 3, 6, 9, 12]
    assert training["best_step"] == min(held_out, key=lambda s: (held_out[s], s))
    assert training["sequences"] == {
        "training": [38, 38],
        "held_out": [12, 12],
    }  # 600 words / 12 = 50 rows, 25% held out


def test_layer_and_module_blocks_share_one_coefficient(tmp_path: Path, family: dict[str, Any]) -> None:
    out = merge(tmp_path, _recipe(family, "{blocks: module, steps: 4, lr: 0.05, batch_size: 4}"))
    table = _table(tmp_path / "out")
    assert table["tensor_blocks"]["model.layers.1.self_attn.q_proj.weight"] == "self_attn.q_proj.weight"
    assert table["tensor_blocks"]["lm_head.weight"] == "lm_head.weight"
    assert len(table["blocks"]) == 9 + 3  # nine modules per layer, embeddings, final norm, head
    fts, base = [load_dir(ft) for ft in family["fts"]], family["weights"]
    for layer in range(2):  # both layers' q_proj moved by the same λ_t
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        [l0], [l1] = (table["values"][t][table["blocks"].index("self_attn.q_proj.weight")] for t in range(2))
        expected = base[name] + l0 * (fts[0][name] - base[name]) + l1 * (fts[1][name] - base[name])
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
    merge(tmp_path, _recipe(family, "{blocks: layer, steps: 1, batch_size: 4}"), "layers")
    layer_table = _table(tmp_path / "layers")
    assert layer_table["tensor_blocks"]["model.layers.0.mlp.up_proj.weight"] == "layers.0"
    assert len(layer_table["blocks"]) == 2 + 3


def test_partitions_give_each_element_one_of_k_coefficients(tmp_path: Path, family: dict[str, Any]) -> None:
    out = merge(
        tmp_path, _recipe(family, "{partitions: 3, steps: 6, lr: 0.05, batch_size: 4, holdout: 0}", tasks=1)
    )
    # One task vector: (out - base) / τ is the λ of the element's group.
    table = _table(tmp_path / "out")
    assert not (tmp_path / "out" / "coefficients" / "weights.model0.json").exists(), (
        "partitioned coefficients are not per tensor"
    )
    ft, base = load_dir(family["fts"][0]), family["weights"]
    name = "model.layers.1.mlp.down_proj.weight"
    lambdas = torch.tensor(table["values"][0][table["blocks"].index(name)])
    assert len(set(lambdas.tolist())) == 3
    ratio = (out[name] - base[name]) / (ft[name] - base[name])
    nearest = (ratio.reshape(-1, 1) - lambdas).abs().min(dim=1)
    assert float(nearest.values.max()) < 1e-4
    shares = torch.bincount(nearest.indices, minlength=3) / nearest.indices.numel()
    assert float(shares.min()) > 0.25, f"the groups should be about a third each: {shares.tolist()}"


def test_untrained_tensors_keep_the_initial_coefficient(tmp_path: Path, family: dict[str, Any]) -> None:
    out = merge(
        tmp_path,
        _recipe(family, "{trained: ['*mlp*'], init: 0.5, steps: 4, lr: 0.1, batch_size: 4, holdout: 0}"),
    )
    table = _table(tmp_path / "out")
    assert table["tensor_blocks"]["model.layers.0.self_attn.v_proj.weight"] == "(not trained)"
    assert table["values"][0][table["blocks"].index("(not trained)")] == [0.5]
    assert table["values"][0][table["blocks"].index("model.layers.0.mlp.up_proj.weight")] != [0.5]
    fts, base = [load_dir(ft) for ft in family["fts"]], family["weights"]
    name = "model.layers.0.self_attn.v_proj.weight"
    torch.testing.assert_close(
        out[name],
        base[name] + 0.5 * (fts[0][name] - base[name]) + 0.5 * (fts[1][name] - base[name]),
        rtol=0,
        atol=1e-6,
    )


def test_the_entropy_objective_reads_answer_starts_or_every_token_and_never_label_values() -> None:
    from workbench_plugins.methods.atlas.training import objective_terms

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)  # [2, 5], at the positions that predict tokens 1..5
    prompted = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 3, 4, -100], [-100, 2, 5, 1, 6]]),
    }
    total, count = objective_terms(logits, prompted, "entropy")
    assert count == 2  # row 0 predicts its answer's first token at position 1, row 1 at position 0
    torch.testing.assert_close(total, entropy[0, 1] + entropy[1, 0])
    relabelled = dict(prompted, labels=torch.where(prompted["labels"] >= 0, 0, -100))
    torch.testing.assert_close(objective_terms(logits, relabelled, "entropy")[0], total)
    text = dict(
        prompted, labels=torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, -100, -100]])
    )  # no prompt: every token
    total, count = objective_terms(logits, text, "entropy")
    assert count == 4 + 2
    torch.testing.assert_close(total, entropy[0, :4].sum() + entropy[1, :2].sum())
    unlabelled = {
        "input_ids": prompted["input_ids"],
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    total, count = objective_terms(logits, unlabelled, "entropy")
    assert count == 2 + 4
    torch.testing.assert_close(total, entropy[0, :2].sum() + entropy[1, :4].sum())


def test_the_entropy_objective_learns_without_labels(tmp_path: Path, family: dict[str, Any]) -> None:
    merge(
        tmp_path,
        _recipe(
            family,
            "{objective: entropy, blocks: layer, init: 0.3, steps: 10, lr: 0.05, batch_size: 4, eval_every: 5}",
        ),
    )
    training = json.loads((tmp_path / "out" / "coefficients" / "training.json").read_text())
    losses = [r["held_out_loss"] for r in training["history"]]
    assert training["objective"] == "entropy" and min(losses[1:]) < losses[0], (
        "entropy should fall from the start"
    )


def test_only_the_coefficients_receive_gradients(family: dict[str, Any]) -> None:
    from workbench_plugins.methods.atlas.training import Sequences, Settings, TrainedTensors, learn

    model = transformers.LlamaForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "model.layers.0.mlp.up_proj.weight"
    theta = dict(model.named_parameters())[name].detach()
    tensors = TrainedTensors({name: theta}, {name: torch.randn((1, *theta.shape))}, {name: 0})
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    data = Sequences(ids, torch.ones_like(ids), ids.clone())
    settings = Settings("cross_entropy", 3, 0.1, 0.0, 1.0, 4, 1, 0)
    result = learn(model, tensors, torch.zeros(1, 1, 1), [data], None, settings, lambda text: None)
    assert float(result.lam.abs().sum()) > 0
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


def test_a_recipe_over_the_memory_limit_is_refused_with_the_estimate(
    tmp_path: Path, family: dict[str, Any]
) -> None:
    with pytest.raises(
        RecipeError,
        match=(
            r"method 'atlas' would hold about 0\.21 GB \(the base model \([\d,]+ "
            r"parameters\) and 2 task vector\(s\).*more than memory_limit \(0\.00 GB\)"
        ),
    ):
        merge(tmp_path, _recipe(family, "{steps: 1}", extra="memory_limit: 10KB\n"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_every_model_needs_data(tmp_path: Path, family: dict[str, Any]) -> None:
    recipe = f"method: atlas\nbase: {q(family['base'])}\nmodels: [{q(family['fts'][0])}]\n"
    with pytest.raises(RecipeError, match=r"models\[0\] has no 'data'"):
        merge(tmp_path, recipe)


def test_analyze_draws_the_learned_coefficients(tmp_path: Path, family: dict[str, Any], cli: Any) -> None:
    from workbench.cli.main import main

    merge(tmp_path, _recipe(family, "{blocks: layer, steps: 2, batch_size: 4}"))
    result = cli.invoke(
        main,
        [
            "analyze",
            str(tmp_path / "out"),
            "--png",
            str(tmp_path / "c.png"),
            "--csv",
            str(tmp_path / "c.csv"),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert f"{family['fts'][0]}: learned λ (layer blocks)" in result.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "c.csv").read_text() == (
        tmp_path / "out" / "coefficients" / "coefficients.csv"
    ).read_text()
    missing = cli.invoke(main, ["analyze", str(family["base"])])
    assert missing.exit_code != 0 and "holds no learned coefficients" in missing.output


def test_plan_states_what_learning_holds(tmp_path: Path, family: dict[str, Any], cli: Any) -> None:
    from workbench.cli.main import main

    recipe = tmp_path / "atlas.yaml"
    recipe.write_text(_recipe(family, "{trained: ['*mlp*']}"))
    result = cli.invoke(main, ["plan", str(recipe), "--out", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    total = sum(t.numel() for t in family["weights"].values())
    trained = sum(t.numel() for n, t in family["weights"].items() if ".mlp." in n)
    assert (
        f"the base model ({total:,} parameters) and 2 task vector(s) of {trained:,} trained parameters"
        in result.output
    )
    refused = cli.invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), "--memory-limit", "1KB"])
    assert refused.exit_code != 0 and "more than memory_limit (0.00 GB)" in refused.output
