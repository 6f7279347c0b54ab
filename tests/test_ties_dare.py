"""TIES, DARE and Model Breadcrumbs: hand-made references, properties, and merges through the engine.

Hand-made cases call ``apply`` on small tensors whose results are worked out by hand below. Engine
merges run on the session's tiny bf16 models through ``run_recipe``; outputs are read back with
safetensors and compared with an independent float64 computation written here (top-k by Python
sorting; DARE masks from the documented seed contract: a CPU ``torch.Generator`` seeded with
sha256("<tensor seed>:<model index>"), an entry kept when its uniform float32 draw is below density).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from merging import BF16_HALF_ULP, gradient, layer_t, merge, q
from safetensors.torch import save_file

from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.method import TensorContext
from workbench.recipe.schema import parse_recipe
from workbench_kernels.sparsify import MagnitudeBand
from workbench_plugins.methods._task_vectors import Thresholds

METHODS = ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
CONSENSUS = {
    "ties": True,
    "dare_ties": True,
    "breadcrumbs_ties": True,
    "dare_linear": False,
    "breadcrumbs": False,
}

# --------------------------------------------------------------------------------------------------
# Helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------------


def entries(models: list[tuple[Path, str]]) -> str:
    return "\n".join(f"  - model: {q(path)}\n    parameters: {params}" for path, params in models)


def sha_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def dare_mask(recipe_seed: int, name: str, index: int, shape: torch.Size, density: float) -> torch.Tensor:
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    seed = sha_seed(f"{sha_seed(f'{recipe_seed}:{name}')}:{index}")

    def h(x: torch.Tensor) -> torch.Tensor:  # the documented 32-bit hash, on int64 (no overflow)
        x = x ^ (x >> 16)
        x = (x * 0x21F0AAAD) % 2**32
        x = x ^ (x >> 15)
        x = (x * 0x735A2D97) % 2**32
        return x ^ (x >> 15)

    i = torch.arange(math.prod(shape), dtype=torch.int64)
    return ((h(h(i ^ (seed % 2**32)) ^ (seed // 2**32)) >> 8) < round(density * 2**24)).reshape(shape)


def band_mask64(tau: torch.Tensor, density: float, gamma: float = 0.0) -> torch.Tensor:
    """Keep floor(density n) entries after the floor(gamma n) largest (cut down to fit), ranked by a
    stable sort of decreasing magnitude (equal magnitudes: the earlier entry ranks higher)."""
    n = tau.numel()
    if density >= 1:
        return torch.ones(tau.shape, dtype=torch.bool)
    k = math.floor(round(density * n, 6))
    n_top = min(math.floor(round(gamma * n, 6)), n - k)
    values = tau.reshape(-1).tolist()
    ranked = sorted(range(n), key=lambda i: -abs(values[i]))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[ranked[n_top : n_top + k]] = True
    return keep.reshape(tau.shape)


def gta64(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    ws: list[float],
    masks: list[torch.Tensor],
    rescale: str | None,
    densities: list[float],
    consensus: bool,
    normalize: bool,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 merge: (expected, error scale, elements whose elected sign is ambiguous)."""
    b = base.double()
    deltas, scale = [], b.abs().clone()
    for x, w, m, d in zip(xs, ws, masks, densities):
        if w == 0:
            continue
        tau = x.double() - b
        kept = tau * m
        f = 1.0
        if rescale == "l1" and d < 1:
            before, after = tau.abs().sum().item(), kept.abs().sum().item()
            f = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        elif rescale == "inverse_density" and d < 1:
            f = 1.0 / d if d > 0 else 1.0
        deltas.append((w * f * kept, w))
        scale += abs(lam * w * f) * (kept.abs() + x.double().abs() * m)
    ambiguous = torch.zeros(b.shape, dtype=torch.bool)
    if not deltas:
        return b, scale, ambiguous
    total = sum(d for d, _ in deltas)
    if consensus:
        ambiguous = total.abs() <= 1e-6 * sum(d.abs() for d, _ in deltas)
        ambiguous &= total != 0
        positive = total >= 0
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for d, w in deltas:
            agree = torch.where(positive, d > 0, d < 0)
            mixed += torch.where(agree, d, 0.0)
            div += w * agree
        if normalize:
            mixed = mixed / torch.where(div == 0, 1.0, div)
            scale = scale / torch.where(div == 0, 1.0, div.abs())
    else:
        mixed = total
        if normalize:
            wsum = sum(w for _, w in deltas)
            mixed, scale = mixed / wsum, scale / abs(wsum)
    return b + lam * mixed, scale + (lam * mixed).abs(), ambiguous


