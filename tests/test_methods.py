"""Property and reference tests of the built-in merge methods, run through the real engine.

Every merge runs on the session's tiny Llama-shaped models (bf16) through ``run_recipe``; the output is
read back with ``safetensors.torch.load_file`` (an independent reader) and compared with expectations
computed here, in float64, from the input tensors: never with the code under test.
"""

from __future__ import annotations

import fnmatch
import json
import struct
from pathlib import Path

import pytest
import torch
from merging import assert_bf16_close, combo, gradient, layer_t, load_dir, merge, q, slerp_reference
from safetensors.torch import save_file

from workbench.engine.run import run_recipe
from workbench.recipe.schema import parse_recipe

# --------------------------------------------------------------------------------------------------
# Helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------------


def header_dtypes(directory: Path) -> dict[str, str]:
    """Tensor name -> dtype code, parsed straight from the safetensors headers."""
    out: dict[str, str] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        out.update({name: entry["dtype"] for name, entry in header.items()})
    return out


def test_inputs_are_bf16_and_distinct(weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Sanity of the fixtures the other tests rely on: bf16, same names, genuinely different values."""
    base, ft1, ft2 = weights["base"], weights["ft1"], weights["ft2"]
    assert set(base) == set(ft1) == set(ft2)
    assert {t.dtype for m in (base, ft1, ft2) for t in m.values()} == {torch.bfloat16}
    for name in base:
        assert not torch.equal(ft1[name], ft2[name]), name
        assert not torch.equal(base[name], ft1[name]), name


# --------------------------------------------------------------------------------------------------
# Identities: bit-exact
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_single_model_weight_one_is_identity(tmp_path, tiny_family, weights, normalize):
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 1.0}}
parameters: {{normalize: {str(normalize).lower()}}}
""",
    )
    ref = weights["ft1"]
    assert set(out) == set(ref)
    for name, x in ref.items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


def test_linear_single_model_any_weight_normalized_is_identity(tmp_path, tiny_family, weights):
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 4.0}}
""",
    )
    for name, x in weights["ft2"].items():
        assert torch.equal(out[name], x), name


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_task_arithmetic_single_finetune(tmp_path, tiny_family, weights, scale):
    """lambda 1, weight 1 gives the fine-tune; lambda 0 gives the base; both bit-exactly."""
    out = merge(
        tmp_path,
        f"""
method: task_arithmetic
base: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 1.0}}
parameters: {{lambda: {scale}}}
""",
    )
    ref = weights["ft1"] if scale == 1.0 else weights["base"]
    assert set(out) == set(ref)
    for name, x in ref.items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hot", [0, 1, 2])
def test_linear_one_hot_selects_model(tmp_path, tiny_family, weights, normalize, hot):
    keys = ["base", "ft1", "ft2"]
    entries = "\n".join(
        f"  - model: {q(tiny_family[k])}\n    parameters: {{weight: {1.0 if i == hot else 0.0}}}"
        for i, k in enumerate(keys)
    )
    out = merge(
        tmp_path, f"method: linear\nmodels:\n{entries}\nparameters: {{normalize: {str(normalize).lower()}}}\n"
    )
    for name, x in weights[keys[hot]].items():
        assert torch.equal(out[name], x), name


# --------------------------------------------------------------------------------------------------
# Linear and task arithmetic against independent expectations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_weighted_values(tmp_path, tiny_family, weights, normalize):
    w = [0.2, 0.5, 1.3]
    keys = ["base", "ft1", "ft2"]
    entries = "\n".join(
        f"  - model: {q(tiny_family[k])}\n    parameters: {{weight: {wi}}}" for k, wi in zip(keys, w)
    )
    out = merge(
        tmp_path, f"method: linear\nmodels:\n{entries}\nparameters: {{normalize: {str(normalize).lower()}}}\n"
    )
    coefficients = [wi / sum(w) for wi in w] if normalize else w
    for name in weights["base"]:
        expected, magnitude = combo([weights[k][name] for k in keys], coefficients)
        assert_bf16_close(out[name], expected, magnitude, name)


def test_linear_normalize_is_default(tmp_path, tiny_family, weights):
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 3.0}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 1.0}}
""",
    )
    for name in weights["ft1"]:
        expected, magnitude = combo([weights["ft1"][name], weights["ft2"][name]], [0.75, 0.25])
        assert_bf16_close(out[name], expected, magnitude, name)


def test_linear_top_level_weight_is_every_models_default(tmp_path, tiny_family, weights):
    """A per-model parameter given under `parameters` applies to every model without its own."""
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - {q(tiny_family["ft1"])}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 0.5}}
parameters: {{weight: 2.0, normalize: false}}
""",
    )
    for name in weights["ft1"]:
        expected, magnitude = combo([weights["ft1"][name], weights["ft2"][name]], [2.0, 0.5])
        assert_bf16_close(out[name], expected, magnitude, name)


def test_linear_per_layer_gradient(tmp_path, tiny_family, weights, layers):
    """weight: [0, 1] is interpolated over layers (layer i at i/(n-1)); outside the layers t = 0."""
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: [0.0, 1.0]}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: [1.0, 0.2, 0.6]}}
parameters: {{normalize: false}}
""",
    )
    seen_t = set()
    for name in weights["ft1"]:
        t = layer_t(name, layers)
        seen_t.add(round(t, 6))
        c = [gradient([0.0, 1.0], t), gradient([1.0, 0.2, 0.6], t)]
        expected, magnitude = combo([weights["ft1"][name], weights["ft2"][name]], c)
        assert_bf16_close(out[name], expected, magnitude, name)
        if t == 0.0:  # weight 0 for ft1 and 1 for ft2: ft2 itself
            assert torch.equal(out[name], weights["ft2"][name]), name
    assert len(seen_t) == layers  # every layer position was exercised


