"""Layer stacking: recipes with ``slices`` (native and mergekit), e.g. depth up-scaling.

Expected tensors are the sources' own tensors, read with safetensors and renumbered here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from merging import load_dir, merge, q

from workbench.errors import CheckpointError, RecipeError
from workbench.recipe.schema import parse_recipe

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def by_layer(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        match = LAYER.match(name)
        if match:
            out[(int(match[1]), match[2])] = tensor
    return out


def stacked(sources: list[tuple[Path, int, int]], method: str = "passthrough") -> str:
    lines = [f"method: {method}", "slices:"]
    for model, start, stop in sources:
        lines.append(f"  - sources: [{{model: {q(model)}, layer_range: [{start}, {stop}]}}]")
    return "\n".join(lines) + "\n"


def test_depth_up_scaling_stacks_layers_and_runs_in_transformers(
    tmp_path: Path, tiny_family: dict[str, Path]
) -> None:
    """4 layers -> 6: layers 0-2 then 1-3 of the same model (the G_stack / SOLAR pattern)."""
    transformers = pytest.importorskip("transformers")
    out = merge(tmp_path, stacked([(tiny_family["ft1"], 0, 3), (tiny_family["ft1"], 1, 4)]))
    source = load_dir(tiny_family["ft1"])
    source_layers, out_layers = by_layer(source), by_layer(out)
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):
        modules = {m for (i, m) in source_layers if i == old}
        assert modules and modules == {m for (i, m) in out_layers if i == new}
        for module in modules:
            assert torch.equal(out_layers[(new, module)], source_layers[(old, module)]), (new, module)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[name], source[name])
    assert len(out) == len(source) + 2 * len({m for (i, m) in source_layers if i == 0})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    torch.testing.assert_close(
        model.model.layers[3].mlp.up_proj.weight.detach(),
        source_layers[(1, "mlp.up_proj.weight")].to(model.dtype),
    )
    logits = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()


def test_slices_of_two_models_merged_by_a_method(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    """Two sources per slice: source i of every slice is model i of a linear merge."""
    ft1, ft2 = tiny_family["ft1"], tiny_family["ft2"]
    text = f"""
method: linear
slices:
  - sources:
      - {{model: {q(ft1)}, layer_range: [0, 2], parameters: {{weight: 3.0}}}}
      - {{model: {q(ft2)}, layer_range: [2, 4], parameters: {{weight: 1.0}}}}
  - sources:
      - {{model: {q(ft1)}, layer_range: [3, 4], parameters: {{weight: 3.0}}}}
      - {{model: {q(ft2)}, layer_range: [0, 1], parameters: {{weight: 1.0}}}}
output: {{dtype: float32}}
"""
    out = by_layer(merge(tmp_path, text))
    a, b = by_layer(load_dir(ft1)), by_layer(load_dir(ft2))
    pairs = [(0, 2), (1, 3), (3, 0)]  # output layer k mixes ft1 layer pairs[k][0] and ft2 layer pairs[k][1]
    for new, (i, j) in enumerate(pairs):
        for (layer, module), tensor in out.items():
            if layer == new:
                expected = (3.0 * a[(i, module)].double() + b[(j, module)].double()) / 4.0
                torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)
    assert {layer for layer, _ in out} == {0, 1, 2}


def test_mergekit_slices_run_unchanged(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    ft1, ft2 = tiny_family["ft1"], tiny_family["ft2"]
    text = f"""
slices:
  - sources:
      - model: {q(ft2)}
        layer_range: [0, 4]
      - model: {q(ft1)}
        layer_range: [0, 4]
merge_method: slerp
base_model: {q(ft1)}
parameters:
  t: 0.0
