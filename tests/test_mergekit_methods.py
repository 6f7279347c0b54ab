"""nearswap, ram, ramplus_tl, multislerp, karcher and nuslerp (mergekit 0.1.5's semantics) on tiny
generated models. Expected values are the definitions evaluated here in float64 numpy from the inputs
as stored (mergekit's algorithms step by step), never by the plugins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.engine.run import run_recipe
from workbench.recipe.schema import parse_recipe
from workbench.registry import Registry


def _read(folder: Path) -> dict[str, np.ndarray]:
    return {name: t.double().numpy() for name, t in load_file(folder / "model.safetensors").items()}


def _merge(tmp_path: Path, registry: Registry, text: str) -> dict[str, np.ndarray]:
    out = tmp_path / "out"
    run_recipe(parse_recipe(text + "dtype: float32\noutput: {dtype: float32}\n"), out=out, registry=registry)
    merged: dict[str, np.ndarray] = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged |= {name: t.double().numpy() for name, t in load_file(shard).items()}
    return merged


def _q(x: np.ndarray) -> np.ndarray:
    """float32, as the merge computes (the inputs are bf16, exact in float32)."""
    return x.astype(np.float32).astype(np.float64)


def _float_names(base: dict[str, np.ndarray]) -> list[str]:
    return [name for name in base if base[name].size]


def test_nearswap_takes_the_other_value_within_t_and_blends_beyond(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    base, other = _read(tiny_family["base"]), _read(tiny_family["ft1"])
    diffs = np.concatenate([np.abs(other[n] - base[n]).ravel() for n in base])
    t = float(np.quantile(diffs, 0.5))  # half the elements within t, half beyond
    merged = _merge(
        tmp_path,
        registry,
        f"method: nearswap\nbase: {json.dumps(str(tiny_family['base']))}\n"
        f"models: [{json.dumps(str(tiny_family['ft1']))}]\nparameters: {{t: {t!r}}}\n",
    )
    within = beyond = 0
    for name in _float_names(base):
        a, b = _q(base[name]), _q(other[name])
        w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
        np.testing.assert_allclose(merged[name], w * b + (1 - w) * a, rtol=1e-6, atol=1e-7, err_msg=name)
        within += int((w == 1).sum())
        beyond += int((w < 1).sum())
    assert within and beyond  # both branches of the definition were exercised


def _ram_expected(
    base: np.ndarray, models: list[np.ndarray], epsilon: float, boost: list[float] | None
) -> np.ndarray:
    taus = [_q(m) - _q(base) for m in models]
    changed = [np.abs(tau) > epsilon for tau in taus]
    count = np.sum(changed, axis=0)
    out = _q(base).copy()
    for i, (tau, mask) in enumerate(zip(taus, changed)):
        kept = np.where(mask, tau, 0.0)
        out += np.where(count == 1, kept * (boost[i] if boost else 1.0), 0.0)
        out += np.where(count > 1, kept / np.maximum(count, 1), 0.0)
    return out


def _epsilon(tiny_family: dict[str, Path]) -> float:
    """The median |τ| of ft1: about half of each model's entries count as changed, so unique and
    shared entries both occur."""
    base, ft1 = _read(tiny_family["base"]), _read(tiny_family["ft1"])
    return float(np.quantile(np.concatenate([np.abs(ft1[n] - base[n]).ravel() for n in base]), 0.5))


def test_ram_keeps_unique_changes_whole_and_averages_shared_ones(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    epsilon = _epsilon(tiny_family)
    base = _read(tiny_family["base"])
    models = [_read(tiny_family[k]) for k in ("ft1", "ft2")]
    merged = _merge(
        tmp_path,
        registry,
        f"method: ram\nbase: {json.dumps(str(tiny_family['base']))}\n"
        f"models: [{json.dumps(str(tiny_family['ft1']))}, {json.dumps(str(tiny_family['ft2']))}]\n"
        f"parameters: {{epsilon: {epsilon!r}}}\n",
    )
    unique = shared = 0
    for name in _float_names(base):
        expected = _ram_expected(base[name], [m[name] for m in models], epsilon, None)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)
        count = sum((np.abs(_q(m[name]) - _q(base[name])) > epsilon) for m in models)
        unique += int((count == 1).sum())
        shared += int((count == 2).sum())
    assert unique and shared


@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "blocks"])
def test_ramplus_boosts_unique_changes_by_the_shared_share_over_the_whole_tensor(
    tiny_family: dict[str, Path],
    tmp_path: Path,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int | None,
) -> None:
    """ρᵢ and λᵢ come from counts over the whole tensor: the same with the tensor fed in small row
    blocks as whole."""
    import workbench.engine.runner as runner

    if chunk is not None:
        monkeypatch.setattr(runner, "CHUNK_ELEMENTS", chunk)
    epsilon, r, alpha = _epsilon(tiny_family), 0.5, 2.0
    base = _read(tiny_family["base"])
    models = [_read(tiny_family[k]) for k in ("ft1", "ft2")]
    merged = _merge(
        tmp_path,
        registry,
        f"method: ramplus_tl\nbase: {json.dumps(str(tiny_family['base']))}\n"
        f"models: [{json.dumps(str(tiny_family['ft1']))}, {json.dumps(str(tiny_family['ft2']))}]\n"
        f"parameters: {{epsilon: {epsilon!r}, r: {r}, alpha: {alpha}}}\n",
    )
    boosted = 0
    for name in _float_names(base):
        taus = [_q(m[name]) - _q(base[name]) for m in models]
        changed = [np.abs(tau) > epsilon for tau in taus]
        count = np.sum(changed, axis=0)
        rho = [(mask & (count > 1)).sum() / max((mask & (count == 1)).sum(), epsilon) for mask in changed]
        boost = [1.0 + r * min(max(p, 0.0), alpha) for p in rho]
        boosted += any(b > 1.0 for b in boost)
        expected = _ram_expected(base[name], [m[name] for m in models], epsilon, boost)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)
    assert boosted


def test_mergekit_recipes_of_the_new_methods_run_unchanged(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    """mergekit lists the base among the models for these; its task vector is zero and is dropped."""
    b, f1, f2 = (json.dumps(str(tiny_family[k])) for k in ("base", "ft1", "ft2"))
    recipes = {
        "ram": f"merge_method: ram\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\n  - model: {f2}\n",
        "ramplus_tl": f"merge_method: ramplus_tl\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n"
        "parameters: {r: 0.2, alpha: 0.5, epsilon: 0.001}\n",
        "nearswap": f"merge_method: nearswap\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\n"
        "parameters: {t: 0.0001}\n",
        "multislerp": f"merge_method: multislerp\nbase_model: {b}\nmodels:\n  - model: {f1}\n"
        f"    parameters: {{weight: 1.0}}\n  - model: {f2}\n    parameters: {{weight: 2.0}}\n"
        "parameters: {normalize_weights: true, eps: 1.0e-8}\n",
        "nuslerp": f"merge_method: nuslerp\nbase_model: {b}\nmodels:\n  - model: {f1}\n"
        f"    parameters: {{weight: 1.0}}\n  - model: {f2}\n    parameters: {{weight: 2.0}}\n"
        "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
    }
    for method, text in recipes.items():
        recipe = parse_recipe(text)
        assert recipe.method == method and all(
            m.model != tiny_family["base"].as_posix() for m in recipe.models
        )
        result = run_recipe(recipe, out=tmp_path / method, registry=registry)
        assert (
            result.tensors > 0
            and torch.isfinite(
                next(iter(load_file(next((tmp_path / method).glob("*.safetensors"))).values())).float()
            ).all()
        )


def _multislerp_expected(vectors: list[np.ndarray], weights: list[float], eps: float = 1e-8) -> np.ndarray:
    """mergekit's algorithm step by step on the flat vectors, in float64."""
    v = np.stack([x.ravel() for x in vectors])
    w = np.asarray(weights) / np.sum(weights)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    units = v / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangents = units - (units @ mean)[:, None] * mean
    t = (tangents * w[:, None]).sum(0)
    angle = np.linalg.norm(t) + eps
    result = (mean * np.cos(angle) + t * np.sin(angle) / angle) * float((norms[:, 0] * w).sum())
    return result.reshape(vectors[0].shape)