def test_linear_filter_list(tmp_path, tiny_family, weights, layers):
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(tiny_family["ft1"])}
    parameters:
      weight:
        - filter: mlp
          value: 0.25
        - filter: "model.layers.*.self_attn.[qk]_proj.weight"
          value: [0.0, 1.0]
        - value: 0.5
  - model: {q(tiny_family["ft2"])}
    parameters:
      weight:
        - filter: embed_tokens
          value: 3.0
        - value: 1.0
""",
    )
    kinds = set()
    for name in weights["ft1"]:
        t = layer_t(name, layers)
        if "mlp" in name:
            w1, kind = 0.25, "mlp"
        elif fnmatch.fnmatchcase(name, "model.layers.*.self_attn.[qk]_proj.weight"):
            w1, kind = gradient([0.0, 1.0], t), "qk"
        else:
            w1, kind = 0.5, "rest"
        w2 = 3.0 if "embed_tokens" in name else 1.0
        kinds.add(kind)
        c = [w1 / (w1 + w2), w2 / (w1 + w2)]
        expected, magnitude = combo([weights["ft1"][name], weights["ft2"][name]], c)
        assert_bf16_close(out[name], expected, magnitude, name)
    assert kinds == {"mlp", "qk", "rest"}


@pytest.mark.parametrize(
    "params, w, scale",
    [
        ("{lambda: 0.7}", [1.0, 0.5], 0.7),
        ("{lambda: 1.0}", [1.0, 1.0], 1.0),
        ("{lambda: -0.5}", [1.0, 0.0], -0.5),  # negation of a task vector
        ("{lambda: 2.0, normalize: true}", [1.0, 3.0], 2.0),
        ("{}", [0.3, 0.9], 1.0),  # lambda defaults to 1, normalize to false
    ],
)
def test_task_arithmetic_values(tmp_path, tiny_family, weights, params, w, scale):
    out = merge(
        tmp_path,
        f"""
method: task_arithmetic
base: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: {w[0]}}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: {w[1]}}}
parameters: {params}
""",
    )
    ww = [x / sum(w) for x in w] if "normalize: true" in params else w
    for name in weights["base"]:
        base = weights["base"][name].double()
        tau = [weights[k][name].double() - base for k in ("ft1", "ft2")]
        expected = base + scale * (ww[0] * tau[0] + ww[1] * tau[1])
        magnitude = base.abs() * (1 + abs(scale) * sum(abs(x) for x in ww)) + sum(
            abs(scale * x) * weights[k][name].double().abs() for x, k in zip(ww, ("ft1", "ft2"))
        )
        assert_bf16_close(out[name], expected, magnitude, name)


def test_task_arithmetic_lambda_gradient_and_weight_filter(tmp_path, tiny_family, weights, layers):
    out = merge(
        tmp_path,
        f"""
method: task_arithmetic
base: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 1.0}}
  - model: {q(tiny_family["ft2"])}
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - filter: norm
          value: [0.0, 2.0]
        - value: 1.0
parameters:
  lambda: [0.2, 1.0, 0.6]
""",
    )
    for name in weights["base"]:
        t = layer_t(name, layers)
        scale = gradient([0.2, 1.0, 0.6], t)
        w2 = 0.5 if "mlp" in name else (gradient([0.0, 2.0], t) if "norm" in name else 1.0)
        base = weights["base"][name].double()
        x1, x2 = weights["ft1"][name].double(), weights["ft2"][name].double()
        expected = base + scale * (1.0 * (x1 - base) + w2 * (x2 - base))
        magnitude = base.abs() * (1 + scale * (1 + w2)) + scale * x1.abs() + scale * w2 * x2.abs()
        assert_bf16_close(out[name], expected, magnitude, name)


def test_zero_weight_model_with_nan_does_not_reach_output(tmp_path, tiny_family, weights):
    """A model with weight 0 is skipped entirely, even where it holds NaN and Inf."""
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    tensors = {k: v.clone() for k, v in weights["ft2"].items()}
    for v in tensors.values():
        v.view(-1)[0] = float("nan")
        v.view(-1)[-1] = float("inf")
    save_file(tensors, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    (poisoned / "config.json").write_text((tiny_family["ft2"] / "config.json").read_text())
    result = run_recipe(
        parse_recipe(f"""
method: linear
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 1.0}}
  - model: {q(poisoned)}
    parameters: {{weight: 0.0}}
