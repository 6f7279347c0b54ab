"""A simple method as a typed function (``workbench.method.merge_function``): the signature gives the
schemas, the base-model rule and the mode, and the method runs through the engine like a class."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, Param, PerModel, TensorContext, merge_function
from workbench.registry import load_registry
from workbench.testing import build_recipe, merge, read_model, tiny_family


@merge_function("test_soup", summary="Weighted mean of the models.", mode="elementwise", min_models=2)
def soup(
    tensors: list[torch.Tensor],
    weight: PerModel[float] = Param(1.0, description="This model's weight.", ge=0.0),
    *,
    ctx: TensorContext,
) -> torch.Tensor:
    out = sum(w * t.to(ctx.compute_dtype) for w, t in zip(weight, tensors))
    return out / sum(weight)


@merge_function("test_shift", summary="base + lambda * (first model - base).")
def shift(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    lambda_: float = Param(1.0, description="Scale of the first model's task vector.", per_layer=False),
) -> torch.Tensor:
    return base.float() + lambda_ * (tensors[0].float() - base.float())


@merge_function("test_optional_base", summary="The first model, or the base if given.")
def optional_base(tensors: list[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    return tensors[0] if base is None else base


class _Plugin:
    @hookimpl
    def register_methods(self, register: Callable[[Any], None]) -> None:
        for method in (soup, shift, optional_base):
            register(method)


@pytest.fixture(scope="module")
def registry():
    registry = load_registry(extra_plugins=[(_Plugin(), "functions")])
    assert not [p for p in registry.problems if "functions" in p], registry.problems
    return registry


def test_the_signature_gives_the_schemas_and_rules() -> None:
    assert issubclass(soup, MergeMethod) and soup.name == "test_soup" and soup.mode == "elementwise"
    assert soup.elementwise and not soup.blockwise  # API 1.0's flags follow the mode
    assert (soup.base_model, shift.base_model, optional_base.base_model) == ("unused", "required", "optional")
    assert (soup.min_models, shift.mode) == (2, "whole")
    assert list(soup.Parameters.model_fields) == [] and list(soup.ModelParameters.model_fields) == ["weight"]
    weight = soup.ModelParameters.model_fields["weight"]
    assert (weight.default, weight.description) == (1.0, "This model's weight.")
    with pytest.raises(ValueError):
        soup.ModelParameters.model_validate({"weight": -1.0})  # the bound of Param(ge=0)
    # a Python keyword is written with a trailing underscore; the recipe key drops it
    [(key, info)] = shift.Parameters.model_fields.items()
    assert (key, info.alias) == ("lambda_", "lambda")
    assert shift.Parameters.model_validate({"lambda": 0.5}).lambda_ == 0.5
    assert soup.__wrapped__ is not None and callable(soup.__wrapped__)


def test_a_parameter_without_param_is_refused() -> None:
    with pytest.raises(TypeError, match="parameter 'scale' needs a Param"):

        @merge_function("test_bad", summary="No Param default.")
        def bad(tensors: list[torch.Tensor], scale: float = 2.0) -> torch.Tensor:
            return tensors[0] * scale


def test_a_function_method_merges_like_its_formula(registry, tmp_path: Path) -> None:
    family = tiny_family(tmp_path / "family", fine_tunes=2)
    fragment = {"model_parameters": [{"weight": 1.0}, {"weight": 3.0}], "output": {"dtype": "float32"}}
    merged = merge(build_recipe("test_soup", family, fragment, registry=registry), registry=registry)
    first, second = read_model(family.models[0]), read_model(family.models[1])
    for name, tensor in merged.items():
        expected = (1.0 * first[name].double() + 3.0 * second[name].double()) / 4.0
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6)

    fragment = {"parameters": {"lambda": 0.5}, "output": {"dtype": "float32"}}
    shifted = merge(build_recipe("test_shift", family, fragment, registry=registry), registry=registry)
    base = read_model(family.base)
    for name, tensor in shifted.items():
        expected = base[name].double() + 0.5 * (first[name].double() - base[name].double())
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6)


@merge_function(
    "test_row_trim", summary="base + task vectors kept at their top entries per row.", mode="rowwise"
)
def row_trim(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    density: float = Param(0.5, description="Fraction of each row kept.", gt=0, le=1),
    *,
    ctx: TensorContext,
) -> torch.Tensor:
    """The row-wise example of docs/plugins.md."""
    base = base.to(ctx.compute_dtype)
    out = base.clone()
    for model in tensors:
        delta = model.to(ctx.compute_dtype) - base
        k = max(1, round(density * delta.shape[-1]))
        cut = delta.abs().topk(k, dim=-1).values[..., -1:]
        out += delta * (delta.abs() >= cut)
    return out


def test_a_rowwise_method_sees_whole_rows_and_whole_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With blocks forced small, every block still holds whole rows (each row keeps its own top half),
    and 1-D tensors arrive whole: the result equals the per-row formula on whole tensors."""
    import workbench.engine.runner as runner

    class Plugin:
        @hookimpl
        def register_methods(self, register: Callable[[Any], None]) -> None:
            register(row_trim)

    registry = load_registry(extra_plugins=[(Plugin(), "rowwise")])
    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 16)  # a 64-wide row per block; 1-D norms would be split
    family = tiny_family(tmp_path / "family", fine_tunes=2)
    fragment = {"parameters": {"density": 0.5}, "output": {"dtype": "float32"}}
    merged = merge(build_recipe("test_row_trim", family, fragment, registry=registry), registry=registry)
    base = {name: t.double() for name, t in read_model(family.base).items()}
    models = [read_model(m) for m in family.models]
    one_d = 0
    for name, tensor in merged.items():
        expected = base[name].clone()
        width = base[name].shape[-1]
        for model in models:
            delta = model[name].double() - base[name]
            rows = delta.reshape(-1, width)
            k = max(1, round(0.5 * width))
            keep = torch.zeros_like(rows, dtype=torch.bool)
            for r in range(rows.shape[0]):  # the top k magnitudes of each row, ties kept
                cut = rows[r].abs().sort(descending=True).values[k - 1]
                keep[r] = rows[r].abs() >= cut
            expected += (rows * keep).reshape(delta.shape)
        one_d += base[name].dim() == 1
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6)
    assert one_d > 0  # the family has norms, which must not be split
