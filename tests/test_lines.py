"""LiNeS: the depth schedule, the multi-task alpha, and wrapping other task-vector methods.

Expectations are computed here in float64 from the input tensors: lambda(l) = alpha + beta * l / (L - 1)
on block l of L, alpha outside the blocks (methods.md section 5), applied to the inner method's
merged task vector. For inner methods other than task arithmetic the property tests compare with
the inner method run on its own (a wrapper property), not with a re-implementation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from merging import load_dir, merge, q

from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.recipe.schema import parse_recipe
from workbench.registry import get_registry

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
HALF_ULP_BF16 = 2.0**-8


def layer_of(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m[1]) if m else None


def expected_scale(name: str, alpha: float, beta: float, layers: int) -> float:
    layer = layer_of(name)
    return alpha if layer is None else alpha + beta * layer / (layers - 1)


@pytest.fixture(scope="module")
def w(tiny_family: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: load_dir(p) for k, p in tiny_family.items()}


@pytest.fixture(scope="module")
def layers(tiny_family: dict[str, Path]) -> int:
    n = int(json.loads((tiny_family["base"] / "config.json").read_text())["num_hidden_layers"])
    assert n >= 3
    return n


def two_models(fam: dict[str, Path], params: str, w1: float = 1.0, w2: float = 1.0, extra: str = "") -> str:
    return f"""
method: lines
base: {q(fam["base"])}
models:
  - model: {q(fam["ft1"])}
    parameters: {{weight: {w1}}}
  - model: {q(fam["ft2"])}
    parameters: {{weight: {w2}}}
parameters: {params}
{extra}"""


# --------------------------------------------------------------------------------------------------
# Against task arithmetic and the formula
# --------------------------------------------------------------------------------------------------


def test_alpha_one_beta_zero_is_task_arithmetic_lambda_one(tmp_path, tiny_family) -> None:
    lines = merge(tmp_path, two_models(tiny_family, "{alpha: 1.0, beta: 0.0}", 0.7, 0.4), "lines")
    ta = merge(
        tmp_path,
        f"""
method: task_arithmetic
base: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 0.7}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 0.4}}
parameters: {{lambda: 1.0}}
""",
        "ta",
    )
    assert set(lines) == set(ta)
    for name in ta:
        assert torch.equal(lines[name], ta[name]), name


@pytest.mark.parametrize("alpha, beta", [(0.2, 0.8), (0.5, None), (0.0, 1.0), (1.5, -1.0)])
def test_single_task_editing_schedule(tmp_path, tiny_family, w, layers, alpha, beta) -> None:
    """One model: theta = base + lambda(l) tau, beta defaulting to 1 - alpha; non-block tensors get alpha;
    the scale read back from the output is monotone in depth."""
    params = f"{{alpha: {alpha}}}" if beta is None else f"{{alpha: {alpha}, beta: {beta}}}"
    out = merge(
        tmp_path,
        f"""