@pytest.mark.parametrize("with_base", [False, True], ids=["models", "task-vectors"])
@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "blocks"])
def test_multislerp_is_mergekits_barycentric_slerp(
    tiny_family: dict[str, Path],
    tmp_path: Path,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    with_base: bool,
    chunk: int | None,
) -> None:
    import workbench.engine.runner as runner

    if chunk is not None:
        monkeypatch.setattr(runner, "CHUNK_ELEMENTS", chunk)
    names = ["ft1", "ft2"] if with_base else ["base", "ft1", "ft2"]
    weights = [1.0, 3.0] if with_base else [1.0, 2.0, 3.0]
    models = "".join(
        f"  - model: {json.dumps(str(tiny_family[n]))}\n    parameters: {{weight: {w}}}\n"
        for n, w in zip(names, weights)
    )
    base_line = f"base: {json.dumps(str(tiny_family['base']))}\n" if with_base else ""
    merged = _merge(tmp_path, registry, f"method: multislerp\n{base_line}models:\n{models}")
    base = _read(tiny_family["base"])
    inputs = [_read(tiny_family[n]) for n in names]
    for name in _float_names(base):
        vectors = [_q(m[name]) - (_q(base[name]) if with_base else 0.0) for m in inputs]
        if max(np.linalg.norm(v) for v in vectors) == 0:
            continue
        expected = _multislerp_expected(vectors, weights) + (_q(base[name]) if with_base else 0.0)
        np.testing.assert_allclose(merged[name], expected, rtol=2e-5, atol=2e-6, err_msg=name)


