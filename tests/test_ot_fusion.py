"""ot_fusion: exact recovery of a permuted copy, and the transport primitives.

A′ is A with its residual dimensions, attention heads (key/value groups, and query heads within
groups) and MLP hidden units permuted consistently, so it computes the same function; fusing A
with A′ must give A back, where plain averaging does not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from merging import add_word_tokenizer, load_dir, merge, q, word_text
from safetensors.torch import load_file, save_file

from workbench_plugins.methods.ot_fusion.transport import ground_cost, transport

transformers = pytest.importorskip("transformers")

HEADS, KV, HEAD_DIM, HIDDEN, INTER, LAYERS, VOCAB = 4, 2, 8, 32, 48, 2, 64


def _config() -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HEAD_DIM,
        tie_word_embeddings=False,
    )


def rows(heads: torch.Tensor) -> torch.Tensor:
    """The weight rows of these heads, in this order."""
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])


def permuted(state: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A function-preserving permutation of a Llama state dict; returns it and the residual order."""
    g = torch.Generator().manual_seed(seed)
    resid = torch.randperm(HIDDEN, generator=g)  # new dimension j holds old dimension resid[j]
    out = {}
    for name, w in state.items():
        w = w.clone()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = w[:, resid]
        elif w.ndim == 1:  # every norm acts on the residual stream
            w = w[resid]
        out[name] = w
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        groups = torch.randperm(KV, generator=g)
        query = torch.cat(
            [group * (HEADS // KV) + torch.randperm(HEADS // KV, generator=g) for group in groups]
        )
        hidden = torch.randperm(INTER, generator=g)
        for name, order in (
            ("self_attn.q_proj", rows(query)),
            ("self_attn.k_proj", rows(groups)),
            ("self_attn.v_proj", rows(groups)),
        ):
            out[p + name + ".weight"] = out[p + name + ".weight"][order][:, resid]
        out[p + "self_attn.o_proj.weight"] = out[p + "self_attn.o_proj.weight"][resid][:, rows(query)]
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.gate_proj.weight"][hidden][:, resid]
        out[p + "mlp.up_proj.weight"] = out[p + "mlp.up_proj.weight"][hidden][:, resid]
        out[p + "mlp.down_proj.weight"] = out[p + "mlp.down_proj.weight"][resid][:, hidden]
    return out, resid


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ot")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))  # norms that differ per dimension
    model.save_pretrained(root / "a")
    state = load_file(root / "a" / "model.safetensors")
    other, resid = permuted(state, seed=1)
    (root / "b").mkdir()
    save_file(other, str(root / "b" / "model.safetensors"), metadata={"format": "pt"})
    (root / "b" / "config.json").write_text((root / "a" / "config.json").read_text())
    torch.save(resid, root / "resid.pt")
    return {"a": root / "a", "b": root / "b", "resid": root / "resid.pt"}


def _logits(folder: Path) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 7, 3, 9, 12, 5]])).logits


def test_the_permuted_copy_computes_the_same_function(pair: dict[str, Path]) -> None:
    torch.testing.assert_close(_logits(pair["a"]), _logits(pair["b"]), rtol=1e-4, atol=1e-5)


