"""SLERP through the engine: endpoints and layer gradients, and results against the float64 formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merging import LAYER, assert_bf16_close, load_dir, merge, q, slerp_reference

from workbench.checkpoint.synthetic import SIZES, write_model

# --------------------------------------------------------------------------------------------------
# Identities: bit-exact
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, which", [(0.0, "ft1"), (1.0, "ft2")])
def test_slerp_endpoints(tmp_path, tiny_family, weights, t, which):
    out = merge(
        tmp_path,
        f"""
method: slerp
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
parameters: {{t: {t}}}
""",
    )
    for name, x in weights[which].items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


def test_slerp_layer_gradient_hits_endpoints_exactly(tmp_path, tiny_family, weights, layers):
    """t: [0, 1] puts the first layer (and everything outside the layers) at ft1, the last at ft2."""
    out = merge(
        tmp_path,
        f"""
method: slerp
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
parameters: {{t: [0.0, 1.0]}}
""",
    )
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


def check_slerp(
    out: dict[str, torch.Tensor], m0: dict[str, torch.Tensor], m1: dict[str, torch.Tensor], t: float
) -> dict[str, int]:
    branches = {"lerp": 0, "slerp": 0}
    for name in m0:
        expected, magnitude, branch, d = slerp_reference(t, m0[name], m1[name])
        branches[branch] += 1
        # Right at the threshold fp32 and fp64 may take different branches; the two differ by < 2e-4 there.
        slack = 2e-4 if abs(abs(d) - 0.9995) < 1e-4 else 0.0
        assert_bf16_close(out[name], expected, magnitude, name, slack)
    return branches


def test_slerp_midpoint_matches_formula(tmp_path, tiny_family, weights):
    out = merge(
        tmp_path,
        f"""
method: slerp
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
parameters: {{t: 0.5}}
""",
    )
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
    out = merge(
        tmp_path,
        f"""
method: slerp
models: [{q(a)}, {q(b)}]
parameters: {{t: {t}}}
""",
    )
    m0, m1 = load_dir(a), load_dir(b)
    branches = check_slerp(out, m0, m1, t)
    # The case must exercise the spherical formula, where it differs clearly from a lerp.
    assert branches["slerp"] == len(m0)
    name = "model.layers.0.self_attn.q_proj.weight"
    lerp = (1 - t) * m0[name].double() + t * m1[name].double()
    assert (out[name].double().norm() / lerp.norm()).item() > 1.2


def test_slerp_float64_compute(tmp_path, unrelated_pair):
    a, b = unrelated_pair
    out = merge(
        tmp_path,
        f"""
method: slerp
models: [{q(a)}, {q(b)}]
parameters: {{t: 0.25}}
dtype: float64
output: {{dtype: float64}}
""",
    )
    m0, m1 = load_dir(a), load_dir(b)
    for name in m0:
        expected, magnitude, _, _ = slerp_reference(0.25, m0[name], m1[name])
        assert out[name].dtype == torch.float64
        assert bool(((out[name] - expected).abs() <= 1e-12 * magnitude + 1e-300).all()), name
