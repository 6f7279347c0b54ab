"""sce (mergekit 0.1.5's semantics) on tiny generated models and on hand-built tensors with tied
variances. Expected values are mergekit's algorithm evaluated here step by step in float64 numpy from
the inputs as stored, never by the plugin; the one rule mergekit leaves open, which of the entries
tied at the top-k cut are kept, is the project's: the earlier ones in row-major order (a stable sort)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.recipe.schema import parse_recipe
from workbench.registry import Registry


def _read(folder: Path) -> dict[str, np.ndarray]:
    return {name: t.double().numpy() for name, t in load_file(folder / "model.safetensors").items()}


def _merge(tmp_path: Path, registry: Registry, text: str, out: str = "out") -> dict[str, np.ndarray]:
    run_recipe(
        parse_recipe(text + "dtype: float32\noutput: {dtype: float32}\n"),
        out=tmp_path / out,
        registry=registry,
    )
    merged: dict[str, np.ndarray] = {}
    for shard in sorted((tmp_path / out).glob("*.safetensors")):
        merged |= {name: t.double().numpy() for name, t in load_file(shard).items()}
    return merged


def _recipe(base: Path, models: list[Path], select_topk: float | None = None) -> str:
    text = f"method: sce\nbase: {json.dumps(str(base))}\nmodels: {json.dumps([str(m) for m in models])}\n"
    return text + (f"parameters: {{select_topk: {select_topk!r}}}\n" if select_topk is not None else "")


def _q(x: np.ndarray) -> np.ndarray:
    """float32, as the merge computes (the inputs are bf16 or float32, exact in float32)."""
    return x.astype(np.float32).astype(np.float64)


def _sce_expected(base: np.ndarray, models: list[np.ndarray], select_topk: float) -> np.ndarray:
    """mergekit's sce_merge step by step (select, calculate, erase), in float64."""
    b = _q(base)
    taus = np.stack([_q(m) - b for m in models])
    if select_topk < 1:
        # population variance, ranked at float32 precision as the merge ranks it
        var = np.var(taus, axis=0).astype(np.float32).ravel()
        k = math.floor(round(np.count_nonzero(var) * select_topk, 6)) if select_topk > 0 else 0
        mask = np.zeros(var.size, dtype=bool)
        mask[np.argsort(-var, kind="stable")[:k]] = True  # ties: the earlier entry first
        taus = taus * mask.reshape(b.shape)
    weights = (taus**2).reshape(len(models), -1).mean(axis=1)
    weights = np.full(len(models), 1 / len(models)) if abs(weights.sum()) < 1e-6 else weights / weights.sum()
    majority = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    erased = weights.reshape(-1, *[1] * b.ndim) * (np.sign(taus) == majority)
    return b + (taus * erased).sum(axis=0) / np.maximum(erased.sum(axis=0), 1e-6)


def _check(merged: dict[str, np.ndarray], base: dict[str, np.ndarray], models, select_topk: float) -> None:
    for name in (n for n in base if base[n].size):
        expected = _sce_expected(base[name], [m[name] for m in models], select_topk)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("select_topk", [1.0, 0.3], ids=["no-selection", "top-30%"])
def test_sce_is_mergekits_select_calculate_erase_whatever_the_blocking(
    tiny_family: dict[str, Path],
    tmp_path: Path,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    select_topk: float,
) -> None:
    """The variance top-k and the weights are over the whole tensor; fed in row blocks, the result is
    the same bit for bit: the statistics are exact (a threshold and tie cut; float64 row sums added with
    fsum), and every block merges elementwise."""
    import workbench.engine.runner as runner

    text = _recipe(tiny_family["base"], [tiny_family["ft1"], tiny_family["ft2"]], select_topk)
    whole = _merge(tmp_path, registry, text, "whole")
    base = _read(tiny_family["base"])
    _check(whole, base, [_read(tiny_family[k]) for k in ("ft1", "ft2")], select_topk)
    if select_topk < 1:  # the selection left the base at most entries
        same = sum(int((whole[n] == _q(base[n])).sum()) for n in base)
        assert same > 0.5 * sum(v.size for v in base.values())

    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 1000)  # every 2-D tensor in several row blocks
    blocks = _merge(tmp_path, registry, text, "blocks")
    assert whole.keys() == blocks.keys()
    for name in whole:
        assert np.array_equal(whole[name], blocks[name]), name