method: lines
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}]
parameters: {params}
output: {{dtype: float32}}
""",
    )
    b_ = 1.0 - alpha if beta is None else beta
    seen: dict[int | None, float] = {}
    for name, base in w["base"].items():
        tau = w["ft1"][name].double() - base.double()
        lam = expected_scale(name, alpha, b_, layers)
        expected = base.double() + lam * tau
        assert torch.allclose(
            out[name].double(), expected, rtol=0, atol=1e-6 * (1 + base.double().abs().max().item())
        ), name
        # Recover the scale actually applied (least squares on this tensor).
        got = float(((out[name].double() - base.double()) * tau).sum() / (tau * tau).sum())
        assert got == pytest.approx(lam, abs=1e-4), name
        seen.setdefault(layer_of(name), got)
    assert seen[None] == pytest.approx(alpha, abs=1e-4)  # embeddings, final norm, head
    depth = [seen[layer] for layer in range(layers)]
    step = b_ / (layers - 1)
    assert all((d2 - d1) == pytest.approx(step, abs=1e-4) for d1, d2 in zip(depth, depth[1:]))
    assert (b_ >= 0) == all(d2 >= d1 for d1, d2 in zip(depth, depth[1:]))


def test_multitask_auto_alpha_is_one_over_t_for_task_arithmetic(tmp_path, tiny_family, w, layers) -> None:
    """alpha auto = 1/T: the bottom gets the average task vector; beta = 1 - alpha puts the full sum at the top."""
    out = merge(tmp_path, two_models(tiny_family, "{}"))
    for name, base in w["base"].items():
        lam = expected_scale(name, 0.5, 0.5, layers)
        b = base.double()
        x1, x2 = w["ft1"][name].double(), w["ft2"][name].double()
        expected = b + lam * ((x1 - b) + (x2 - b))
        bound = HALF_ULP_BF16 * expected.abs() + 1e-5 * (3 * b.abs() + x1.abs() + x2.abs()) + 1e-30
        assert bool(((out[name].double() - expected).abs() <= bound).all()), name


def test_auto_alpha_with_weights(tmp_path, tiny_family, w, layers) -> None:
    """Weights w: alpha = 1 / sum(w), so the bottom gets the weighted average of the task vectors."""
    out = merge(tmp_path, two_models(tiny_family, "{beta: 0.25}", 0.5, 1.5, "output: {dtype: float32}"))
    for name, base in w["base"].items():
        lam = expected_scale(name, 0.5, 0.25, layers)
        b = base.double()
        expected = b + lam * (0.5 * (w["ft1"][name].double() - b) + 1.5 * (w["ft2"][name].double() - b))
        assert torch.allclose(out[name].double(), expected, rtol=1e-6, atol=1e-7), name


def test_weight_zero_removes_a_model(tmp_path, tiny_family, w) -> None:
    """weights (1, 0): alpha auto = 1 and beta = 0, so every tensor is ft1 itself, bit for bit."""
    out = merge(tmp_path, two_models(tiny_family, "{}", 1.0, 0.0))
    for name, x in w["ft1"].items():
        assert torch.equal(out[name], x), name


def test_task_arithmetic_inner_parameters(tmp_path, tiny_family, w, layers) -> None:
    """merge_parameters reach the inner method (normalize: true makes tau_MTL the weighted mean, alpha auto = 1)."""
    out = merge(
        tmp_path,
        two_models(
            tiny_family,
            "{merge_parameters: {normalize: true}, beta: 0.5}",
            1.0,
            3.0,
            "output: {dtype: float32}",
        ),
    )
    for name, base in w["base"].items():
        lam = expected_scale(name, 1.0, 0.5, layers)
        b = base.double()
        mean_tv = 0.25 * (w["ft1"][name].double() - b) + 0.75 * (w["ft2"][name].double() - b)
        assert torch.allclose(out[name].double(), b + lam * mean_tv, rtol=1e-6, atol=1e-7), name


# --------------------------------------------------------------------------------------------------
# The model-wide pass for other inner methods
# --------------------------------------------------------------------------------------------------


def _model_stock_tv(base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's model_stock minus the base, float64 (per tensor)."""
    b = base.double().reshape(-1)
    taus = [x.double().reshape(-1) - b for x in xs]
    c = float((taus[0] @ taus[1]) / max(float(taus[0].norm() * taus[1].norm()), 1e-6))
    t = 2 * c / (1 + c)
    return (t * (taus[0] + taus[1]) / 2).reshape(base.shape)


def test_auto_alpha_pass_with_model_stock_inner(tmp_path, tiny_family, w, layers) -> None:
    """alpha = (||sum tau||_1 / ||tau_MTL||_1) / T with model-wide norms, tau_MTL from model_stock."""
    out = merge(
        tmp_path,
        f"""
method: lines
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
parameters: {{merge: model_stock, beta: 0.3}}
output: {{dtype: float32}}
""",
    )
    mtl = {n: _model_stock_tv(b, [w["ft1"][n], w["ft2"][n]]) for n, b in w["base"].items()}
    summed = sum(
        float((w["ft1"][n].double() - b.double() + w["ft2"][n].double() - b.double()).abs().sum())
        for n, b in w["base"].items()
    )
    alpha = summed / sum(float(v.abs().sum()) for v in mtl.values()) / 2
    assert alpha > 0.5  # model_stock shrinks the mean (t < 1), so alpha is above 1/T
    for name, base in w["base"].items():
        lam = expected_scale(name, alpha, 0.3, layers)
        assert torch.allclose(out[name].double(), base.double() + lam * mtl[name], rtol=1e-5, atol=1e-6), name