def test_emd_fusion_of_a_permuted_copy_returns_the_anchor(tmp_path: Path, pair: dict[str, Path]) -> None:
    recipe = f"method: ot_fusion\nmodels: [{q(pair['a'])}, {q(pair['b'])}]\nparameters: {{solver: emd}}\n"
    fused, anchor = merge(tmp_path, recipe), load_dir(pair["a"])
    for name, tensor in anchor.items():
        torch.testing.assert_close(fused[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    average = merge(tmp_path, f"method: linear\nmodels: [{q(pair['a'])}, {q(pair['b'])}]\n", name="average")
    assert max(float((average[n] - anchor[n]).abs().max()) for n in anchor) > 0.05
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(pair["a"]), rtol=1e-4, atol=1e-5)
    # The residual map saved beside the output is the permutation (uniform mass 1/n per match).
    maps = load_file(tmp_path / "out" / "ot_fusion" / "maps.safetensors")
    resid = torch.load(pair["resid"])
    expected = torch.zeros(HIDDEN, HIDDEN)
    expected[torch.arange(HIDDEN), resid] = 1.0 / HIDDEN  # b's dimension i is a's dimension resid[i]
    torch.testing.assert_close(maps["models.1.resid"], expected)
    report = json.loads((tmp_path / "out" / "ot_fusion" / "report.json").read_text())
    assert report["models.1.resid"]["solver"] == "assignment" and report["models.1.resid"][
        "cost"
    ] == pytest.approx(0.0, abs=1e-6)
    assert {f"models.1.layers.{i}.{part}" for i in range(LAYERS) for part in ("heads", "mlp")} <= set(report)


@pytest.fixture(scope="module")
def text_pair(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same pair with a word-level tokenizer (word i is token i) and a text to run them on."""
    import shutil

    root = tmp_path_factory.mktemp("ot_text")
    out = {}
    for key in ("a", "b"):
        shutil.copytree(pair[key], root / key)
        add_word_tokenizer(root / key, VOCAB)
        out[key] = root / key
    word_text(root / "text.txt", VOCAB)
    out["text"] = root / "text.txt"
    return out


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_activation_cost_recovers_the_permutation(
    tmp_path: Path, text_pair: dict[str, Path], solver: str
) -> None:
    params = (
        f"{{solver: {solver}, reg: 0.001, cost: activations, data: "
        f"{{text: {q(text_pair['text'])}, seq_len: 16}}, samples: 12}}"
    )
    fused = merge(
        tmp_path,
        f"method: ot_fusion\nmodels: [{q(text_pair['a'])}, {q(text_pair['b'])}]\nparameters: {params}\n",
    )
    anchor = load_dir(text_pair["a"])
    tolerance = (
        1e-6 if solver == "emd" else 1e-3
    )  # Sinkhorn's plan is soft, nearly a permutation at small reg
    for name, tensor in anchor.items():
        torch.testing.assert_close(fused[name], tensor, rtol=tolerance, atol=tolerance, msg=name)


def test_activation_cost_needs_data(tmp_path: Path, pair: dict[str, Path]) -> None:
    from workbench.errors import RecipeError

    with pytest.raises(RecipeError, match="cost 'activations' needs data"):
        merge(
            tmp_path,
            f"method: ot_fusion\nmodels: [{q(pair['a'])}, {q(pair['b'])}]\nparameters: {{cost: activations}}\n",
        )


def test_fusion_weights_and_a_zero_weight(tmp_path: Path, pair: dict[str, Path]) -> None:
    recipe = (
        f"method: ot_fusion\nmodels:\n  - {q(pair['a'])}\n  - model: {q(pair['b'])}\n"
        f"    parameters: {{weight: 0.0}}\nparameters: {{solver: sinkhorn}}\n"
    )
    fused, anchor = merge(tmp_path, recipe), load_dir(pair["a"])
    assert all(torch.equal(fused[n], anchor[n]) for n in anchor)


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "gpt_neox.embed_in.weight": (16, 8),
                "gpt_neox.layers.0.attention.query_key_value.weight": (24, 8),
            },
            "has none of their token embeddings",
        ),
        (
            {"model.embed_tokens.weight": (16, 8), "model.layers.0.self_attn.rotary.weight": (8, 8)},
            "tensor 'model.layers.0.self_attn.rotary.weight' has no place in the llama layout",
        ),
    ],
)
def test_unsupported_layouts_are_refused_by_name(
    tmp_path: Path, tensors: dict[str, tuple[int, int]], message: str
) -> None:
    from workbench.errors import RecipeError

    folders = []
    for name in ("x", "y"):
        folder = tmp_path / name
        folder.mkdir()
        save_file(
            {key: torch.randn(shape) for key, shape in tensors.items()}, str(folder / "model.safetensors")
        )
        (folder / "config.json").write_text(
            json.dumps({"num_attention_heads": 2, "num_hidden_layers": 1, "hidden_size": 8})
        )
        folders.append(folder)
    with pytest.raises(RecipeError, match=re.escape(message)):
        merge(tmp_path, f"method: ot_fusion\nmodels: [{q(folders[0])}, {q(folders[1])}]\n")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Transport primitives
# --------------------------------------------------------------------------------------------------


def test_ground_cost_is_max_normalised_distance_of_unit_rows() -> None:
    a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 5.0], [1.0, 1.0]])
    unit = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [2**-0.5, 2**-0.5]])
    distances = np.linalg.norm(unit[0][:, None, :] - unit[1][None, :, :], axis=2)
    np.testing.assert_allclose(ground_cost(a, b), distances / distances.max())


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_plans_meet_their_marginals(solver: str) -> None:
    rng = np.random.default_rng(0)
    cost = rng.random((5, 7))
    plan = transport(cost, solver, reg=0.05).plan  # type: ignore[arg-type]
    np.testing.assert_allclose(plan.sum(axis=1), np.full(5, 1 / 5), atol=1e-6)
    np.testing.assert_allclose(plan.sum(axis=0), np.full(7, 1 / 7), atol=1e-6)


def test_square_emd_is_the_permutation_and_large_reg_spreads_mass() -> None:
    points = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    plan = transport(ground_cost(points[order], points), "emd")
    expected = np.zeros((6, 6))
    expected[np.arange(6), order.numpy()] = 1 / 6
    np.testing.assert_allclose(plan.plan, expected)
    assert plan.solver == "assignment"
    torch.testing.assert_close(plan.barycentric, torch.from_numpy(expected * 6).float())
    spread = transport(ground_cost(points[order], points), "sinkhorn", reg=1e4).plan
    np.testing.assert_allclose(spread, np.full((6, 6), 1 / 36), atol=1e-5)


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_heterogeneous_fusion_takes_the_anchors_widths_and_runs(
    tmp_path: Path, text_pair: dict[str, Path], cost: str
) -> None:
    """A narrower model (hidden 24, intermediate 40) fused into the anchor (hidden 32, intermediate 48)."""
    import shutil

    torch.manual_seed(3)
    config = _config()
    config.hidden_size, config.intermediate_size = 24, 40
    narrow = tmp_path / "narrow"
    transformers.LlamaForCausalLM(config).save_pretrained(narrow)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (text_pair["a"] / name).is_file():
            shutil.copy(text_pair["a"] / name, narrow / name)
    params = (
        f"{{solver: emd, cost: {cost}, data: {{text: {q(text_pair['text'])}, seq_len: 16}}, samples: 12}}"
    )
    fused = merge(
        tmp_path, f"method: ot_fusion\nmodels: [{q(text_pair['a'])}, {q(narrow)}]\nparameters: {params}\n"
    )
    anchor = load_dir(text_pair["a"])
    assert {n: tuple(t.shape) for n, t in fused.items()} == {
        n: tuple(t.shape) for n, t in anchor.items()
    }  # no extra file read as weights
    assert any(not torch.equal(fused[n], anchor[n]) for n in anchor)
    maps = load_file(tmp_path / "out" / "ot_fusion" / "maps.safetensors")
    assert tuple(maps["models.1.resid"].shape) == (24, 32) and tuple(maps["models.1.layers.0.mlp"].shape) == (
        40,
        48,
    )
    torch.testing.assert_close(
        maps["models.1.resid"].sum(0), torch.full((32,), 1 / 32)
    )  # the anchor's marginal
    logits = _logits(tmp_path / "out")
    assert logits.shape == (1, 6, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("anchor", [0, 2])
def test_three_models_and_the_anchor_choice(tmp_path: Path, pair: dict[str, Path], anchor: int) -> None:
    """A, A′ and A″ (two permutations of A) with unequal weights: every one aligns to the anchor's
    basis, so the fusion is the anchor's weights (the anchor being A″ when anchor = 2)."""
    third = tmp_path / "c"
    third.mkdir()
    save_file(
        permuted(load_file(pair["a"] / "model.safetensors"), seed=7)[0],
        str(third / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (third / "config.json").write_text((pair["a"] / "config.json").read_text())
    models = f"[{{model: {q(pair['a'])}, parameters: {{weight: 2}}}}, {q(pair['b'])}, {q(third)}]"
    fused = merge(
        tmp_path, f"method: ot_fusion\nmodels: {models}\nparameters: {{solver: emd, anchor: {anchor}}}\n"
    )
    expected = load_dir(pair["a"] if anchor == 0 else third)
    for name, tensor in expected.items():
        torch.testing.assert_close(fused[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------
# Residual policies
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, cost",
    [
        ("only_resid", "weights"),
        ("no_resid", "weights"),
        ("mean", "weights"),
        ("mean", "activations"),
        ("weighted_scalar", "activations"),
        ("weighted_matrix", "activations"),
    ],
)
def test_every_residual_policy_returns_the_anchor_for_a_permuted_copy(
    tmp_path: Path, text_pair: dict[str, Path], policy: str, cost: str
) -> None:
    """Every branch and join map of a permuted copy is the same permutation, so each policy is exact."""
    params = (
        f"{{solver: emd, resid_policy: {policy}, cost: {cost}, data: "
        f"{{text: {q(text_pair['text'])}, seq_len: 16}}, samples: 12}}"
    )
    fused = merge(
        tmp_path,
        f"method: ot_fusion\nmodels: [{q(text_pair['a'])}, {q(text_pair['b'])}]\nparameters: {params}\n",
    )
    for name, tensor in load_dir(text_pair["a"]).items():
        torch.testing.assert_close(fused[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    report = json.loads((tmp_path / "out" / "ot_fusion" / "report.json").read_text())
    assert report["models.1.layers.1.mlp_out"]["cost"] == pytest.approx(0.0, abs=1e-6)
    assert report["models.1.layers.1.resid_out"]["solver"] == (
        "assignment" if policy in ("only_resid", "no_resid") else policy
    )


@pytest.fixture(scope="module")
def strangers(text_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The anchor and an independently initialised model of the same shape (no permutation relates them)."""
    root = tmp_path_factory.mktemp("ot_strangers")
    torch.manual_seed(9)
    transformers.LlamaForCausalLM(_config()).save_pretrained(root / "c")
    add_word_tokenizer(root / "c", VOCAB)
    return {"a": text_pair["a"], "c": root / "c", "text": text_pair["text"]}


def _maps_of(folder: Path) -> dict[str, np.ndarray]:
    return {
        k.removeprefix("models.1."): v.double().numpy()
        for k, v in load_file(folder / "ot_fusion" / "maps.safetensors").items()
    }


def test_mean_and_no_resid_join_the_stream_and_branch_maps(
    tmp_path: Path, strangers: dict[str, Path]
) -> None:
    models = f"[{q(strangers['a'])}, {q(strangers['c'])}]"
    fused = {}
    for policy in ("shared", "mean", "no_resid"):
        fused[policy] = merge(
            tmp_path,
            f"method: ot_fusion\nmodels: {models}\nparameters: {{resid_policy: {policy}}}\n",
            name=policy,
        )
        if policy == "shared":
            continue
        maps = _maps_of(tmp_path / policy)
        stream = maps["resid"]
        for layer in range(LAYERS):
            for branch, joined in (("attn_out", "resid_mid"), ("mlp_out", "resid_out")):
                branch_map = maps[f"layers.{layer}.{branch}"]
                expected = 0.5 * (stream + branch_map) if policy == "mean" else branch_map
                np.testing.assert_allclose(maps[f"layers.{layer}.{joined}"], expected, rtol=1e-5, atol=1e-8)
                stream = maps[f"layers.{layer}.{joined}"]
        assert not np.allclose(maps["layers.0.resid_mid"], maps["resid"], atol=1e-4)  # the join moved the map
    for policy in ("mean", "no_resid"):
        assert any(
            not torch.allclose(fused[policy][n], fused["shared"][n], atol=1e-4) for n in fused["shared"]
        )


def test_weighted_matrix_weighs_each_dimension_by_the_anchors_activations(
    tmp_path: Path, strangers: dict[str, Path]
) -> None:
    """Column j of the joined plan is w_j·T_resid + (1 − w_j)·T_branch, w_j = m_resid / (m_resid + m_branch),
    m the anchor's mean |activation| of residual dimension j (computed here with transformers hooks)."""
    data = f"{{text: {q(strangers['text'])}, seq_len: 16}}"
    recipe = (
        f"method: ot_fusion\nmodels: [{q(strangers['a'])}, {q(strangers['c'])}]\n"
        f"parameters: {{resid_policy: weighted_matrix, cost: activations, data: {data}, samples: 12}}\n"
    )
    merge(tmp_path, recipe)
    ids = torch.tensor([int(word[1:]) for word in strangers["text"].read_text().split()])[: 12 * 16].reshape(
        12, 16
    )
    model = transformers.LlamaForCausalLM.from_pretrained(strangers["a"]).eval()
    seen: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        block = model.model.layers[layer]
        block.self_attn.o_proj.register_forward_hook(lambda m, i, o, k=f"attn{layer}": seen.__setitem__(k, o))
        block.mlp.down_proj.register_forward_hook(lambda m, i, o, k=f"mlp{layer}": seen.__setitem__(k, o))
        block.post_attention_layernorm.register_forward_pre_hook(
            lambda m, i, k=f"mid{layer}": seen.__setitem__(k, i[0])
        )
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    maps = _maps_of(tmp_path / "out")
    stream = maps["resid"]
    for layer in range(LAYERS):
        for branch, joined, resid_acts, branch_acts in (
            ("attn_out", "resid_mid", hidden[layer], seen[f"attn{layer}"]),
            ("mlp_out", "resid_out", seen[f"mid{layer}"], seen[f"mlp{layer}"]),
        ):
            m_resid = resid_acts.abs().mean(dim=(0, 1)).double().numpy()
            m_branch = branch_acts.abs().mean(dim=(0, 1)).double().numpy()
            w = m_resid / (m_resid + m_branch)
            expected = stream * w + maps[f"layers.{layer}.{branch}"] * (1 - w)
            np.testing.assert_allclose(maps[f"layers.{layer}.{joined}"], expected, rtol=1e-4, atol=1e-7)
            stream = maps[f"layers.{layer}.{joined}"]


def test_weighted_policies_need_activations(tmp_path: Path, pair: dict[str, Path]) -> None:
    from workbench.errors import RecipeError

    with pytest.raises(
        RecipeError, match="resid_policy 'weighted_scalar' weighs by activations; it needs cost 'activations'"
    ):
        merge(
            tmp_path,
            f"method: ot_fusion\nmodels: [{q(pair['a'])}, {q(pair['b'])}]\n"
            f"parameters: {{resid_policy: weighted_scalar}}\n",
        )
