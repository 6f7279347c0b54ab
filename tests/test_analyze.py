"""``workbench analyze``: change statistics per layer and module, its files, and the swap suggestion.

Models are written here with safetensors (float32, so the expected values are exact up to summation
order) with a known change in known cells. Every expected value is computed with plain torch on the
tensors as written: norms, means, and ``torch.topk`` for the top-fraction threshold.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from workbench.analysis import deltas as analyze_module
from workbench.analysis.deltas import analyze, suggest_swap
from workbench.cli.main import main
from workbench.errors import CheckpointError, WorkbenchError

WIDE = {"COLUMNS": "200"}
Tensors = dict[str, torch.Tensor]
Cell = tuple[int, str]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def write_checkpoint(directory: Path, tensors: Tensors, layers: int) -> Path:
    directory.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers}
        )
    )
    return directory


def layer_names(layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (column label, shape) of one small Llama-style layer, weight and bias of q_proj sharing a cell."""
    p = f"model.layers.{layer}."
    return {
        p + "input_layernorm.weight": ("input_layernorm", (8,)),
        p + "self_attn.q_proj.weight": ("q_proj", (8, 8)),
        p + "self_attn.q_proj.bias": ("q_proj", (8,)),
        p + "mlp.down_proj.weight": ("down_proj", (8, 12)),
    }


def make_base(layers: int, seed: int = 0) -> tuple[Tensors, dict[str, Cell]]:
    """Random weights for ``layers`` layers plus an embedding; the cell of every layer tensor."""
    gen = torch.Generator().manual_seed(seed)
    tensors: Tensors = {"model.embed_tokens.weight": torch.randn(16, 8, generator=gen)}
    cells: dict[str, Cell] = {}
    for layer in range(layers):
        for name, (module, shape) in layer_names(layer).items():
            tensors[name] = torch.randn(shape, generator=gen)
            cells[name] = (layer, module)
    tensors["lm_head.weight"] = torch.randn(16, 8, generator=gen)
    return tensors, cells


def changed(base: Tensors, cells: dict[str, Cell], scale_of: dict[int, float], seed: int = 1) -> Tensors:
    """The base plus noise of std ``scale_of[layer]`` in those layers (others unchanged)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        scale = scale_of.get(cells[name][0], 0.0) if name in cells else 0.0
        out[name] = tensor + scale * torch.randn(tensor.shape, generator=gen) if scale else tensor.clone()
    return out


def expected(
    base: Tensors, model: Tensors, cells: dict[str, Cell], fraction: float
) -> dict[Cell, dict[str, float]]:
    """Every statistic of every cell, from the tensors alone."""
    deltas = {name: model[name] - base[name] for name in cells}
    magnitudes = torch.cat([d.abs().reshape(-1) for d in deltas.values()])
    k = max(1, math.floor(fraction * magnitudes.numel()))
    threshold = float(torch.topk(magnitudes, k).values[-1])
    in_top = {name: ((d.abs() >= threshold) & (d != 0)).sum().item() for name, d in deltas.items()}
    total_top = sum(in_top.values())
    out: dict[Cell, dict[str, float]] = {}
    for cell in set(cells.values()):
        names = [n for n in cells if cells[n] == cell]
        delta = torch.cat([deltas[n].reshape(-1) for n in names]).double()
        weights = torch.cat([base[n].reshape(-1) for n in names]).double()
        top = sum(in_top[n] for n in names)
        out[cell] = {
            "mean_abs": float(delta.abs().mean()),
            "relative": float(delta.norm() / weights.norm()),
            "top_share": top / total_top if total_top else 0.0,
            "count": delta.numel(),
        }
    return out


def cell_values(change: analyze_module.ModelChange) -> dict[Cell, dict[str, float]]:
    return {
        cell: {
            "mean_abs": s.mean_abs,
            "relative": s.relative,
            "top_share": s.top_share(change.top_total),
            "count": s.count,
        }
        for cell, s in change.cells.items()
    }


def assert_cells_match(got: dict[Cell, dict[str, float]], want: dict[Cell, dict[str, float]]) -> None:
    assert set(got) == set(want)
    for cell, values in want.items():
        for stat, value in values.items():
            assert got[cell][stat] == pytest.approx(value, rel=1e-6, abs=1e-12), (cell, stat)


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, ["analyze", *map(str, args)], env=WIDE)


def assert_failed(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    flat = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in {flat!r}"


@pytest.fixture
def known(tmp_path: Path) -> dict[str, object]:
    """A 4-layer base and a model changed a little in layer 0 and a lot in layer 2's q_proj."""
    base, cells = make_base(4)
    model = changed(base, cells, {0: 0.01})
    model["model.layers.2.self_attn.q_proj.weight"] = base["model.layers.2.self_attn.q_proj.weight"] + 0.5
    model["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] * 1.1
    return {
        "base": base,
        "model": model,
        "cells": cells,
        "base_path": write_checkpoint(tmp_path / "base", base, 4),
        "model_path": write_checkpoint(tmp_path / "model", model, 4),
    }


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.05, 1.0])
def test_statistics_match_plain_torch(known: dict, fraction: float) -> None:
    analysis = analyze(str(known["base_path"]), [str(known["model_path"])], top_fraction=fraction)
    assert analysis.layer_count == 4
    assert analysis.modules == ["q_proj", "down_proj", "input_layernorm"]
    change = analysis.models[0]
    want = expected(known["base"], known["model"], known["cells"], fraction)
    assert_cells_match(cell_values(change), want)
    # Unchanged layers are exactly zero; the q_proj of layer 2 holds the 1% most-changed entries.
    for layer in (1, 3):
        assert all(
            change.cells[layer, module].sum_abs == 0 and change.cells[layer, module].top_count == 0
            for module in analysis.modules
        )
    if fraction == 0.01:
        assert want[2, "q_proj"]["top_share"] == 1.0
    embed = change.non_layer["model.embed_tokens.weight"]
    assert embed.relative == pytest.approx(0.1, rel=1e-5)
    assert change.non_layer["lm_head.weight"].relative == 0.0


