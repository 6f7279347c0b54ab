"""Property and reference tests of the built-in merge methods, run through the real engine.

Every merge runs on the session's tiny Llama-shaped models (bf16) through ``run_recipe``; the output is
read back with ``safetensors.torch.load_file`` (an independent reader) and compared with expectations
computed here, in float64, from the input tensors: never with the code under test.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.engine import run_recipe
from workbench.recipe import parse_recipe
from workbench.synthetic import SIZES, write_model
from workbench_kernels.weighted_sum import weighted_sum, weighted_sum_reference, weighted_sum_torch

# --------------------------------------------------------------------------------------------------
# Helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------------

BF16_HALF_ULP = 2.0**-8  # relative rounding error of round-to-nearest bfloat16
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def q(path: Path | str) -> str:
    """A path quoted for YAML."""
    return json.dumps(str(path))


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or shards), read with safetensors itself."""
    files = sorted(Path(directory).glob("*.safetensors"))
    assert files, f"no safetensors file in {directory}"
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_file(file)
        assert not set(part) & set(tensors), "a tensor is stored in two shards"
        tensors.update(part)
    return tensors


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


def merge(tmp_path: Path, text: str, name: str = "out") -> dict[str, torch.Tensor]:
    out = tmp_path / name
    result = run_recipe(parse_recipe(text), out=out)
    assert result.out_dir == out
    return load_dir(out)


def n_layers(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def layer_t(name: str, layers: int) -> float:
    """mergekit's position of a tensor: layer i of n at i/(n-1); tensors outside the layers at 0."""
    m = LAYER.match(name)
    return int(m[1]) / (layers - 1) if m else 0.0


def gradient(anchors: list[float], t: float) -> float:
    """Anchors spread evenly over [0, 1], linearly interpolated."""
    return float(np.interp(t, np.linspace(0.0, 1.0, len(anchors)), anchors))


def assert_bf16_close(out: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, name: str, slack: float = 0.0) -> None:
    """``out`` (bf16) is ``expected`` (float64) rounded once to bf16, up to fp32 compute error.

    ``magnitude`` is sum_i |c_i| |x_i| elementwise (the scale of the fp32 rounding errors).
    """
    assert out.dtype == torch.bfloat16, name
    assert out.shape == expected.shape, name
    diff = (out.double() - expected).abs()
    bound = BF16_HALF_ULP * expected.abs() + (1e-5 + slack) * magnitude + 1e-30
    bad = diff > bound
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst excess {(diff - bound).max().item():.3g}"
    )