def test_pass_agrees_with_the_task_arithmetic_shortcut(tmp_path, tiny_family, monkeypatch) -> None:
    import workbench_plugins.methods.lines as lines

    text = two_models(tiny_family, "{beta: 0.5}", 0.6, 1.1, "output: {dtype: float32}")
    short = merge(tmp_path, text, "short")
    monkeypatch.setattr(lines, "alpha_shortcut", lambda *args: None)
    passed = merge(tmp_path, text, "pass")
    for name in short:
        assert torch.allclose(short[name], passed[name], rtol=1e-6, atol=1e-7), name


def test_auto_alpha_with_per_layer_weights(tmp_path, tiny_family, w, layers) -> None:
    """Weights that vary over layers: alpha = sum_n ||sum_t w_t tau_t / sum_t w_t||_1 / sum_n ||tau_MTL||_1."""
    out = merge(
        tmp_path, two_models(tiny_family, "{beta: 0.5}", "[1.0, 0.2]", 1.0, "output: {dtype: float32}")
    )
    num = den = 0.0
    mtl = {}
    for name, base in w["base"].items():
        t = (layer_of(name) or 0) / (layers - 1)
        w1 = 1.0 + (0.2 - 1.0) * t
        b = base.double()
        mtl[name] = w1 * (w["ft1"][name].double() - b) + (w["ft2"][name].double() - b)
        num += float(mtl[name].abs().sum()) / (w1 + 1.0)
        den += float(mtl[name].abs().sum())
    alpha = num / den
    for name, base in w["base"].items():
        lam = expected_scale(name, alpha, 0.5, layers)
        assert torch.allclose(out[name].double(), base.double() + lam * mtl[name], rtol=1e-5, atol=1e-6), name


# --------------------------------------------------------------------------------------------------
# Wrapping other registered methods
# --------------------------------------------------------------------------------------------------

INNER: dict[str, tuple[dict[str, object], dict[str, object]]] = {  # (per-model, global) parameters
    "ties": ({"density": [0.2, 0.6]}, {}),  # a per-layer gradient inside merge_model_parameters
    "dare_ties": ({"density": 0.5}, {}),
    "pcb": ({}, {"pcb_ratio": 0.2}),
    "task_arithmetic": ({}, {}),
}


@pytest.mark.parametrize("inner", sorted(INNER))
def test_alpha_one_beta_zero_is_the_inner_method_with_lambda_one(tmp_path, tiny_family, inner) -> None:
    """The wrapper passes parameters, weights and the seed through unchanged (DARE's masks included)."""
    if inner not in get_registry().methods:
        pytest.skip(f"method {inner} is not registered")
    model_params, global_params = INNER[inner]
    dump = json.dumps
    alone = {
        "method": inner,
        "base": str(tiny_family["base"]),
        "seed": 7,
        "models": [
            {"model": str(tiny_family[k]), "parameters": {"weight": wt, **model_params}}
            for k, wt in (("ft1", 0.8), ("ft2", 1.0))
        ],
        "parameters": {"lambda": 1.0, **global_params},
    }
    wrapped = {
        "method": "lines",
        "base": str(tiny_family["base"]),
        "seed": 7,
        "models": [
            {
                "model": str(tiny_family[k]),
                "parameters": {"weight": wt, "merge_model_parameters": model_params},
            }
            for k, wt in (("ft1", 0.8), ("ft2", 1.0))
        ],
        "parameters": {"merge": inner, "merge_parameters": global_params, "alpha": 1.0, "beta": 0.0},
    }
    a = merge(tmp_path, dump(alone), "inner")
    b = merge(tmp_path, dump(wrapped), "wrapped")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_elementwise_inner_method_gets_row_blocks(tmp_path, tiny_family, monkeypatch) -> None:
    """Wrapping an elementwise method (task arithmetic) keeps the engine's row blocks, same result."""
    import workbench.engine.runner as engine
    import workbench_plugins.methods.lines as lines

    text = two_models(tiny_family, "{alpha: 0.4, beta: 0.5}", 0.9, 0.6)
    whole = merge(tmp_path, text, "whole")
    rows_seen = []
    original = lines.Lines.apply

    def spy(self, tensors, base, params, model_params, ctx):
        rows_seen.append(ctx.rows)
        return original(self, tensors, base, params, model_params, ctx)

    monkeypatch.setattr(lines.Lines, "apply", spy)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    blocks = merge(tmp_path, text, "blocks")
    assert any(r is not None for r in rows_seen)
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name


