"""Model Stock: hand-worked values, mergekit's formula in float64 through the real engine, properties.

Expected values are computed here, in float64, from the input tensors (mergekit's
``merge_methods/model_stock.py`` semantics: mean pairwise cosine with the 1e-6 floor on the norm
product, t = N c / (1 + (N - 1) c), t * mean + (1 - t) * base), never with the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from merging import load_dir, merge, q

from workbench.checkpoint.synthetic import write_family
from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.method import TensorContext
from workbench.recipe.schema import parse_recipe
from workbench_plugins.methods.model_stock import ModelStock, ModelStockParameters

HALF_ULP_BF16 = 2.0**-8


def reference(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """mergekit's model_stock in float64."""
    w0 = base.double()
    ws = [m.double() for m in models]
    shape = w0.shape
    if filter_wise:
        if w0.dim() <= 1:
            w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    off = [w - w0 for w in ws]
    cos = []
    for i in range(len(off)):
        for j in range(i + 1, len(off)):
            den = (off[i].norm(dim=-1) * off[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((off[i] * off[j]).sum(-1) / den).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def ctx(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> TensorContext:
    return TensorContext(
        name="w",
        layer_index=None,
        layer_count=1,
        module_kind="other",
        shape=shape,
        device="cpu",
        compute_dtype=dtype,
        out_dtype=dtype,
        seed=0,
    )


def apply(base: list[float] | torch.Tensor, models: list, filter_wise: bool = False) -> torch.Tensor:
    b = torch.as_tensor(base, dtype=torch.float64)
    xs = [torch.as_tensor(m, dtype=torch.float64) for m in models]
    return ModelStock().apply(xs, b, ModelStockParameters(filter_wise=filter_wise), [], ctx(tuple(b.shape)))


@pytest.fixture(scope="module")
def family3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base with three fine-tunes (the session's tiny_family has two)."""
    base, *fts = write_family(tmp_path_factory.mktemp("stock"), "tiny", fine_tunes=3)
    return {"base": base, **{f"ft{i + 1}": p for i, p in enumerate(fts)}}


@pytest.fixture(scope="module")
def weights3(family3: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: load_dir(p) for k, p in family3.items()}


# --------------------------------------------------------------------------------------------------
# Hand-worked values
# --------------------------------------------------------------------------------------------------


def test_two_task_vectors_at_45_degrees() -> None:
    """tau1 = (1, 0), tau2 = (1, 1): c = 1/sqrt2, t = 2c / (1 + c) = 2 sqrt2 - 2; mean tau = (1, 0.5)."""
    out = apply([3.0, -1.0], [[4.0, -1.0], [4.0, 0.0]])
    t = 2 * math.sqrt(2) - 2
    assert torch.allclose(
        out, torch.tensor([3.0 + t, -1.0 + 0.5 * t], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_orthogonal_task_vectors_give_the_base() -> None:
    out = apply([0.5, 0.5], [[1.5, 0.5], [0.5, 2.5]])
    assert torch.equal(out, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_three_models_use_the_mean_pairwise_cosine() -> None:
    """Cosines 1, 0, 0 -> c = 1/3, t = 3c / (1 + 2c) = 3/5; mean tau = (2/3, 1/3)."""
    out = apply([0.0, 0.0], [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(out, torch.tensor([0.6 * 2 / 3, 0.6 / 3], dtype=torch.float64), atol=1e-12)


def test_filter_wise_takes_one_ratio_per_row() -> None:
    """Row 0 agrees fully (t = 1), row 1 is orthogonal (t = 0); per tensor one t would mix them."""
    base = torch.zeros(2, 2, dtype=torch.float64)
    m1 = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    m2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    out = apply(base, [m1, m2], filter_wise=True)
    assert torch.allclose(out, torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64), atol=1e-12)
    whole = apply(base, [m1, m2], filter_wise=False)
    c = 2 / 3  # <(1,1,1,0), (1,1,0,1)> / 3
    t = 2 * c / (1 + c)
    assert torch.allclose(whole, t * (m1 + m2) / 2, atol=1e-12)


def test_filter_wise_vector_is_one_row() -> None:
    """A 1-D tensor with filter_wise is a single row (as in mergekit), not one ratio per element."""
    out = apply([0.0, 0.0], [[1.0, 1.0], [1.0, 0.0]], filter_wise=True)
    assert torch.allclose(out, apply([0.0, 0.0], [[1.0, 1.0], [1.0, 0.0]], filter_wise=False), atol=0)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(out, torch.tensor([t, 0.5 * t], dtype=torch.float64), atol=1e-12)


def test_tiny_task_vectors_use_mergekits_norm_floor() -> None:
    """|tau| = 1e-4 each, identical: the norm product 1e-8 is floored at 1e-6, so c = 0.01, not 1."""
    out = apply([0.0], [[1e-4], [1e-4]])
    c = 1e-8 / 1e-6
    t = 2 * c / (1 + c)
    assert out.item() == pytest.approx(t * 1e-4, rel=1e-12)


def test_zero_task_vectors_give_the_base() -> None:
    assert torch.equal(
        apply([1.0, 2.0], [[1.0, 2.0], [1.0, 2.0]]), torch.tensor([1.0, 2.0], dtype=torch.float64)
    )


# --------------------------------------------------------------------------------------------------
# Through the engine
# --------------------------------------------------------------------------------------------------


def test_identical_finetunes_return_that_finetune(tmp_path, tiny_family) -> None:
    """c = 1 -> t = 1 -> the average of identical models, i.e. the fine-tune itself, bit for bit."""
    out = merge(
        tmp_path,
        f"""
method: model_stock
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft1"])}, {q(tiny_family["ft1"])}]
""",
    )
    ft1 = load_dir(tiny_family["ft1"])
    assert set(out) == set(ft1)
    for name, x in ft1.items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


@pytest.mark.parametrize("block", [None, 1000])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_engine_matches_float64_reference(
    tmp_path, family3, weights3, monkeypatch, filter_wise, n, block
) -> None:
    """block = 1000: the Gram sums and the row blocks are accumulated over many small blocks."""
    import workbench_plugins.methods.model_stock as ms

    if block is not None:
        monkeypatch.setattr(ms, "BLOCK", block)
    keys = [f"ft{i + 1}" for i in range(n)]
    out = merge(
        tmp_path,
        f"""
method: model_stock
base: {q(family3["base"])}
models: [{", ".join(q(family3[k]) for k in keys)}]
parameters: {{filter_wise: {str(filter_wise).lower()}}}
output: {{dtype: float32}}
""",
    )
    for name, base in weights3["base"].items():
        expected = reference(base, [weights3[k][name] for k in keys], filter_wise)
        scale = base.double().abs() + sum(weights3[k][name].double().abs() for k in keys)
        assert out[name].dtype == torch.float32
        err = (out[name].double() - expected).abs()
        assert bool((err <= 1e-4 * scale + 1e-7).all()), (name, err.max().item())
        # Not trivially the base or the average: t is strictly between 0 and 1 here.
        assert not torch.equal(out[name].double(), base.double()), name


def test_bf16_output_is_the_reference_rounded(tmp_path, tiny_family) -> None:
    out = merge(
        tmp_path,
        f"""
method: model_stock
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
""",
    )
    w = {k: load_dir(p) for k, p in tiny_family.items()}
    for name, base in w["base"].items():
        expected = reference(base, [w["ft1"][name], w["ft2"][name]], False)
        assert out[name].dtype == torch.bfloat16
        bound = (
            HALF_ULP_BF16 * expected.abs()
            + 1e-4 * (base.double().abs() + w["ft1"][name].double().abs())
            + 1e-30
        )
        assert bool(((out[name].double() - expected).abs() <= bound).all()), name


def test_filter_wise_per_layer_filter(tmp_path, family3, weights3) -> None:
    """filter_wise takes tensor-name filters like any per-layer parameter."""
    out = merge(
        tmp_path,
        f"""
method: model_stock
base: {q(family3["base"])}
models: [{q(family3["ft1"])}, {q(family3["ft2"])}]
parameters:
  filter_wise: [{{filter: mlp, value: true}}, {{value: false}}]
output: {{dtype: float32}}
""",
    )
    for name, base in weights3["base"].items():
        expected = reference(base, [weights3["ft1"][name], weights3["ft2"][name]], "mlp" in name)
        assert torch.allclose(out[name].double(), expected, rtol=1e-5, atol=1e-7), name


def test_mergekit_recipe(tmp_path, tiny_family) -> None:
    """A mergekit recipe with model_stock gives the native result."""
    native = merge(
        tmp_path,
        f"""
method: model_stock
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
""",
        "native",
    )
    mk = merge(
        tmp_path,
        f"""
merge_method: model_stock
base_model: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
  - model: {q(tiny_family["ft2"])}
parameters: {{filter_wise: false}}
""",
        "mk",
    )
    for name in native:
        assert torch.equal(native[name], mk[name]), name
    # mergekit keys its inputs by model, so a base also listed among the models is not a fine-tune.
    listed = merge(
        tmp_path,
        f"""
merge_method: model_stock
base_model: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["base"])}
  - model: {q(tiny_family["ft1"])}
  - model: {q(tiny_family["ft2"])}
""",
        "listed",
    )
    for name in native:
        assert torch.equal(native[name], listed[name]), name


@pytest.mark.parametrize(
    "models, base, says",
    [
        ("[{ft1}]", True, "at least 2"),
        ("[{ft1}, {ft2}]", False, "needs a base model"),
    ],
)
def test_input_checks(tmp_path, tiny_family, models, base, says) -> None:
    text = "method: model_stock\n" + (f"base: {q(tiny_family['base'])}\n" if base else "")
    text += "models: " + models.format(ft1=q(tiny_family["ft1"]), ft2=q(tiny_family["ft2"])) + "\n"
    with pytest.raises(RecipeError, match=says):
        run_recipe(parse_recipe(text), out=tmp_path / "out")