def combo(tensors: list[torch.Tensor], coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum c_i x_i in float64 and its error scale sum |c_i| |x_i|."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    magnitude = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for x, c in zip(tensors, coefficients):
        total += c * x.double()
        magnitude += abs(c) * x.double().abs()
    return total, magnitude


@pytest.fixture(scope="module")
def weights(tiny_family: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {key: load_dir(path) for key, path in tiny_family.items()}


@pytest.fixture(scope="module")
def layers(tiny_family: dict[str, Path]) -> int:
    count = n_layers(tiny_family["base"])
    assert count >= 3, "the gradient tests need at least three layers"
    return count


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
    out = merge(tmp_path, f"""
method: linear
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: 1.0}}
parameters: {{normalize: {str(normalize).lower()}}}
""")
    ref = weights["ft1"]
    assert set(out) == set(ref)
    for name, x in ref.items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


def test_linear_single_model_any_weight_normalized_is_identity(tmp_path, tiny_family, weights):
    out = merge(tmp_path, f"""
method: linear
models:
  - model: {q(tiny_family['ft2'])}
    parameters: {{weight: 4.0}}
""")
    for name, x in weights["ft2"].items():
        assert torch.equal(out[name], x), name


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_task_arithmetic_single_finetune(tmp_path, tiny_family, weights, scale):
    """lambda 1, weight 1 gives the fine-tune; lambda 0 gives the base; both bit-exactly."""
    out = merge(tmp_path, f"""
method: task_arithmetic
base: {q(tiny_family['base'])}
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: 1.0}}
parameters: {{lambda: {scale}}}
""")
    ref = weights["ft1"] if scale == 1.0 else weights["base"]
    assert set(out) == set(ref)
    for name, x in ref.items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hot", [0, 1, 2])
def test_linear_one_hot_selects_model(tmp_path, tiny_family, weights, normalize, hot):
    keys = ["base", "ft1", "ft2"]
    entries = "\n".join(
        f"  - model: {q(tiny_family[k])}\n    parameters: {{weight: {1.0 if i == hot else 0.0}}}" for i, k in enumerate(keys)
    )
    out = merge(tmp_path, f"method: linear\nmodels:\n{entries}\nparameters: {{normalize: {str(normalize).lower()}}}\n")
    for name, x in weights[keys[hot]].items():
        assert torch.equal(out[name], x), name


@pytest.mark.parametrize("t, which", [(0.0, "ft1"), (1.0, "ft2")])
def test_slerp_endpoints(tmp_path, tiny_family, weights, t, which):
    out = merge(tmp_path, f"""
method: slerp
models: [{q(tiny_family['ft1'])}, {q(tiny_family['ft2'])}]
parameters: {{t: {t}}}
""")
    for name, x in weights[which].items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


def test_slerp_layer_gradient_hits_endpoints_exactly(tmp_path, tiny_family, weights, layers):
    """t: [0, 1] puts the first layer (and everything outside the layers) at ft1, the last at ft2."""
    out = merge(tmp_path, f"""
method: slerp
models: [{q(tiny_family['ft1'])}, {q(tiny_family['ft2'])}]
parameters: {{t: [0.0, 1.0]}}
""")
    for name in weights["ft1"]:
        m = LAYER.match(name)
        if m is None or int(m[1]) == 0:
            assert torch.equal(out[name], weights["ft1"][name]), name
        elif int(m[1]) == layers - 1:
            assert torch.equal(out[name], weights["ft2"][name]), name
        else:
            t = int(m[1]) / (layers - 1)
            expected, magnitude, _, d = slerp_reference(t, weights["ft1"][name], weights["ft2"][name])
            slack = 2e-4 if abs(abs(d) - 0.9995) < 1e-4 else 0.0
            assert_bf16_close(out[name], expected, magnitude, name, slack)
            if out[name].dim() == 2:  # strictly between the endpoints
                assert not torch.equal(out[name], weights["ft1"][name]), name
                assert not torch.equal(out[name], weights["ft2"][name]), name


# --------------------------------------------------------------------------------------------------
# SLERP against the formula
# --------------------------------------------------------------------------------------------------


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str, float]:
    """methods.md 8.5, in float64: (result, error scale, branch, cos)."""
    a, b = v0.double(), v1.double()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    d = float((ua * ub).sum())
    if abs(d) > 0.9995:
        c0, c1, branch = 1.0 - t, t, "lerp"
    else:
        omega = math.acos(max(-1.0, min(1.0, d)))
        c0, c1, branch = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega), "slerp"
    result, magnitude = combo([v0, v1], [c0, c1])
    return result, magnitude, branch, d


def check_slerp(out: dict[str, torch.Tensor], m0: dict[str, torch.Tensor], m1: dict[str, torch.Tensor], t: float) -> dict[str, int]:
    branches = {"lerp": 0, "slerp": 0}
    for name in m0:
        expected, magnitude, branch, d = slerp_reference(t, m0[name], m1[name])
        branches[branch] += 1
        # Right at the threshold fp32 and fp64 may take different branches; the two differ by < 2e-4 there.
        slack = 2e-4 if abs(abs(d) - 0.9995) < 1e-4 else 0.0
        assert_bf16_close(out[name], expected, magnitude, name, slack)
    return branches


def test_slerp_midpoint_matches_formula(tmp_path, tiny_family, weights):
    out = merge(tmp_path, f"""
method: slerp
models: [{q(tiny_family['ft1'])}, {q(tiny_family['ft2'])}]
parameters: {{t: 0.5}}
""")
    assert set(out) == set(weights["ft1"])
    check_slerp(out, weights["ft1"], weights["ft2"], 0.5)


@pytest.fixture(scope="module")
def unrelated_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny models from different seeds: nearly orthogonal tensors, so slerp is really spherical."""
    root = tmp_path_factory.mktemp("unrelated")
    shape = SIZES["tiny"]
    return write_model(root / "a", shape, seed=11), write_model(root / "b", shape, seed=12)


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_slerp_spherical_branch_matches_formula(tmp_path, unrelated_pair, t):
    a, b = unrelated_pair
    out = merge(tmp_path, f"""
method: slerp
models: [{q(a)}, {q(b)}]
parameters: {{t: {t}}}
""")
    m0, m1 = load_dir(a), load_dir(b)
    branches = check_slerp(out, m0, m1, t)
    # The case must exercise the spherical formula, where it differs clearly from a lerp.
    assert branches["slerp"] == len(m0)
    name = "model.layers.0.self_attn.q_proj.weight"
    lerp = (1 - t) * m0[name].double() + t * m1[name].double()
    assert (out[name].double().norm() / lerp.norm()).item() > 1.2


def test_slerp_float64_compute(tmp_path, unrelated_pair):
    a, b = unrelated_pair
    out = merge(tmp_path, f"""