def assert_bf16_close(
    out: torch.Tensor,
    expected: torch.Tensor,
    scale: torch.Tensor,
    name: str,
    skip: torch.Tensor | None = None,
) -> None:
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape, name
    diff = (out.double() - expected).abs()
    bad = diff > BF16_HALF_ULP * expected.abs() + 1e-5 * scale + 1e-30
    if skip is not None:
        assert int(skip.sum()) <= 2, f"{name}: {int(skip.sum())} elements with an ambiguous sign"
        bad &= ~skip
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} of {bad.numel()} elements off"


def method_instance(name: str):
    from workbench.registry import get_registry

    return get_registry().method(name)()


def ctx_for(
    shape: tuple[int, ...], seed: int = 0, state: object = None, dtype: torch.dtype = torch.float32
) -> TensorContext:
    return TensorContext(
        name="w",
        layer_index=None,
        layer_count=1,
        module_kind="other",
        shape=shape,
        device="cpu",
        compute_dtype=torch.float32,
        out_dtype=dtype,
        seed=seed,
        state=state,
    )


def apply(
    method: str, base: torch.Tensor, xs: list[torch.Tensor], params: dict, model_params: list[dict], **ctx
) -> torch.Tensor:
    m = method_instance(method)
    p = m.Parameters.model_validate(params)
    mps = [m.ModelParameters.model_validate(mp) for mp in model_params]
    return m.apply(xs, base, p, mps, ctx_for(tuple(base.shape), **ctx))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_task_vectors_of_the_fixtures_are_exact_in_float32(weights):
    """The float64 expectations below assume x - base is exact in float32 (so top-k orders agree)."""
    for name, b in weights["base"].items():
        for k in ("ft1", "ft2"):
            tau = weights[k][name].double() - b.double()
            assert torch.equal(tau.float().double(), tau), name


# --------------------------------------------------------------------------------------------------
# Hand-made references
# --------------------------------------------------------------------------------------------------

BASE = torch.full((2, 3), 10.0)
TAU1 = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.5, -4.0]])
TAU2 = torch.tensor([[-3.0, 1.0, 1.0], [0.0, 0.5, 2.0]])
TAU3 = torch.tensor([[1.0, -3.0, 1.0], [0.0, 0.5, 2.0]])


@pytest.mark.parametrize(
    "normalize, expected",
    [
        # density 0.5 keeps 3 of 6: tau1 -> 4, 3, -2; tau3 -> -3, 2 and the first of its two 1s (tied
        # at the threshold: exactly k are kept, the earlier entry first): [1, -3, 0 | 0, 0, 2].
        # Sums [1, -5, 3 | 0, 0, -2] elect + - + + + -; agreeing entries are averaged (or summed).
        (True, [[1.0, -2.5, 3.0], [0.0, 0.0, -4.0]]),
        (False, [[1.0, -5.0, 3.0], [0.0, 0.0, -4.0]]),
    ],
)
def test_ties_by_hand_sign_conflicts_and_ties_at_threshold(normalize, expected):
    out = apply(
        "ties",
        BASE,
        [BASE + TAU1, BASE + TAU3],
        {"normalize": normalize},
        [{"density": 0.5}, {"density": 0.5}],
    )
    assert out.tolist() == (BASE + torch.tensor(expected)).tolist()