def _karcher_expected(vectors: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """mergekit's karcher_merge_tensors on flat vectors, in float64 numpy."""
    v = [x.ravel() for x in vectors]
    norms = [float(np.linalg.norm(x)) for x in v]
    valid = [i for i, n in enumerate(norms) if n > tol]
    w = 1.0 / len(valid)
    units = [v[i] / norms[i] for i in valid]
    mean = sum(w * u for u in units)
    mean = units[0].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for u in units:
            dot = float(np.clip(mean @ u, -1.0, 1.0))
            theta = np.arccos(dot)
            if theta < tol:
                continue
            tangent += w * (theta / np.sin(theta)) * (u - dot * mean)
        step = float(np.linalg.norm(tangent))
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * tangent / step
        mean /= np.linalg.norm(mean)
    return (sum(norms) / len(v) * mean).reshape(vectors[0].shape)


@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "blocks"])
def test_karcher_is_mergekits_riemannian_mean(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch, chunk
) -> None:
    import workbench.engine.runner as runner

    if chunk is not None:
        monkeypatch.setattr(runner, "CHUNK_ELEMENTS", chunk)
    names = ["base", "ft1", "ft2"]
    models = "".join(f"  - {json.dumps(str(tiny_family[n]))}\n" for n in names)
    merged = _merge(tmp_path, registry, f"method: karcher\nmodels:\n{models}")
    inputs = [_read(tiny_family[n]) for n in names]
    for name in _float_names(inputs[0]):
        expected = _karcher_expected([_q(m[name]) for m in inputs])
        np.testing.assert_allclose(merged[name], expected, rtol=2e-5, atol=2e-6, err_msg=name)


def test_a_mergekit_karcher_recipe_averages_its_base_too(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    b, f1, f2 = (json.dumps(str(tiny_family[k])) for k in ("base", "ft1", "ft2"))
    recipe = parse_recipe(
        f"merge_method: karcher\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n"
    )
    assert [m.model for m in recipe.models] == [str(tiny_family[k]) for k in ("base", "ft1", "ft2")]
    assert recipe.base is None


def _nuslerp_expected(v0: np.ndarray, v1: np.ndarray, t: float, how: str) -> np.ndarray:
    """mergekit's nuslerp() in float64 numpy: along the flattened tensor, the last dimension, or the
    first (mergekit transposes it with the last)."""
    shape = v0.shape
    if how == "flatten":
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif how == "rows" or v0.ndim == 1:
        a, b = v0.reshape(-1, shape[-1]), v1.reshape(-1, shape[-1])
    else:
        a, b = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
    ua = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-7)
    ub = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-7)
    cos = np.clip((ua * ub).sum(-1, keepdims=True), -1, 1)
    colinear = (1 - cos**2) <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    with np.errstate(divide="ignore", invalid="ignore"):
        result = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    result = np.where(colinear, (1 - t) * a + t * b, result)
    if how == "columns" and v0.ndim > 1:
        result = np.swapaxes(result, 0, -1)
    return result.reshape(shape)


@pytest.mark.parametrize("how", ["flatten", "rows", "columns"])
@pytest.mark.parametrize("with_base", [False, True], ids=["models", "task-vectors"])
def test_nuslerp_interpolates_at_the_weights_position(
    tiny_family: dict[str, Path],
    tmp_path: Path,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    with_base: bool,
) -> None:
    import workbench.engine.runner as runner

    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 100)  # row blocks: column sums must add up over them
    flags = {"flatten": (True, False), "rows": (False, False), "columns": (False, True)}[how]
    base_line = f"base: {json.dumps(str(tiny_family['base']))}\n" if with_base else ""
    merged = _merge(
        tmp_path,
        registry,
        f"method: nuslerp\n{base_line}models:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n    parameters: {{weight: 3.0}}\n"
        f"parameters: {{nuslerp_flatten: {str(flags[0]).lower()}, nuslerp_row_wise: {str(flags[1]).lower()}}}\n",
    )
    base, ft1, ft2 = (_read(tiny_family[k]) for k in ("base", "ft1", "ft2"))
    for name in _float_names(base):
        b = _q(base[name]) if with_base else 0.0
        expected = _nuslerp_expected(_q(ft1[name]) - b, _q(ft2[name]) - b, 0.75, how) + b
        np.testing.assert_allclose(merged[name], expected, rtol=2e-5, atol=2e-6, err_msg=name)
