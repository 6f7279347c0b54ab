"""Tests of the trimmed_mean method, as a plugin author writes them.

They run the installed plugin through the real engine (``workbench.testing`` finds it through the
registry, i.e. through this package's entry point), so install the package first:
``pip install -e '.[test]'`` then ``pytest``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workbench.errors import RecipeError
from workbench.testing import (
    Family,
    build_recipe,
    check_deterministic,
    check_identity,
    check_one_hot,
    check_streaming_memory,
    merge,
    read_model,
    tiny_family,
)

METHOD = "trimmed_mean"


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A tiny base model and four fine-tunes of it (generated, never downloaded)."""
    return tiny_family(tmp_path_factory.mktemp("family"), fine_tunes=4)


def stacked(models: list[Path]) -> dict[str, np.ndarray]:
    """Each tensor of ``models`` as one float64 array of shape (n, *shape), read with safetensors."""
    tensors = [read_model(m) for m in models]
    return {name: np.stack([t[name].double().numpy() for t in tensors]) for name in tensors[0]}


def numpy_trimmed_mean(values: np.ndarray, weights: list[float], k: int) -> np.ndarray:
    """The definition, written independently of the plugin: sort each element's values across the
    models, drop k at each end, take the weighted mean of the rest."""
    order = np.argsort(values, axis=0, kind="stable")
    kept = np.take_along_axis(values, order, axis=0)[k : len(values) - k]
    w = np.asarray(weights, dtype=np.float64)[order[k : len(values) - k]]
    return (kept * w).sum(axis=0) / w.sum(axis=0)


def assert_close_bf16(got, want: np.ndarray, name: str) -> None:
    """The output is stored in bfloat16 (8 significant bits): allow its rounding, nothing more."""
    got = got.double().numpy()
    assert got.shape == want.shape, name
    err = np.abs(got - want)
    bound = 2.0**-8 * np.abs(want) + 1e-30
    assert (err <= bound).all(), f"{name}: off by up to {err.max():.3g} (at most {bound.max():.3g} allowed)"


def test_merging_copies_of_one_model_gives_it_back(family: Family) -> None:
    check_identity(METHOD, family)  # two copies: nothing trimmed, the mean of equal values
    check_identity(METHOD, family, {"parameters": {"trim": 0.4}}, copies=3)  # the median of equal values


def test_one_hot_weights_select_one_model(family: Family) -> None:
    check_one_hot(
        METHOD,
        family,
        lambda i, n: {
            "parameters": {"trim": 0.0},
            "model_parameters": [{"weight": float(j == i)} for j in range(n)],
        },
    )


def test_two_runs_write_identical_bytes(family: Family) -> None:
    check_deterministic(METHOD, family, {"parameters": {"trim": 0.25}})


def test_streams_with_bounded_memory(tmp_path: Path) -> None:
    check_streaming_memory(METHOD, tmp_path, {"parameters": {"trim": 0.34}}, fine_tunes=3)


@pytest.mark.parametrize("trim, k", [(0.0, 0), (0.25, 1), (0.49, 1)])
def test_values_match_an_independent_trimmed_mean(family: Family, trim: float, k: int) -> None:
    weights = [1.0, 2.0, 0.5, 3.0]
    merged = merge(
        build_recipe(
            METHOD,
            family,
            {"parameters": {"trim": trim}, "model_parameters": [{"weight": w} for w in weights]},
        )
    )
    inputs = stacked(list(family.models))
    assert set(merged) == set(inputs)
    for name, values in inputs.items():
        assert_close_bf16(merged[name], numpy_trimmed_mean(values, weights, k), name)


def test_three_models_at_trim_034_give_the_median_exactly(family: Family) -> None:
    models = list(family.models[:3])
    merged = merge(build_recipe(METHOD, family, {"parameters": {"trim": 0.34}}, models=models))
    for name, values in stacked(models).items():
        median = np.median(values, axis=0)  # the middle value of three: an input value, no rounding
        assert np.array_equal(merged[name].double().numpy(), median), name


def test_trim_of_one_half_is_refused_naming_the_field(family: Family) -> None:
    with pytest.raises(RecipeError, match="trim"):
        merge(build_recipe(METHOD, family, {"parameters": {"trim": 0.5}}))


def test_negative_weight_is_refused_naming_the_field(family: Family) -> None:
    with pytest.raises(RecipeError, match="weight"):
        merge(build_recipe(METHOD, family, {"model_parameters": {"weight": -1.0}}))


def test_only_zero_weights_left_after_trimming_is_refused_naming_the_tensor(family: Family) -> None:
    # weight only on model 0: wherever model 0 holds the lowest or highest of the three values, the
    # model left after trimming has weight 0
    recipe = build_recipe(
        METHOD,
        family,
        {
            "parameters": {"trim": 0.34},
            "model_parameters": [{"weight": 1.0}, {"weight": 0.0}, {"weight": 0.0}],
        },
        models=list(family.models[:3]),
    )
    with pytest.raises(RecipeError, match=r"tensor '[^']+'.*weight 0"):
        merge(recipe)