def test_ties_by_hand_weights_and_lambda():
    # Weighted: tau1 * 2 -> [0, -4, 6 | 0, 0, -8]; tau2 -> [-3, 1, 0 | 0, 0, 2] (of its tied 1s, the
    # first is kept); sums [-3, -3, 6 | 0, 0, -6]. Disjoint weighted mean: [-3/1, -4/2, 6/2 | 0, 0, -8/2],
    # then times lambda 0.5.
    out = apply(
        "ties",
        BASE,
        [BASE + TAU1, BASE + TAU2],
        {"lambda": 0.5},
        [{"density": 0.5, "weight": 2.0}, {"density": 0.5}],
    )
    expected = BASE + 0.5 * torch.tensor([[-3.0, -2.0, 3.0], [0.0, 0.0, -4.0]])
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)


def test_ties_zero_task_vector_changes_nothing():
    alone = apply("ties", BASE, [BASE + TAU1], {}, [{"density": 0.5}])
    with_zero = apply("ties", BASE, [BASE + TAU1, BASE.clone()], {}, [{"density": 0.5}, {"density": 0.5}])
    assert torch.equal(alone, with_zero)
    assert alone.tolist() == (BASE + torch.tensor([[0.0, -2.0, 3.0], [0.0, 0.0, -4.0]])).tolist()
    assert torch.equal(apply("ties", BASE, [BASE.clone()], {}, [{"density": 0.3}]), BASE)


@pytest.mark.parametrize("method", METHODS)
def test_density_zero_gives_the_base_and_density_one_keeps_everything(method):
    assert torch.equal(
        apply(method, BASE, [BASE + TAU1, BASE + TAU2], {}, [{"density": 0.0}, {"density": 0.0}]), BASE
    )
    out = apply(method, BASE, [BASE + TAU1], {}, [{"density": 1.0}])
    assert torch.equal(out, BASE + TAU1)


def test_breadcrumbs_by_hand():
    base = torch.zeros(10)
    tau = torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10])
    # gamma 0.2 drops 10 and 9, density 0.5 keeps the next five (8..4); weight 2, lambda 0.5.
    out = apply("breadcrumbs", base, [tau], {"lambda": 0.5}, [{"density": 0.5, "gamma": 0.2, "weight": 2.0}])
    assert out.tolist() == [0, 0, 0, -4, 5, -6, 7, -8, 0, 0]
    # With consensus against a second vector that disagrees on 5 and 7 with a larger mass.
    other = torch.tensor([0.0, 0, 0, 0, -9, 0, -9, 0, 0, 0])
    out = apply(
        "breadcrumbs_ties", base, [tau, other], {}, [{"density": 0.5, "gamma": 0.2}, {"density": 1.0}]
    )
    assert out.tolist() == [0, 0, 0, -4, -9, -6, -9, -8, 0, 0]


def test_dare_l1_rescale_matches_the_norm_and_inverse_density_is_exact():
    gen = torch.Generator().manual_seed(0)
    base, x = torch.randn(40, 50, generator=gen), torch.randn(40, 50, generator=gen)
    tau = (x - base).double()
    out = apply("dare_linear", base, [x], {}, [{"density": 0.3}], seed=4).double() - base.double()
    kept = out != 0
    assert 0.2 < kept.double().mean().item() < 0.4
    factor = (out[kept] / tau[kept]).mean().item()
    assert torch.allclose(out[kept], factor * tau[kept], rtol=1e-5, atol=1e-5)
    assert math.isclose(out.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)  # L1 matched
    paper = apply(
        "dare_linear",
        base,
        [x],
        {"rescale_mode": "inverse_density", "rescale": True},
        [{"density": 0.25}],
        seed=4,
    )
    d = paper.double() - base.double()
    kept = d != 0
    assert torch.allclose(d[kept], tau[kept] / 0.25, rtol=1e-6, atol=1e-6)
    no_rescale = apply("dare_linear", base, [x], {"rescale": False}, [{"density": 0.25}], seed=4)
    assert torch.equal(no_rescale != base, kept)  # the same mask, unscaled values
    assert torch.allclose(no_rescale[kept], x[kept], rtol=0, atol=1e-6)


