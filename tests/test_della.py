"""della and della_linear (DELLA's MagPrune, mergekit 0.1.5's semantics) on tiny generated models.

Expected values are DELLA evaluated here in float64 numpy: stable ranks per row, keep probabilities,
the documented counter-based draws (workbench_kernels.dare's docstring), the L1 rescale over the whole
tensor, TIES sign election and the disjoint mean, step by step as mergekit's code does them. The
plugin is never asked for an expected value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.method import model_seed, tensor_seed
from workbench.recipe.schema import parse_recipe
from workbench.registry import Registry

SEED = 7


def _hash(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x21F0AAAD)) % np.uint64(2**32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x735A2D97)) % np.uint64(2**32)
    return x ^ (x >> np.uint64(15))


def _draws(n: int, seed: int) -> np.ndarray:
    """The 24-bit draws of elements 0..n-1: h(h(i ^ seed_lo) ^ seed_hi) >> 8, as documented."""
    lo, hi = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    return (_hash(_hash(np.arange(n, dtype=np.uint64) ^ lo) ^ hi) >> np.uint64(8)).astype(np.float64)


def _probabilities(tau: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau
    n = rows.shape[1]
    if n < 2:
        return np.full(tau.shape, density)
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    return ((density - epsilon) + ranks / (n - 1) * 2 * epsilon).reshape(tau.shape)


def _pruned(tau: np.ndarray, density: float, epsilon: float, seed: int, rescale: str | None) -> np.ndarray:
    if density >= 1:
        return tau
    p = _probabilities(tau, density, epsilon)
    keep = _draws(tau.size, seed).reshape(tau.shape) < p * 2**24
    kept = np.where(keep, tau, 0.0)
    if rescale == "inverse_probability":
        return kept / p
    if rescale == "l1":
        before, after = np.abs(tau).sum(), np.abs(kept).sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    return kept


def _della(
    name: str,
    base: np.ndarray,
    models: list[np.ndarray],
    specs: list[dict[str, float]],
    *,
    consensus: bool,
    normalize: bool,
    rescale: str | None = "l1",
    scale: float = 1.0,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """(the merge, where the elected sign is within float32 rounding of flipping: a sum of the
    weighted deltas within 1e-6 of the sum of their magnitudes; those elements are compared apart)."""
    seeds = tensor_seed(seed, name)
    deltas = [
        _pruned(m - base, s["density"], s["epsilon"], model_seed(seeds, i), rescale) * s["weight"]
        for i, (m, s) in enumerate(zip(models, specs))
    ]
    weights = [s["weight"] for s in specs]
    fragile = np.zeros(base.shape, dtype=bool)
    if consensus:
        mass = sum(np.abs(d) for d in deltas)
        fragile = (np.abs(sum(deltas)) <= 1e-6 * mass) & (mass > 0)
        positive = sum(deltas) >= 0
        agree = [np.where(positive, d > 0, d < 0) for d in deltas]
        mixed = sum(np.where(a, d, 0.0) for a, d in zip(agree, deltas))
        divisor = sum(a * w for a, w in zip(agree, weights))
        if normalize:
            mixed = mixed / np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(deltas)
        if normalize:
            mixed = mixed / sum(weights)
    return base + scale * mixed, fragile


def _check(merged: np.ndarray, expected: tuple[np.ndarray, np.ndarray], name: str) -> None:
    """float32 compute against float64: the rescale factors and the sums round in their last bits."""
    value, fragile = expected
    assert fragile.mean() < 1e-2, name
    np.testing.assert_allclose(merged[~fragile], value[~fragile], rtol=2e-6, atol=1e-7, err_msg=name)


def _read(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= {name: t.double().numpy() for name, t in load_file(shard).items()}
    return out


def _merge(
    tmp_path: Path, registry: Registry, text: str, out: str = "out", seed: int = SEED
) -> dict[str, np.ndarray]:
    folder = tmp_path / out
    native = "merge_method" not in text
    recipe = text + (
        f"seed: {seed}\ndtype: float32\noutput: {{dtype: float32}}\n" if native else "dtype: float32\n"
    )
    run_recipe(parse_recipe(recipe), out=folder, registry=registry)
    return _read(folder)


def _recipe(method: str, family: dict[str, Path], specs: list[dict[str, float]], params: str = "{}") -> str:
    models = ", ".join(
        json.dumps({"model": str(family[f"ft{i + 1}"]), "parameters": s}) for i, s in enumerate(specs)
    )
    return f"method: {method}\nbase: {json.dumps(str(family['base']))}\nmodels: [{models}]\nparameters: {params}\n"


SPECS = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}, {"weight": 0.6, "density": 0.3, "epsilon": 0.1}]


@pytest.mark.parametrize(
    ("method", "consensus", "normalize"), [("della", True, True), ("della_linear", False, False)]
)
def test_della_matches_the_definition_on_every_tensor(
    tiny_family: dict[str, Path],
    tmp_path: Path,
    registry: Registry,
    method: str,
    consensus: bool,
    normalize: bool,
) -> None:
    base, models = _read(tiny_family["base"]), [_read(tiny_family[k]) for k in ("ft1", "ft2")]
    merged = _merge(tmp_path, registry, _recipe(method, tiny_family, SPECS, "{lambda: 0.9}"))
    for name in base:
        expected = _della(
            name,
            base[name],
            [m[name] for m in models],
            SPECS,
            consensus=consensus,
            normalize=normalize,
            scale=0.9,
        )
        _check(merged[name], expected, name)


def test_della_inverse_probability_and_no_rescale(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    base, models = _read(tiny_family["base"]), [_read(tiny_family[k]) for k in ("ft1", "ft2")]
    for rescale, params in (
        ("inverse_probability", "{rescale_mode: inverse_probability}"),
        (None, "{rescale: false}"),
    ):
        merged = _merge(tmp_path, registry, _recipe("della", tiny_family, SPECS, params), out=str(rescale))
        for name in base:
            expected = _della(
                name,
                base[name],
                [m[name] for m in models],
                SPECS,
                consensus=True,
                normalize=True,
                rescale=rescale,
            )
            _check(merged[name], expected, f"{rescale} {name}")


def test_magprune_keeps_the_density_and_favours_large_entries() -> None:
    """Statistical check on a large matrix: the kept fraction is density within 4 standard errors, and
    the top fifth of each row by magnitude is kept about 2·epsilon·0.8 more often than the bottom fifth."""
    from workbench_kernels.della import magprune

    tau = torch.randn(400, 500, generator=torch.Generator().manual_seed(0))
    density, epsilon = 0.4, 0.15
    kept = magprune(tau.clone(), density, epsilon, seed=123) != 0
    n = tau.numel()
    assert abs(kept.float().mean().item() - density) < 4 * (density * (1 - density) / n) ** 0.5
    ranks = tau.abs().argsort(dim=1).argsort(dim=1)
    top = kept[ranks >= 400].float().mean().item()
    bottom = kept[ranks < 100].float().mean().item()
    # mean p of the top fifth is density + 0.8 eps, of the bottom fifth density - 0.8 eps
    assert top - bottom == pytest.approx(1.6 * epsilon, abs=0.02)


def test_della_blocks_give_the_unblocked_result(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe("della", tiny_family, SPECS)
    whole = _merge(tmp_path, registry, recipe, out="whole")
    import workbench.engine.runner as runner

    # every tensor in blocks: matrices a row at a time, the 64-element norms in halves
    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 32)
    blocked = _merge(tmp_path, registry, recipe, out="blocked")
    for name in whole:
        # the L1 sums are summed per block, so a factor may differ in its last float64 bits
        np.testing.assert_allclose(blocked[name], whole[name], rtol=1e-6, atol=1e-8, err_msg=name)


def test_della_ranks_ties_by_position_and_a_single_column_by_density(
    tmp_path: Path, registry: Registry
) -> None:
    """Hand-built tensors: a row of equal magnitudes ranks by position (stable), a one-column matrix
    keeps each entry with probability density (mergekit divides 0 by 0 there)."""
    from workbench_kernels.della import keep_probabilities

    tied = torch.tensor([[0.5, -0.5, 0.5, 0.5, -0.5]])
    np.testing.assert_allclose(keep_probabilities(tied, 0.5, 0.2).numpy(), [[0.3, 0.4, 0.5, 0.6, 0.7]])
    column = torch.tensor([[3.0], [-1.0]])
    np.testing.assert_allclose(keep_probabilities(column, 0.5, 0.2).numpy(), [[0.5], [0.5]])
    vector = torch.tensor([0.1, -3.0, 2.0])
    np.testing.assert_allclose(keep_probabilities(vector, 0.5, 0.25).numpy(), [0.25, 0.75, 0.5])


def test_della_refuses_a_band_outside_the_unit_interval(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    specs = [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}]
    with pytest.raises(
        RecipeError, match=r"model 1, tensor '.+': density 0.9 ± epsilon 0.15 must lie inside"
    ):
        _merge(tmp_path, registry, _recipe("della", tiny_family, specs))
    assert not (tmp_path / "out").exists()


def test_a_mergekit_della_recipe_runs_unchanged(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    """mergekit's keys: the base listed among the models (dropped, as mergekit does), per-model
    weight/density/epsilon, global lambda, normalize, rescale and int8_mask."""
    base, models = _read(tiny_family["base"]), [_read(tiny_family[k]) for k in ("ft1", "ft2")]
    text = (
        "merge_method: della_linear\n"
        f"base_model: {json.dumps(str(tiny_family['base']))}\n"
        "models:\n"
        f"  - model: {json.dumps(str(tiny_family['base']))}\n"
        + "".join(
            f"  - model: {json.dumps(str(tiny_family[f'ft{i + 1}']))}\n    parameters: {json.dumps(s)}\n"
            for i, s in enumerate(SPECS)
        )
        + "parameters: {lambda: 1.1, normalize: true, rescale: true, int8_mask: true}\n"
    )
    merged = _merge(tmp_path, registry, text)  # a mergekit recipe has no seed: 0
    for name in base:
        expected = _della(
            name,
            base[name],
            [m[name] for m in models],
            SPECS,
            consensus=False,
            normalize=True,
            scale=1.1,
            seed=0,
        )
        _check(merged[name], expected, name)


def test_a_weight_of_zero_leaves_the_model_out(tmp_path: Path, registry: Registry) -> None:
    """A hand-built tensor: with one model at weight 0, della is that one model's pruned change."""
    for name, value in (("base", 0.0), ("a", 1.0), ("b", -5.0)):
        (tmp_path / name).mkdir()
        save_file(
            {"w": torch.full((4, 8), value) + torch.arange(32.0).view(4, 8) / 4},
            tmp_path / name / "model.safetensors",
        )
    specs = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.0, "density": 0.5, "epsilon": 0.1}]
    text = (
        f"method: della\nbase: {json.dumps(str(tmp_path / 'base'))}\nmodels: ["
        f"{json.dumps({'model': str(tmp_path / 'a'), 'parameters': specs[0]})}, "
        f"{json.dumps({'model': str(tmp_path / 'b'), 'parameters': specs[1]})}]\n"
    )
    merged = _merge(tmp_path, registry, text)["w"]
    base = _read(tmp_path / "base")["w"]
    a = _read(tmp_path / "a")["w"]
    expected = base + _pruned(a - base, 0.5, 0.1, model_seed(tensor_seed(SEED, "w"), 0), "l1")
    np.testing.assert_allclose(merged, expected, rtol=2e-6)
    assert 0 < np.count_nonzero(merged - base) < 32


@pytest.mark.parametrize("shape", [(37, 53), (300,), (5, 1), (4, 3, 6)])
@pytest.mark.parametrize("inverse", [False, True])
def test_magprune_kernel_equals_the_definition(shape: tuple[int, ...], inverse: bool) -> None:
    """The CPU kernel (sort order, draws and keep decisions in one pass) gives the torch definition's
    bits, for matrices, vectors, single columns and (through the definition) 3-D tensors."""
    from workbench_kernels.della import magprune_numba, magprune_torch

    tau = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    tau[..., :2] = 0.25  # equal magnitudes, ranked by position
    fast = magprune_numba(tau.clone(), 0.45, 0.2, seed=99, offset=1000, inverse_probability=inverse)
    reference = magprune_torch(tau.clone(), 0.45, 0.2, seed=99, offset=1000, inverse_probability=inverse)
    assert torch.equal(fast, reference)
    assert 0 < int((fast == 0).sum()) < tau.numel()