dtype: float32
"""
    recipe = parse_recipe(text)
    assert recipe.slices is not None and [s.model for s in recipe.slices[0].sources] == [
        str(ft1),
        str(ft2),
    ]  # base first: t = 0
    out = merge(tmp_path, text)
    source = load_dir(ft1)
    assert all(torch.equal(out[n], source[n]) for n in source)  # t = 0 is the base end, exactly


def test_slices_merge_over_each_slice_s_range_of_the_base(
    tmp_path: Path, tiny_family: dict[str, Path]
) -> None:
    """task_arithmetic with slices and a base (mergekit's slices over a base_model): output layer k of a
    slice is base + lambda * sum w (model - base) of that slice's source layers, each model's and the
    base's own range; the embeddings and head are the same sum over the three models' own."""
    base, ft1, ft2 = (load_dir(tiny_family[k]) for k in ("base", "ft1", "ft2"))
    b, f1, f2 = (q(tiny_family[k]) for k in ("base", "ft1", "ft2"))
    text = f"""
method: task_arithmetic
base: {b}
slices:
  - sources:
      - {{model: {f1}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}
      - {{model: {b}, layer_range: [0, 2]}}
      - {{model: {f2}, layer_range: [2, 4], parameters: {{weight: 0.4}}}}
  - sources:
      - {{model: {b}, layer_range: [1, 4]}}
      - {{model: {f1}, layer_range: [1, 4], parameters: {{weight: 0.7}}}}
      - {{model: {f2}, layer_range: [0, 3], parameters: {{weight: 0.4}}}}
parameters: {{lambda: 0.9}}
dtype: float32
output: {{dtype: float32}}
"""
    out = merge(tmp_path, text)

    def expected(x_b: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x_b, x1, x2 = (t.double() for t in (x_b, x1, x2))
        return x_b + 0.9 * (0.7 * (x1 - x_b) + 0.4 * (x2 - x_b))

    layers = {k: by_layer(m) for k, m in (("b", base), ("1", ft1), ("2", ft2))}
    # output layer -> (base layer, ft1 layer, ft2 layer)
    plan = [(0, 0, 2), (1, 1, 3), (1, 1, 0), (2, 2, 1), (3, 3, 2)]
    out_layers = by_layer(out)
    assert {i for i, _ in out_layers} == set(range(5))
    for new, (lb, l1, l2) in enumerate(plan):
        for (i, module), tensor in out_layers.items():
            if i != new:
                continue
            want = expected(layers["b"][(lb, module)], layers["1"][(l1, module)], layers["2"][(l2, module)])
            torch.testing.assert_close(tensor.double(), want, rtol=1e-6, atol=1e-7, msg=f"{new} {module}")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(
            out[name].double(), expected(base[name], ft1[name], ft2[name]), rtol=1e-6, atol=1e-7
        )


def test_mergekit_ties_slices_over_a_base_run_unchanged(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    """mergekit's form: base_model among each slice's sources; density 1 makes ties' result a closed form
    (every entry kept: the disjoint mean of the agreeing task vectors)."""
    b, f1 = q(tiny_family["base"]), q(tiny_family["ft1"])
    text = f"""
slices:
  - sources:
      - {{model: {b}, layer_range: [0, 4]}}
      - {{model: {f1}, layer_range: [0, 4], parameters: {{weight: 1.0, density: 1.0}}}}
merge_method: ties
base_model: {b}
dtype: float32
out_dtype: float32
"""
    out = merge(tmp_path, text)
    ft1 = load_dir(tiny_family["ft1"])
    for name, tensor in out.items():  # one model, weight 1, normalized: base + (ft1 - base) = ft1
        torch.testing.assert_close(tensor, ft1[name].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "text, error, message",
    [
        (
            "method: passthrough\nslices:\n  - sources: [{model: FT1, layer_range: [2, 6]}]\n",
            CheckpointError,
            "layer_range [2, 6] does not fit the model's 4 layers",
        ),
        (
            "method: passthrough\nslices:\n  - sources: [{model: FT1, layer_range: [3, 1]}]\n",
            RecipeError,
            "layer_range must be [start, end) with 0 <= start < end",
        ),
        (
            "method: linear\nslices:\n"
            "  - sources: [{model: FT1, layer_range: [0, 2]}, {model: FT2, layer_range: [0, 2]}]\n"
            "  - sources: [{model: FT1, layer_range: [2, 4]}]\n",
            RecipeError,
            "every slice needs the same number of sources",
        ),
        (
            "method: passthrough\nmodels: [FT1]\nslices:\n  - sources: [{model: FT1, layer_range: [0, 2]}]\n",
            RecipeError,
            "either 'models' or 'slices'",
        ),
        (
            "method: passthrough\nslices:\n"
            "  - sources: [{model: FT1, layer_range: [0, 2], parameters: {scale: 2.0}}]\n"
            "  - sources: [{model: FT1, layer_range: [2, 4]}]\n",
            RecipeError,
            "source 0 has other parameters than in slice 0",
        ),
        (
            "method: task_arithmetic\nbase: FT1\nslices:\n  - sources: [{model: FT2, layer_range: [0, 2]}]\n",
            RecipeError,
            "slices[0] has 0 sources of the base",
        ),
        (
            "merge_method: ties\nbase_model: FT1\nslices:\n  - sources: [{model: FT2, layer_range: [0, 2]}]\n",
            RecipeError,
            "this slice has no source of",
        ),
    ],
)
def test_bad_slices_are_refused_with_the_cause(
    tmp_path: Path, tiny_family: dict[str, Path], text: str, error: type[Exception], message: str
) -> None:
    text = text.replace("FT1", q(tiny_family["ft1"])).replace("FT2", q(tiny_family["ft2"]))
    with pytest.raises(error, match=re.escape(message)):
        merge(tmp_path, text)
    assert not (tmp_path / "out").exists()


def test_embeddings_come_from_the_first_slice_and_the_head_from_the_last(
    tmp_path: Path, tiny_family: dict[str, Path]
) -> None:
    out = merge(tmp_path, stacked([(tiny_family["ft1"], 0, 2), (tiny_family["ft2"], 2, 4)]))
    first, last = load_dir(tiny_family["ft1"]), load_dir(tiny_family["ft2"])
    assert torch.equal(out["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], last["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], last["lm_head.weight"])
    assert torch.equal(
        out["model.layers.3.mlp.down_proj.weight"], last["model.layers.3.mlp.down_proj.weight"]
    )
    assert torch.equal(
        out["model.layers.1.mlp.down_proj.weight"], first["model.layers.1.mlp.down_proj.weight"]
    )
