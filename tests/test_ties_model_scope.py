"""TIES with ``scope: model``: one exact magnitude threshold per task vector over the whole model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merging import load_dir, merge, q

from workbench.errors import RecipeError


def _global_mask(
    base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], density: float
) -> dict[str, torch.Tensor]:
    """Written from the definition: sort every |tau| of the model, keep those >= the k-th largest."""
    taus = {n: ft[n].double() - base[n].double() for n in base}
    flat = torch.cat([t.reshape(-1).abs() for t in taus.values()])
    k = int(density * flat.numel())
    threshold = torch.sort(flat, descending=True).values[k - 1]
    return {n: t.abs() >= threshold for n, t in taus.items()}


def test_model_scope_keeps_the_models_top_density(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    base, ft = load_dir(tiny_family["base"]), load_dir(tiny_family["ft1"])
    density = 0.3
    text = (
        f"method: ties\nbase: {q(tiny_family['base'])}\nmodels:\n  - model: {q(tiny_family['ft1'])}\n"
        f"    parameters: {{density: {density}}}\nparameters: {{scope: model}}\noutput: {{dtype: float32}}\n"
    )
    out = merge(tmp_path, text)
    masks = _global_mask(base, ft, density)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    # Exactly the k largest, plus the entries tied with the k-th (bf16 task vectors have many ties).
    assert int(density * total) <= kept < 1.01 * density * total
    fractions = [float(m.double().mean()) for m in masks.values() if m.numel() > 100]
    assert max(fractions) - min(fractions) > 0.2  # a model-wide threshold keeps different shares per tensor
    for name, mask in masks.items():
        tau = ft[name].double() - base[name].double()
        expected = base[name].double() + torch.where(mask, tau, torch.zeros_like(tau))
        assert (out[name].double() - expected).abs().max().item() < 1e-6, name


def test_tensor_scope_is_the_default_and_differs(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    common = (
        f"method: ties\nbase: {q(tiny_family['base'])}\nmodels:\n  - model: {q(tiny_family['ft1'])}\n"
        "    parameters: {density: 0.3}\n  - model: "
        + q(tiny_family["ft2"])
        + "\n    parameters: {density: 0.3}\n"
    )
    per_tensor = merge(tmp_path, common, "a")
    explicit = merge(tmp_path, common + "parameters: {scope: tensor}\n", "b")
    model_wide = merge(tmp_path, common + "parameters: {scope: model}\n", "c")
    assert all(per_tensor[n].equal(explicit[n]) for n in per_tensor)
    assert any(not per_tensor[n].equal(model_wide[n]) for n in per_tensor)


def test_model_scope_needs_one_density_per_model(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"method: ties\nbase: {q(tiny_family['base'])}\nmodels:\n  - model: {q(tiny_family['ft1'])}\n"
        "    parameters: {density: [0.2, 0.8]}\nparameters: {scope: model}\n"
    )
    with pytest.raises(RecipeError, match="one density per model"):
        merge(tmp_path, text)
    assert not (tmp_path / "out").exists()


def test_scope_model_is_refused_for_random_dropping(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"method: dare_ties\nbase: {q(tiny_family['base'])}\n"
        f"models: [{q(tiny_family['ft1'])}]\nparameters: {{scope: model}}\n"
    )
    with pytest.raises(RecipeError, match="at random"):
        merge(tmp_path, text)