def test_row_blocks_give_the_same_statistics(known: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors read in many small row blocks (as large ones are) give the same sums and threshold."""
    whole = analyze(str(known["base_path"]), [str(known["model_path"])])
    monkeypatch.setattr(analyze_module, "BLOCK_ELEMENTS", 16)
    blocked = analyze(str(known["base_path"]), [str(known["model_path"])])
    assert blocked.models[0].top_threshold == whole.models[0].top_threshold
    assert_cells_match(cell_values(blocked.models[0]), cell_values(whole.models[0]))


def test_ties_at_the_threshold_all_count(tmp_path: Path) -> None:
    """30 entries share |Δ| = 1 (some negative): 1% of the layer entries is fewer, yet all 30 count."""
    base, cells = make_base(2)
    base["model.layers.0.mlp.down_proj.weight"].view(-1)[:20] = 0.25  # 0.25 ± 1 - 0.25 is exactly ±1
    base["model.layers.1.self_attn.q_proj.weight"].view(-1)[:10] = 0.25
    model = {name: t.clone() for name, t in base.items()}
    model["model.layers.0.mlp.down_proj.weight"].view(-1)[:20] += torch.tensor([1.0, -1.0] * 10)
    model["model.layers.1.self_attn.q_proj.weight"].view(-1)[:10] -= 1.0
    n = sum(base[name].numel() for name in cells)
    assert math.floor(0.01 * n) < 30
    analysis = analyze(
        str(write_checkpoint(tmp_path / "base", base, 2)),
        [str(write_checkpoint(tmp_path / "model", model, 2))],
    )
    change = analysis.models[0]
    assert change.top_threshold == pytest.approx(1.0, rel=1e-6)
    assert change.top_total == 30
    assert change.cells[0, "down_proj"].top_share(30) == pytest.approx(2 / 3)
    assert change.cells[1, "q_proj"].top_share(30) == pytest.approx(1 / 3)
    assert_cells_match(cell_values(change), expected(base, model, cells, 0.01))


def test_no_change_gives_zeros(known: dict) -> None:
    analysis = analyze(str(known["base_path"]), [str(known["base_path"])])
    change = analysis.models[0]
    assert change.top_total == 0 and change.top_threshold == 0.0
    for stats in [*change.cells.values(), *change.non_layer.values()]:
        assert (stats.mean_abs, stats.relative, stats.top_share(change.top_total)) == (0.0, 0.0, 0.0)
    with pytest.raises(WorkbenchError, match="does not differ from the base"):
        suggest_swap(
            analyze(str(known["base_path"]), [str(known["model_path"]), str(known["base_path"])]), "1", "2"
        )


def test_layer_1_is_not_layer_11(tmp_path: Path) -> None:
    base, cells = make_base(12)
    model = changed(base, cells, {11: 0.1})
    analysis = analyze(
        str(write_checkpoint(tmp_path / "base", base, 12)),
        [str(write_checkpoint(tmp_path / "model", model, 12))],
    )
    change = analysis.models[0]
    totals = change.layer_totals(analysis.layer_count)
    assert analysis.layer_count == 12
    assert totals[1].relative == 0.0 and totals[1].top_count == 0 and totals[1].sum_abs == 0.0
    assert totals[11].relative > 0 and totals[11].top_share(change.top_total) == 1.0
    assert all(totals[layer].relative == 0.0 for layer in range(11))


def test_the_tiny_family_in_bf16(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    """Llama-shaped bf16 models: nine columns in layer order; one cell checked against plain torch."""
    result = invoke(
        tiny_family["base"], tiny_family["ft1"], tiny_family["ft2"], "--json", tmp_path / "a.json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["layer_count"] == 4
    assert data["modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    ]
    name = "model.layers.3.mlp.up_proj.weight"
    base = next(
        load_file(str(f))[name]
        for f in tiny_family["base"].glob("*.safetensors")
        if name in load_file(str(f))
    ).float()
    tuned = next(
        load_file(str(f))[name] for f in tiny_family["ft2"].glob("*.safetensors") if name in load_file(str(f))
    ).float()
    cell = next(c for c in data["models"][1]["cells"] if (c["layer"], c["module"]) == (3, "up_proj"))
    assert cell["relative"] == pytest.approx(
        float((tuned - base).double().norm() / base.double().norm()), rel=1e-6
    )
    assert cell["mean_abs"] == pytest.approx(float((tuned - base).abs().double().mean()), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_missing_path(known: dict, tmp_path: Path) -> None:
    assert_failed(
        invoke(known["base_path"], tmp_path / "nowhere"),
        "model 1:",
        str(tmp_path / "nowhere"),
        "does not exist",
    )
    assert_failed(invoke(tmp_path / "nowhere", known["model_path"]), "base:", "does not exist")


def test_shape_mismatch_names_the_tensor(known: dict, tmp_path: Path) -> None:
    other = dict(known["model"])
    other["model.layers.1.mlp.down_proj.weight"] = torch.zeros(8, 10)
    path = write_checkpoint(tmp_path / "other", other, 4)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.weight' has shape \[8, 10\].*\[8, 12\]",
    ):
        analyze(str(known["base_path"]), [str(path)])
    assert_failed(
        invoke(known["base_path"], path),
        "model.layers.1.mlp.down_proj.weight",
        str(path / "model.safetensors"),
    )


def test_missing_tensor_and_no_layers(known: dict, tmp_path: Path) -> None:
    fewer = {name: t for name, t in known["model"].items() if name != "lm_head.weight"}
    path = write_checkpoint(tmp_path / "fewer", fewer, 4)
    assert_failed(invoke(known["base_path"], path), "tensor 'lm_head.weight' of the base", "is missing")
    flat = write_checkpoint(tmp_path / "flat", {"model.embed_tokens.weight": torch.ones(4, 4)}, 0)
    assert_failed(invoke(flat, flat), "no tensor belongs to a numbered layer")


def test_bad_options_fail_before_reading(known: dict, tmp_path: Path) -> None:
    assert_failed(
        invoke(known["base_path"], known["model_path"], "--csv", tmp_path / "no" / "a.csv"),
        "folder",
        "does not exist",
    )
    assert_failed(
        invoke(known["base_path"], known["model_path"], "--suggest-swap", "1", "3"),
        "'3' names none of the analysed models",
    )
    assert invoke(known["base_path"], known["model_path"], "--top-fraction", "0").exit_code == 2


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------


def test_terminal_heatmap(known: dict) -> None:
    result = invoke(known["base_path"], known["model_path"], "--stat", "top_share")
    assert result.exit_code == 0, result.output
    assert f"{known['model_path']}: share of the top 0.01 most-changed entries (%)" in result.output
    assert "outside the layers" in result.output and "model.embed_tokens.weight" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.split()[:1] == ["2"]]
    assert rows[0][1] == "100.0"  # layer 2, q_proj: every top entry


def test_csv_and_json(known: dict, tmp_path: Path) -> None:
    result = invoke(
        known["base_path"],
        known["model_path"],
        known["base_path"],
        "--csv",
        tmp_path / "a.csv",
        "--json",
        tmp_path / "a.json",
    )
    assert result.exit_code == 0, result.output
    want = expected(known["base"], known["model"], known["cells"], 0.01)
    with (tmp_path / "a.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["model", "layer", "module", "mean_abs", "relative", "top_share", "count"]
    assert len(rows) == 2 * len(want)
    for row in rows[: len(want)]:
        assert row["model"] == str(known["model_path"])
        cell = want[int(row["layer"]), row["module"]]
        assert int(row["count"]) == cell["count"]
        for stat in ("mean_abs", "relative", "top_share"):
            assert float(row[stat]) == pytest.approx(cell[stat], rel=1e-6, abs=1e-12)
    assert all(float(row["relative"]) == 0.0 for row in rows[len(want) :])

    data = json.loads((tmp_path / "a.json").read_text())
    assert (
        data["base"] == str(known["base_path"]) and data["top_fraction"] == 0.01 and data["layer_count"] == 4
    )
    model = data["models"][0]
    assert model["top_count"] == sum(round(c["top_share"] * model["top_count"]) for c in model["cells"])
    layer0 = torch.cat(
        [(known["model"][n] - known["base"][n]).reshape(-1) for n, c in known["cells"].items() if c[0] == 0]
    ).double()
    weights0 = torch.cat(
        [known["base"][n].reshape(-1) for n, c in known["cells"].items() if c[0] == 0]
    ).double()
    assert model["layers"][0]["relative"] == pytest.approx(float(layer0.norm() / weights0.norm()), rel=1e-6)
    assert model["layers"][0]["count"] == layer0.numel()
    non_layer = {entry["tensor"]: entry for entry in model["non_layer"]}
    assert set(non_layer) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert non_layer["model.embed_tokens.weight"]["relative"] == pytest.approx(0.1, rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.csv",
        "a.json",
        "base",
        "model",
    ]  # no temporary files left


def test_png(known: dict, tmp_path: Path) -> None:
    out = tmp_path / "heat.png"
    result = invoke(
        known["base_path"], known["model_path"], known["base_path"], "--png", out, "--stat", "mean_abs"
    )
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000 and b"IEND" in data[-16:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------------
# swap suggestion
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def experts(tmp_path: Path) -> dict[str, Path]:
    """6 layers: the language expert changed layers 0, 1 and 5; the task expert layers 2 and 3."""
    base, cells = make_base(6)
    return {
        "base": write_checkpoint(tmp_path / "base", base, 6),
        "task": write_checkpoint(tmp_path / "task", changed(base, cells, {2: 0.05, 3: 0.05}, seed=2), 6),
        "language": write_checkpoint(
            tmp_path / "language", changed(base, cells, {0: 0.05, 1: 0.05, 5: 0.05}, seed=3), 6
        ),
    }


def printed_recipe(output: str) -> dict:
    return yaml.safe_load(output[output.index("# layer_swap recipe") :])


@pytest.mark.parametrize("keys", [("task", "language"), ("1", "2")])
def test_suggest_swap(experts: dict[str, Path], keys: tuple[str, str]) -> None:
    task, language = (str(experts[k]) if k in experts else k for k in keys)
    result = invoke(experts["base"], experts["task"], experts["language"], "--suggest-swap", task, language)
    assert result.exit_code == 0, result.output
    assert "d = p_lang - p_task" in result.output
    recipe = printed_recipe(result.output)
    assert recipe == {
        "method": "layer_swap",
        "models": [
            {"model": str(experts["task"]), "parameters": {"role": "task"}},
            {"model": str(experts["language"]), "parameters": {"role": "language"}},
        ],
        "parameters": {"bottom": 2, "top": 1, "transition_bottom": 0, "transition_top": 0},
    }


def test_suggest_swap_profile_and_no_swap(experts: dict[str, Path]) -> None:
    analysis = analyze(str(experts["base"]), [str(experts["task"]), str(experts["language"])])
    suggestion = suggest_swap(analysis, str(experts["task"]), str(experts["language"]))
    assert (suggestion.bottom, suggestion.top) == (2, 1)
    assert sum(p.task_share for p in suggestion.profile) == pytest.approx(1.0)
    assert [suggestion.source(layer) for layer in range(6)] == ["language"] * 2 + ["task"] * 3 + ["language"]
    reversed_roles = suggest_swap(analysis, "2", "1")  # the "language" expert now changed the middle
    assert (reversed_roles.bottom, reversed_roles.top) == (0, 0)
    result = invoke(experts["base"], experts["task"], experts["language"], "--suggest-swap", "2", "1", "-q")
    assert result.exit_code == 0 and "suggest no swap" in " ".join(result.output.split())
    assert "# layer_swap recipe" not in result.output
    with pytest.raises(WorkbenchError, match="the same model"):
        suggest_swap(analysis, "1", str(experts["task"]))


def test_column_labels_and_stat_choices() -> None:
    assert analyze_module.module_label("self_attn.q_proj.weight") == "q_proj"
    assert analyze_module.module_label("mlp.down_proj.bias") == "down_proj"
    assert analyze_module.module_label("attention.output.LayerNorm.weight") == "attention.output.LayerNorm"
    assert analyze_module.module_label("scale") == "scale"
    stat = next(p for p in main.commands["analyze"].params if p.name == "stat")
    assert tuple(stat.type.choices) == analyze_module.STATS


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    from workbench.analysis.render import write_atomic

    def fail(handle: object) -> None:
        raise RuntimeError("disk full")

    (tmp_path / "old.csv").write_text("kept\n")
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "old.csv", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["old.csv"]
    assert (tmp_path / "old.csv").read_text() == "kept\n"