method: slerp
models: [{q(a)}, {q(b)}]
parameters: {{t: 0.25}}
dtype: float64
output: {{dtype: float64}}
""")
    m0, m1 = load_dir(a), load_dir(b)
    for name in m0:
        expected, magnitude, _, _ = slerp_reference(0.25, m0[name], m1[name])
        assert out[name].dtype == torch.float64
        assert bool(((out[name] - expected).abs() <= 1e-12 * magnitude + 1e-300).all()), name


# --------------------------------------------------------------------------------------------------
# Linear and task arithmetic against independent expectations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_weighted_values(tmp_path, tiny_family, weights, normalize):
    w = [0.2, 0.5, 1.3]
    keys = ["base", "ft1", "ft2"]
    entries = "\n".join(f"  - model: {q(tiny_family[k])}\n    parameters: {{weight: {wi}}}" for k, wi in zip(keys, w))
    out = merge(tmp_path, f"method: linear\nmodels:\n{entries}\nparameters: {{normalize: {str(normalize).lower()}}}\n")
    coefficients = [wi / sum(w) for wi in w] if normalize else w
    for name in weights["base"]:
        expected, magnitude = combo([weights[k][name] for k in keys], coefficients)
        assert_bf16_close(out[name], expected, magnitude, name)


def test_linear_normalize_is_default(tmp_path, tiny_family, weights):
    out = merge(tmp_path, f"""
method: linear
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: 3.0}}
  - model: {q(tiny_family['ft2'])}
    parameters: {{weight: 1.0}}
""")
    for name in weights["ft1"]:
        expected, magnitude = combo([weights["ft1"][name], weights["ft2"][name]], [0.75, 0.25])
        assert_bf16_close(out[name], expected, magnitude, name)


def test_linear_top_level_weight_is_every_models_default(tmp_path, tiny_family, weights):
    """A per-model parameter given under `parameters` applies to every model without its own."""
    out = merge(tmp_path, f"""
method: linear
models:
  - {q(tiny_family['ft1'])}
  - model: {q(tiny_family['ft2'])}
    parameters: {{weight: 0.5}}
parameters: {{weight: 2.0, normalize: false}}
""")
    for name in weights["ft1"]:
        expected, magnitude = combo([weights["ft1"][name], weights["ft2"][name]], [2.0, 0.5])
        assert_bf16_close(out[name], expected, magnitude, name)


def test_linear_per_layer_gradient(tmp_path, tiny_family, weights, layers):
    """weight: [0, 1] is interpolated over layers (layer i at i/(n-1)); outside the layers t = 0."""
    out = merge(tmp_path, f"""
method: linear
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: [0.0, 1.0]}}
  - model: {q(tiny_family['ft2'])}
    parameters: {{weight: [1.0, 0.2, 0.6]}}
parameters: {{normalize: false}}
""")
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
    out = merge(tmp_path, f"""
method: linear
models:
  - model: {q(tiny_family['ft1'])}
    parameters:
      weight:
        - filter: mlp
          value: 0.25
        - filter: "model.layers.*.self_attn.[qk]_proj.weight"
          value: [0.0, 1.0]
        - value: 0.5
  - model: {q(tiny_family['ft2'])}
    parameters:
      weight:
        - filter: embed_tokens
          value: 3.0
        - value: 1.0
""")
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
    out = merge(tmp_path, f"""
method: task_arithmetic
base: {q(tiny_family['base'])}
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: {w[0]}}}
  - model: {q(tiny_family['ft2'])}
    parameters: {{weight: {w[1]}}}
parameters: {params}
""")
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
    out = merge(tmp_path, f"""
method: task_arithmetic
base: {q(tiny_family['base'])}
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: 1.0}}
  - model: {q(tiny_family['ft2'])}
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - filter: norm
          value: [0.0, 2.0]
        - value: 1.0
parameters:
  lambda: [0.2, 1.0, 0.6]
""")
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
    result = run_recipe(parse_recipe(f"""
method: linear
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: 1.0}}
  - model: {q(poisoned)}
    parameters: {{weight: 0.0}}