def test_scaled_inner_pcb_matches_its_task_vector(tmp_path, tiny_family, w, layers) -> None:
    """lines over pcb = base + lambda(l) * (pcb(lambda 1) - base), block by block."""
    fam = tiny_family
    inner = merge(
        tmp_path,
        f"method: pcb\nbase: {q(fam['base'])}\n"
        f"models: [{q(fam['ft1'])}, {q(fam['ft2'])}]\noutput: {{dtype: float32}}\n",
        "pcb",
    )
    out = merge(
        tmp_path,
        f"""
method: lines
base: {q(fam["base"])}
models: [{q(fam["ft1"])}, {q(fam["ft2"])}]
parameters: {{merge: pcb, alpha: 0.3, beta: 0.6}}
output: {{dtype: float32}}
""",
        "lines",
    )
    for name, base in w["base"].items():
        lam = expected_scale(name, 0.3, 0.6, layers)
        b = base.double()
        assert torch.allclose(
            out[name].double(), b + lam * (inner[name].double() - b), rtol=1e-6, atol=1e-7
        ), name


# --------------------------------------------------------------------------------------------------
# Recipe errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, says",
    [
        ("{merge_parameters: {lambda: 0.5}}", "cannot set 'lambda'"),
        ("{merge_parameters: {densty: 0.5}, merge: ties}", "does not take"),
        ("{merge: linear}", "does not use a base model"),
        ("{merge: lines}", "cannot be 'lines'"),
        ("{merge: nosuch}", "unknown method"),
    ],
)
def test_bad_inner_settings(tmp_path, tiny_family, params, says) -> None:
    if "ties" in params and "ties" not in get_registry().methods:
        pytest.skip("ties is not registered")
    with pytest.raises(RecipeError, match=says):
        run_recipe(parse_recipe(two_models(tiny_family, params)), out=tmp_path / "out")


def test_single_model_needs_explicit_alpha(tmp_path, tiny_family) -> None:
    with pytest.raises(RecipeError, match="give alpha explicitly"):
        run_recipe(
            parse_recipe(
                f"method: lines\nbase: {q(tiny_family['base'])}\nmodels: [{q(tiny_family['ft1'])}]\n"
            ),
            out=tmp_path / "out",
        )


def test_weight_for_an_inner_method_without_weights(tmp_path, tiny_family) -> None:
    with pytest.raises(RecipeError, match="no per-model weight"):
        run_recipe(
            parse_recipe(two_models(tiny_family, "{merge: model_stock, alpha: 0.5}", 0.5)),
            out=tmp_path / "out",
        )


def test_top_level_merge_model_parameters_are_every_models_default(tmp_path, tiny_family) -> None:
    if "ties" not in get_registry().methods:
        pytest.skip("ties is not registered")
    fam = tiny_family
    per_model = merge(
        tmp_path,
        f"""
method: lines
base: {q(fam["base"])}
models:
  - model: {q(fam["ft1"])}
    parameters: {{merge_model_parameters: {{density: 0.3}}}}
  - model: {q(fam["ft2"])}
    parameters: {{merge_model_parameters: {{density: 0.3}}}}
parameters: {{merge: ties, beta: 0.5}}
""",
        "per_model",
    )
    top = merge(
        tmp_path,
        f"""
method: lines
base: {q(fam["base"])}
models: [{q(fam["ft1"])}, {q(fam["ft2"])}]
parameters: {{merge: ties, beta: 0.5, merge_model_parameters: {{density: 0.3}}}}
""",
        "top",
    )
    for name in top:
        assert torch.equal(top[name], per_model[name]), name