V = np.array(  # |τ| of a hand-built tensor: four 3s, nine 2s, eleven 1s
    [[1, 2, 1, 3, 1, 2], [2, 1, 3, 1, 2, 1], [1, 2, 1, 2, 3, 1], [2, 1, 3, 1, 2, 2]], dtype=np.float32
)


def _hand_built(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Base 0.5 everywhere; a = base + V, b = base - V: the variance V² ties within each value."""
    folders = []
    for name, sign in (("base", 0.0), ("a", 1.0), ("b", -1.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.from_numpy(0.5 + sign * V)}, tmp_path / name / "model.safetensors")
        folders.append(tmp_path / name)
    return folders[0], folders[1:]


@pytest.mark.parametrize("chunk", [None, 6], ids=["whole", "row-by-row"])
def test_entries_tied_at_the_cut_are_kept_in_row_major_order(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch, chunk: int | None
) -> None:
    """select_topk 0.375 of 24 entries keeps 9: the four 3s and the first five of the nine tied 2s.
    The sign vote is +, so a's τ = V is taken where kept (weights equal by symmetry)."""
    import workbench.engine.runner as runner

    if chunk is not None:
        monkeypatch.setattr(runner, "CHUNK_ELEMENTS", chunk)
    base, models = _hand_built(tmp_path)
    merged = _merge(tmp_path, registry, _recipe(base, models, 0.375))["w"]
    kept = np.zeros(V.shape, dtype=bool)
    kept[V == 3] = True
    for row, col in [(0, 1), (0, 5), (1, 0), (1, 4), (2, 1)]:  # the first five 2s, row by row
        kept[row, col] = True
    np.testing.assert_array_equal(merged, 0.5 + np.where(kept, V, 0.0))
    np.testing.assert_array_equal(
        merged, _sce_expected(_read(base)["w"], [_read(m)["w"] for m in models], 0.375)
    )


@pytest.mark.parametrize("select_topk", [0.0, -0.5, 0.01])
def test_selecting_nothing_gives_the_base(tmp_path: Path, registry: Registry, select_topk: float) -> None:
    """select_topk ≤ 0 keeps no entry, and so does one too small for a tensor's nonzero count (k = 0)."""
    base, models = _hand_built(tmp_path)
    merged = _merge(tmp_path, registry, _recipe(base, models, select_topk))["w"]
    np.testing.assert_array_equal(merged, _read(base)["w"])


def test_copies_of_one_model_give_it_back_and_one_model_is_itself(tmp_path: Path, registry: Registry) -> None:
    base, (a, _) = _hand_built(tmp_path)
    assert np.array_equal(_merge(tmp_path, registry, _recipe(base, [a, a]), "copies")["w"], _read(a)["w"])
    assert np.array_equal(_merge(tmp_path, registry, _recipe(base, [a]), "one")["w"], _read(a)["w"])


def test_sce_takes_no_per_model_weight(tmp_path: Path, registry: Registry) -> None:
    base, (a, b) = _hand_built(tmp_path)
    text = (
        f"method: sce\nbase: {json.dumps(str(base))}\nmodels:\n"
        f"  - {{model: {json.dumps(str(a))}, parameters: {{weight: 1.0}}}}\n  - {json.dumps(str(b))}\n"
    )
    with pytest.raises(RecipeError, match="weight"):
        _merge(tmp_path, registry, text)


def test_a_mergekit_sce_recipe_runs_unchanged(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    """mergekit lists the base among the models; its task vector is zero and is dropped. int8_mask is
    accepted and changes nothing."""
    b, f1, f2 = (json.dumps(str(tiny_family[k])) for k in ("base", "ft1", "ft2"))
    recipe = parse_recipe(
        f"merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\n  - model: {f2}\n"
        "parameters: {select_topk: 0.5, int8_mask: true}\ndtype: float32\n"
    )
    assert recipe.method == "sce" and [m.model for m in recipe.models] == [
        tiny_family[k].as_posix() for k in ("ft1", "ft2")
    ]
    run_recipe(recipe, out=tmp_path / "out", registry=registry)
    merged = {
        name: t.double().numpy() for name, t in load_file(tmp_path / "out" / "model.safetensors").items()
    }
    base = _read(tiny_family["base"])
    _check(merged, base, [_read(tiny_family[k]) for k in ("ft1", "ft2")], 0.5)