"""), out=tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert not any("NaN" in w for w in result.warnings)
    for name, x in weights["ft1"].items():
        assert torch.equal(out[name], x), name


def test_row_blocks_match_whole_tensors(tmp_path, tiny_family, monkeypatch):
    """Forcing the engine's row-block path (tiny chunk size) changes nothing in the result."""
    import workbench.engine as engine

    text = f"""
method: task_arithmetic
base: {q(tiny_family['base'])}
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: [0.3, 1.0]}}
  - model: {q(tiny_family['ft2'])}
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
        text, reference, inputs, coefficients = f"method: linear\nmodels: [{q(tmp_path / 'a')}, {q(tmp_path / 'b')}, {q(tmp_path / 'c')}]\n", a, [a, b, c], [1 / 3] * 3
    elif method == "task_arithmetic":
        text = f"method: task_arithmetic\nbase: {q(tmp_path / 'a')}\nmodels: [{q(tmp_path / 'b')}, {q(tmp_path / 'c')}]\nparameters: {{lambda: 0.5}}\n"
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
    out = merge(tmp_path, f"""
method: linear
models:
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: 0.3}}
  - model: {q(tiny_family['ft2'])}
    parameters: {{weight: 0.7}}
output: {{dtype: float32}}
""")
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
    merge(tmp_path, f"""