"""),
        out=tmp_path / "out",
    )
    out = load_dir(tmp_path / "out")
    assert not any("NaN" in w for w in result.warnings)
    for name, x in weights["ft1"].items():
        assert torch.equal(out[name], x), name


def test_row_blocks_match_whole_tensors(tmp_path, tiny_family, monkeypatch):
    """Forcing the engine's row-block path (tiny chunk size) changes nothing in the result."""
    import workbench.engine.runner as engine

    text = f"""
method: task_arithmetic
base: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: [0.3, 1.0]}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 0.6}}
parameters: {{lambda: 0.9}}
"""
    whole = merge(tmp_path, text, "whole")
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    blocks = merge(tmp_path, text, "blocks")
    assert set(whole) == set(blocks)
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name


def _odd_model(directory: Path, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(7, 3, generator=g).to(dtype),
        "model.layers.0.scale": torch.randn((), generator=g).to(dtype),  # 0-d
        "model.layers.0.empty": torch.zeros(0, 4, dtype=dtype),  # no elements
        "model.layers.1.mlp.weight": torch.randn(5, 3, generator=g).to(dtype),
        "model.position_ids": torch.arange(6, dtype=torch.int64).reshape(1, 6) + seed,
        "model.mask": torch.tensor([True, False, seed % 2 == 0]),
    }
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return tensors


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic"])
def test_odd_tensors_mixed_dtypes_and_integer_buffers(tmp_path, method):
    """Integer and bool tensors are copied from the reference model (the base, else models[0]); a model
    stored in another float dtype is merged and the result takes the reference's dtype; 0-d and empty
    tensors merge like any other."""
    a = _odd_model(tmp_path / "a", 1, torch.bfloat16)
    b = _odd_model(tmp_path / "b", 2, torch.bfloat16)
    c = _odd_model(tmp_path / "c", 3, torch.float32)
    if method == "linear":
        text, reference, inputs, coefficients = (
            f"method: linear\nmodels: [{q(tmp_path / 'a')}, {q(tmp_path / 'b')}, {q(tmp_path / 'c')}]\n",
            a,
            [a, b, c],
            [1 / 3] * 3,
        )
    elif method == "task_arithmetic":
        text = (
            f"method: task_arithmetic\nbase: {q(tmp_path / 'a')}\n"
            f"models: [{q(tmp_path / 'b')}, {q(tmp_path / 'c')}]\nparameters: {{lambda: 0.5}}\n"
        )
        reference, inputs, coefficients = a, [a, b, c], [0.0, 0.5, 0.5]
    else:
        text = f"method: slerp\nmodels: [{q(tmp_path / 'c')}, {q(tmp_path / 'b')}]\nparameters: {{t: 0.5}}\n"
        reference, inputs, coefficients = c, [c, b], None
    result = run_recipe(parse_recipe(text), out=tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert any("converted" in w for w in result.warnings)
    assert set(out) == set(a)
    for name, ref in reference.items():
        assert tuple(out[name].shape) == tuple(ref.shape), name
        if not ref.is_floating_point():
            assert out[name].dtype == ref.dtype and torch.equal(out[name], ref), name
            continue
        assert out[name].dtype == ref.dtype, name
        if coefficients is None:
            expected, magnitude, _, _ = slerp_reference(0.5, c[name], b[name])
        elif method == "task_arithmetic":
            x0 = a[name].double()
            expected = x0 + 0.5 * (b[name].double() - x0) + 0.5 * (c[name].double() - x0)
            magnitude = 2 * x0.abs() + 0.5 * b[name].double().abs() + 0.5 * c[name].double().abs()
        else:
            expected, magnitude = combo([m[name] for m in inputs], coefficients)
        if ref.dtype == torch.bfloat16:
            assert_bf16_close(out[name], expected, magnitude, name, slack=2e-4)
        else:
            assert bool(((out[name].double() - expected).abs() <= 2e-4 * magnitude + 1e-12).all()), name


# --------------------------------------------------------------------------------------------------
# Output dtype
# --------------------------------------------------------------------------------------------------


def test_output_dtype_float32(tmp_path, tiny_family, weights):
    out = merge(
        tmp_path,
        f"""
method: linear
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 0.3}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 0.7}}
output: {{dtype: float32}}
""",
    )
    assert set(header_dtypes(tmp_path / "out").values()) == {"F32"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    eps = torch.finfo(torch.float32).eps
    for name in weights["ft1"]:
        expected, magnitude = combo([weights["ft1"][name], weights["ft2"][name]], [0.3, 0.7])
        assert out[name].dtype == torch.float32
        # No bf16 rounding now: fp32 accuracy.
        assert bool(((out[name].double() - expected).abs() <= 4 * eps * magnitude + 1e-30).all()), name


def test_output_dtype_default_keeps_input_dtype(tmp_path, tiny_family):
    merge(
        tmp_path,
        f"""
method: task_arithmetic
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
parameters: {{lambda: 0.5}}
""",
    )
    dtypes = header_dtypes(tmp_path / "out")
    assert dtypes == header_dtypes(tiny_family["base"])
    assert set(dtypes.values()) == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