def test_precomputed_threshold_from_state_replaces_top_k():
    base = torch.zeros(6)
    tau = torch.tensor([0.1, -0.6, 0.5, 2.0, -0.4, 0.5])
    state = Thresholds({0: MagnitudeBand(0.5)})  # e.g. a model-wide threshold; density alone would keep 1
    out = apply("ties", base, [tau], {}, [{"density": 0.2}], state=state)
    assert out.tolist() == pytest.approx([0.0, -0.6, 0.5, 2.0, 0.0, 0.5])
    assert apply("ties", base, [tau], {}, [{"density": 0.2}]).tolist() == [0, 0, 0, 2.0, 0, 0]


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_is_bit_identical_with_one_and_two_threads(method, threads):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(700, 900, generator=gen).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(700, 900, generator=gen)).to(torch.bfloat16) for _ in range(3)]
    model_params = [
        {"density": 0.3, "weight": 1.0},
        {"density": 0.6, "weight": 0.5},
        {"density": 0.45, "weight": 0.8},
    ]
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(
            apply(method, base, xs, {"rescale": True}, model_params, seed=12345, dtype=torch.bfloat16)
        )
    assert torch.equal(results[0], results[1])


# --------------------------------------------------------------------------------------------------
# Engine merges against float64
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rescale", [None, "l1", "inverse_density"])
def test_engine_merge_matches_float64(tmp_path, tiny_family, weights, method, rescale):
    ws, ds, lam, seed = [1.0, 0.5], [0.5, 0.3], 0.8, 7
    gamma = 0.05
    model_params = [
        f"{{weight: {w}, density: {d}{', gamma: ' + str(gamma) if 'breadcrumbs' in method else ''}}}"
        for w, d in zip(ws, ds)
    ]
    params = {"lambda": lam}
    if rescale is not None:
        params.update({"rescale": True, "rescale_mode": rescale})
    elif method.startswith("dare"):
        params["rescale"] = False
    out = merge(
        tmp_path,
        f"""
method: {method}
base: {q(tiny_family["base"])}
models:
{entries([(tiny_family["ft1"], model_params[0]), (tiny_family["ft2"], model_params[1])])}
parameters: {json.dumps(params)}
seed: {seed}
""",
    )
    normalize = method == "ties"  # the mergekit defaults
    assert set(out) == set(weights["base"])
    for name, b in weights["base"].items():
        xs = [weights["ft1"][name], weights["ft2"][name]]
        if method.startswith("dare"):
            masks = [dare_mask(seed, name, i, b.shape, d) for i, d in enumerate(ds)]
        else:
            g = gamma if "breadcrumbs" in method else 0.0
            masks = [band_mask64(x.double() - b.double(), d, g) for x, d in zip(xs, ds)]
        expected, scale, ambiguous = gta64(b, xs, ws, masks, rescale, ds, CONSENSUS[method], normalize, lam)
        assert_bf16_close(out[name], expected, scale, name, ambiguous)


def test_ties_per_layer_density_weight_and_lambda(tmp_path, tiny_family, weights, layers):
    out = merge(
        tmp_path,
        f"""
method: ties
base: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{density: [0.2, 0.8], weight: 1.0}}
  - model: {q(tiny_family["ft2"])}
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 1.0
parameters:
  lambda: [1.0, 0.5]
""",
    )
    seen = set()
    for name, b in weights["base"].items():
        t = layer_t(name, layers)
        ds = [gradient([0.2, 0.8], t), 0.5]
        ws = [1.0, 0.5 if "mlp" in name else 1.0]
        seen.add(round(ds[0], 6))
        xs = [weights["ft1"][name], weights["ft2"][name]]
        masks = [band_mask64(x.double() - b.double(), d) for x, d in zip(xs, ds)]
        expected, scale, ambiguous = gta64(b, xs, ws, masks, None, ds, True, True, gradient([1.0, 0.5], t))
        assert_bf16_close(out[name], expected, scale, name, ambiguous)
    assert len(seen) == layers


# --------------------------------------------------------------------------------------------------
# Properties through the engine
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_single_finetune_density_one_lambda_one_returns_it(tmp_path, tiny_family, weights, method):
    out = merge(
        tmp_path, f"method: {method}\nbase: {q(tiny_family['base'])}\nmodels: [{q(tiny_family['ft1'])}]\n"
    )
    for name, x in weights["ft1"].items():
        assert out[name].dtype == x.dtype and torch.equal(out[name], x), name