method: task_arithmetic
base: {q(tiny_family['base'])}
models: [{q(tiny_family['ft1'])}, {q(tiny_family['ft2'])}]
parameters: {{lambda: 0.5}}
""")
    dtypes = header_dtypes(tmp_path / "out")
    assert dtypes == header_dtypes(tiny_family["base"])
    assert set(dtypes.values()) == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------------
# The weighted-sum kernel
# --------------------------------------------------------------------------------------------------

IMPLS = {"torch": weighted_sum_torch, "reference": weighted_sum_reference, "dispatch": weighted_sum}


def exact_sum(tensors: list[torch.Tensor], w: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return combo([x for x, c in zip(tensors, w) if c != 0.0], [c for c in w if c != 0.0])


def assert_kernel_close(out: torch.Tensor, tensors: list[torch.Tensor], w: list[float], compute: torch.dtype) -> None:
    expected, magnitude = exact_sum(tensors, w)
    assert out.dtype == compute
    assert out.shape == tensors[0].shape
    # Each of the N products and N-1 sums rounds once in the compute dtype (weights too, in half types).
    bound = 2 * len(tensors) * torch.finfo(compute).eps * magnitude + torch.finfo(compute).tiny
    diff = (out.double() - expected).abs()
    assert bool((diff <= bound).all()), f"worst error {diff.max().item():.3g}"


@pytest.mark.parametrize("numel", [1, 7, 1023, 65537, (1 << 18) + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("same_compute", [False, True])
def test_kernel_fast_path_equals_reference(numel, dtype, same_compute):
    compute = dtype if same_compute else torch.float32
    g = torch.Generator().manual_seed(numel)
    tensors = [torch.randn(numel, generator=g).to(dtype) for _ in range(3)]
    originals = [x.clone() for x in tensors]
    w = [0.3, -0.7, 1.9]
    fast = weighted_sum_torch(tensors, w, compute)
    ref = weighted_sum_reference(tensors, w, compute)
    for out in (fast, ref):
        assert_kernel_close(out, tensors, w, compute)
    # The two implementations agree to within the rounding of the compute dtype.
    expected, magnitude = exact_sum(tensors, w)
    assert bool(((fast.double() - ref.double()).abs() <= 4 * len(w) * torch.finfo(compute).eps * magnitude + torch.finfo(compute).tiny).all())
    for x, x0 in zip(tensors, originals):  # inputs untouched
        assert torch.equal(x, x0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("large", [False, True])
def test_kernel_non_contiguous_2d(impl, dtype, large):
    g = torch.Generator().manual_seed(5)
    tensors = [
        torch.randn(37, 130, generator=g).to(dtype)[:, ::2],  # strided columns
        torch.randn(65, 37, generator=g).to(dtype).t(),  # transposed view
        torch.randn(37, 65, generator=g).to(dtype),  # contiguous
    ]
    if large:  # more elements than one block of the fast path
        tensors = [
            torch.randn(513, 1100, generator=g).to(dtype)[:, ::2],
            torch.randn(550, 513, generator=g).to(dtype).t(),
            torch.randn(513, 550, generator=g).to(dtype),
        ]
    assert not tensors[0].is_contiguous() and not tensors[1].is_contiguous()
    originals = [x.clone() for x in tensors]
    w = [1.0, 0.25, -2.0]
    out = IMPLS[impl](tensors, w, torch.float32)
    assert_kernel_close(out, tensors, w, torch.float32)
    for x, x0 in zip(tensors, originals):
        assert torch.equal(x, x0)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_kernel_mixed_input_dtypes(impl):
    g = torch.Generator().manual_seed(4)
    tensors = [
        torch.randn(300_001, generator=g).to(torch.bfloat16),
        torch.randn(300_001, generator=g).to(torch.float16),
        torch.randn(300_001, generator=g),
        torch.randn(300_001, generator=g).double(),
    ]
    w = [0.5, -0.25, 1.5, 0.125]
    assert_kernel_close(IMPLS[impl](tensors, w, torch.float32), tensors, w, torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_kernel_out_dtype(out_dtype):
    """With an output dtype the sum is computed in the compute dtype and rounded once into it."""
    g = torch.Generator().manual_seed(9)
    numel = 2 * (1 << 18) + 11
    tensors = [torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(3)]
    w = [0.25, 0.6, -0.3]
    expected, magnitude = exact_sum(tensors, w)
    for impl in ("torch", "dispatch"):
        out = IMPLS[impl](tensors, w, torch.float32, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (numel,)
        bound = torch.finfo(out_dtype).eps * expected.abs() + 8 * torch.finfo(torch.float32).eps * magnitude + 1e-30
        assert bool(((out.double() - expected).abs() <= bound).all()), impl


@pytest.mark.parametrize("impl", list(IMPLS))
def test_kernel_first_input_in_compute_dtype_is_not_modified(impl):
    """An input already in the compute dtype must not be scaled in place (it may be the caller's)."""
    x = torch.arange(10, dtype=torch.float32)
    y = torch.ones(10, dtype=torch.bfloat16)
    before = x.clone()
    out = IMPLS[impl]([x, y], [0.5, 2.0], torch.float32)
    assert torch.equal(x, before)
    assert torch.equal(out, before * 0.5 + 2.0)
    assert out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("position", [0, 1, 2])
def test_kernel_zero_weight_skips_nan_input(impl, position):
    g = torch.Generator().manual_seed(position)
    tensors = [torch.randn(257, generator=g).to(torch.bfloat16) for _ in range(3)]
    tensors[position] = torch.full((257,), float("nan"), dtype=torch.bfloat16)
    tensors[position][::3] = float("inf")
    w = [0.5, -1.5, 2.0]
    w[position] = 0.0
    out = IMPLS[impl](tensors, w, torch.float32)
    assert bool(torch.isfinite(out).all())
    assert_kernel_close(out, tensors, w, torch.float32)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_kernel_all_zero_weights_give_zeros(impl):
    tensors = [torch.full((3, 5), float("nan")), torch.randn(3, 5)]
    out = IMPLS[impl](tensors, [0.0, 0.0], torch.float64)
    assert out.dtype == torch.float64 and out.shape == (3, 5)
    assert torch.equal(out, torch.zeros(3, 5, dtype=torch.float64))


def test_kernel_dispatch_honours_environment(monkeypatch):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4099, generator=g).to(torch.bfloat16) for _ in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    assert torch.equal(weighted_sum(tensors, w, torch.bfloat16), weighted_sum_reference(tensors, w, torch.bfloat16))
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    assert torch.equal(weighted_sum(tensors, w, torch.bfloat16), weighted_sum_torch(tensors, w, torch.bfloat16))
    monkeypatch.setenv("WORKBENCH_KERNELS", "bogus")
    with pytest.raises(ValueError):
        weighted_sum(tensors, w)


def test_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError):
        weighted_sum_torch([], [])
    with pytest.raises(ValueError):
        weighted_sum_torch([torch.ones(3)], [1.0, 2.0])
    with pytest.raises(ValueError):
        weighted_sum_torch([torch.ones(3), torch.ones(4)], [1.0, 2.0])
    with pytest.raises(ValueError):
        weighted_sum_torch([torch.ones(3, dtype=torch.int64)], [1.0])


def test_engine_with_reference_kernels_matches_fast_path(tmp_path, tiny_family, monkeypatch):
    text = f"""
method: linear
models:
  - model: {q(tiny_family['base'])}
    parameters: {{weight: 0.2}}
  - model: {q(tiny_family['ft1'])}
    parameters: {{weight: 0.3}}
  - model: {q(tiny_family['ft2'])}
    parameters: {{weight: 0.5}}
output: {{dtype: float32}}
"""
    fast = merge(tmp_path, text, "fast")
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    ref = merge(tmp_path, text, "ref")
    for name in fast:
        assert torch.allclose(fast[name], ref[name], rtol=1e-6, atol=1e-7), name