@pytest.mark.parametrize("method", METHODS)
def test_zero_weight_removes_a_model_even_with_nan(tmp_path, tiny_family, weights, method):
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    tensors = {k: v.clone() for k, v in weights["ft2"].items()}
    for v in tensors.values():
        v.view(-1)[0] = float("nan")
    save_file(tensors, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    (poisoned / "config.json").write_text((tiny_family["ft2"] / "config.json").read_text())
    head = (
        f"method: {method}\nbase: {q(tiny_family['base'])}\nseed: 3\nparameters: {{lambda: 0.9}}\nmodels:\n"
    )
    alone = merge(tmp_path, head + entries([(tiny_family["ft1"], "{density: 0.4}")]), "alone")
    both = merge(
        tmp_path,
        head + entries([(tiny_family["ft1"], "{density: 0.4}"), (poisoned, "{density: 0.4, weight: 0.0}")]),
        "both",
    )
    for name in alone:
        assert torch.equal(alone[name], both[name]), name


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_linear_density_one_is_task_arithmetic_bit_for_bit(tmp_path, tiny_family, normalize):
    body = f"""
base: {q(tiny_family["base"])}
models:
{entries([(tiny_family["ft1"], "{weight: 1.0}"), (tiny_family["ft2"], "{weight: 0.5}")])}
parameters: {{lambda: 0.7, normalize: {str(normalize).lower()}}}
"""
    dare = merge(tmp_path, "method: dare_linear" + body, "dare")
    ta = merge(tmp_path, "method: task_arithmetic" + body, "ta")
    for name in ta:
        assert torch.equal(dare[name], ta[name]), name


def test_seeds_decide_dare_masks_but_not_ties(tmp_path, tiny_family):
    def run(method: str, seed: int, tag: str = "") -> dict[str, torch.Tensor]:
        return merge(
            tmp_path,
            f"""
method: {method}
base: {q(tiny_family["base"])}
models:
{entries([(tiny_family["ft1"], "{density: 0.5}"), (tiny_family["ft2"], "{density: 0.5}")])}
seed: {seed}
""",
            f"{method}-{seed}{tag}",
        )

    a, a_again, b = run("dare_ties", 0), run("dare_ties", 0, "again"), run("dare_ties", 1)
    assert all(torch.equal(a[n], a_again[n]) for n in a)
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    assert len(differ) == len(a)
    t0, t1 = run("ties", 0), run("ties", 1)
    assert all(torch.equal(t0[n], t1[n]) for n in t0)


def test_engine_runs_are_identical_with_one_and_two_threads(tmp_path, tiny_family, threads):
    text = f"""
method: dare_ties
base: {q(tiny_family["base"])}
models:
{entries([(tiny_family["ft1"], "{density: 0.3}"), (tiny_family["ft2"], "{density: 0.6, weight: 0.7}")])}
seed: 42
"""
    torch.set_num_threads(1)
    one = merge(tmp_path, text, "one")
    torch.set_num_threads(2)
    two = merge(tmp_path, text, "two")
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_int8_mask_changes_nothing(tmp_path, tiny_family):
    body = (
        f"base: {q(tiny_family['base'])}\nmodels:\n"
        f"{entries([(tiny_family['ft1'], '{density: 0.3}'), (tiny_family['ft2'], '{density: 0.5}')])}\n"
    )
    plain = merge(tmp_path, "method: ties\n" + body, "plain")
    int8 = merge(tmp_path, "method: ties\n" + body + "parameters: {int8_mask: true}\n", "int8")
    assert all(torch.equal(plain[n], int8[n]) for n in plain)


def test_mergekit_recipe_gives_the_native_result(tmp_path, tiny_family):
    """mergekit's examples/ties.yml shape: base listed among the models, per-model gradients, int8_mask."""
    mergekit = merge(
        tmp_path,
        f"""
merge_method: ties
base_model: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["base"])}
  - model: {q(tiny_family["ft1"])}
    parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{density: 0.5, weight: [0, 0.3, 0.7, 1]}}
parameters: {{normalize: true, int8_mask: true}}
""",
        "mk",
    )
    models = entries(
        [
            (tiny_family["ft1"], "{density: [1, 0.7, 0.1], weight: 1.0}"),
            (tiny_family["ft2"], "{density: 0.5, weight: [0, 0.3, 0.7, 1]}"),
        ]
    )
    native = merge(
        tmp_path,
        f"""
method: ties
base: {q(tiny_family["base"])}
models:
{models}
""",
        "native",
    )
    assert all(torch.equal(mergekit[n], native[n]) for n in native)


def test_rescale_mode_without_rescale_is_refused(tmp_path, tiny_family):
    text = (
        f"method: ties\nbase: {q(tiny_family['base'])}\nmodels: [{q(tiny_family['ft1'])}]\n"
        f"parameters: {{rescale_mode: inverse_density}}\n"
    )
    with pytest.raises(RecipeError, match="rescale_mode has no effect"):
        run_recipe(parse_recipe(text), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_linear_normalize_with_weights_summing_to_zero_is_refused(tmp_path, tiny_family):
    text = f"""
method: dare_linear
base: {q(tiny_family["base"])}
models:
{entries([(tiny_family["ft1"], "{weight: 1.0, density: 0.5}"), (tiny_family["ft2"], "{weight: -1.0, density: 0.5}")])}
parameters: {{normalize: true}}
"""
    with pytest.raises(RecipeError, match="sum to 0"):
        run_recipe(parse_recipe(text), out=tmp_path / "out")


@pytest.mark.parametrize(
    "method, key, bad",
    [("ties", "density", 1.5), ("breadcrumbs", "gamma", -0.1), ("dare_ties", "density", -0.2)],
)
def test_out_of_range_fractions_are_refused(tmp_path, tiny_family, method, key, bad):
    text = (
        f"method: {method}\nbase: {q(tiny_family['base'])}\nmodels:\n"
        f"{entries([(tiny_family['ft1'], '{' + key + ': ' + str(bad) + '}')])}\n"
    )
    with pytest.raises(RecipeError, match=key):
        run_recipe(parse_recipe(text), out=tmp_path / "out")


def test_base_is_required(tmp_path, tiny_family):
    with pytest.raises(RecipeError, match="needs a base model"):
        run_recipe(parse_recipe(f"method: ties\nmodels: [{q(tiny_family['ft1'])}]\n"), out=tmp_path / "out")


@pytest.mark.parametrize("method", METHODS)
def test_odd_tensors_zero_d_empty_and_integer_buffers(tmp_path, method):
    """0-d and empty tensors merge like any other; integer buffers are copied from the base."""

    def write(directory: Path, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        tensors = {
            "model.layers.0.scale": torch.randn((), generator=g),
            "model.layers.0.empty": torch.zeros(0, 4),
            "model.layers.1.mlp.weight": torch.randn(5, 3, generator=g),
            "model.position_ids": torch.arange(6, dtype=torch.int64) + seed,
        }
        directory.mkdir()
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
        return tensors

    base = write(tmp_path / "base", 1)
    write(tmp_path / "a", 2)
    write(tmp_path / "b", 3)
    out = merge(
        tmp_path,
        f"""
method: {method}
base: {q(tmp_path / "base")}
models:
{entries([(tmp_path / "a", "{density: 0.5}"), (tmp_path / "b", "{density: 0.5, weight: 0.5}")])}
""",
    )
    assert set(out) == set(base)
    assert torch.equal(out["model.position_ids"], base["model.position_ids"])
    assert out["model.layers.0.empty"].shape == (0, 4)
    if not method.startswith("dare"):  # one entry, floor(0.5 * 1) = 0 kept: the base value
        assert torch.equal(out["model.layers.0.scale"], base["model.layers.0.scale"])
    assert out["model.layers.1.mlp.weight"].shape == (5, 3) and bool(
        torch.isfinite(out["model.layers.1.mlp.weight"]).all()
    )
