"""arcee_fusion (mergekit 0.1.5's semantics) on tiny generated models and on hand-built tensors.

Expected values are the definition evaluated here in float64 numpy from the inputs as stored, never by
the plugin: importance = |θ − b|·KL(softmax(θ) + 1e-8 ‖ softmax(b) + 1e-8) along each row (the whole
vector for a 1-D tensor), the fence t = median + 1.5·(q₃ − q₁) with quantile q the sorted values'
element ⌊q·(n − 1)⌋, and out = b + (θ − b)·[importance ≥ t]."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.method import RowBlocks, TensorContext
from workbench.recipe.schema import parse_recipe
from workbench.registry import Registry

#: float32's unit roundoff.
U32 = 2.0**-24


def _read(folder: Path) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        merged |= {name: t.double().numpy() for name, t in load_file(shard).items()}
    return merged


def _merge(tmp_path: Path, registry: Registry, text: str, name: str = "out") -> dict[str, np.ndarray]:
    run_recipe(parse_recipe(text), out=tmp_path / name, registry=registry)
    return _read(tmp_path / name)


def _native(family: dict[str, Path], models: tuple[str, ...] = ("ft1",), dtype: str = "float32") -> str:
    listed = ", ".join(json.dumps(str(family[m])) for m in models)
    return (
        f"method: arcee_fusion\nbase: {json.dumps(str(family['base']))}\nmodels: [{listed}]\n"
        f"dtype: {dtype}\noutput: {{dtype: {dtype}}}\n"
    )


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _definition(base: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(importance, the merged tensor, the fence t, the fence's scale med + 1.5(q₁ + q₃)), float64."""
    p, q = _softmax(other) + 1e-8, _softmax(base) + 1e-8
    importance = np.abs(other - base) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    ordered = np.sort(importance.ravel())
    q1, median, q3 = (ordered[int(f * (ordered.size - 1))] for f in (0.25, 0.5, 0.75))
    t = median + 1.5 * (q3 - q1)
    return importance, base + (other - base) * (importance >= t), t, median + 1.5 * (q1 + q3)


def test_the_merge_is_the_definition_on_every_tensor(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    """float32 merge against the float64 definition. The plugin computes the KL in float64 and rounds the
    scores once to float32; the fence is three float32 order statistics combined by three float32
    operations. So an element's side of the fence can differ from float64's only where
    |importance − t| ≤ 8u·(importance + med + 1.5(q₁ + q₃)) (u = 2⁻²⁴: a score's rounding, and the
    fence's); those few are counted and allowed, every other element must match, to float32 rounding
    of b + (θ − b) (the inputs are bf16, so θ − b and the sum are exact in float32 almost always)."""
    base, other = _read(tiny_family["base"]), _read(tiny_family["ft1"])
    merged = _merge(tmp_path, registry, _native(tiny_family))
    kept = dropped = near = total = 0
    for name in base:
        importance, expected, t, scale = _definition(base[name], other[name])
        close = np.abs(importance - t) <= 8 * U32 * (importance + scale)
        close &= importance != t  # an exact tie (here: all-zero scores) is exact in float32 too
        np.testing.assert_allclose(merged[name][~close], expected[~close], rtol=U32, atol=0.0, err_msg=name)
        # where the side is in doubt, the result is one of the two sides
        assert np.all((merged[name] == base[name]) | (merged[name] == other[name]) | ~close), name
        changed = base[name] != other[name]
        kept += int((expected != base[name])[~close].sum())
        dropped += int((changed & (expected == base[name]))[~close].sum())
        near += int(close.sum())
        total += base[name].size
    # both sides occur, and the fence keeps a minority (the outliers); hardly any element is in doubt
    assert 0 < kept < dropped and near <= total // 10_000, (kept, dropped, near, total)


def _ctx(name: str, shape: tuple[int, ...], **kwargs: object) -> TensorContext:
    return TensorContext.for_tensor(name, shape, **kwargs)  # type: ignore[arg-type]


def test_only_the_row_whose_softmax_moved_passes(registry: Registry) -> None:
    """Eight rows, all the same base row and the same small change (j + 1)·2⁻¹⁰, except that row 3 also
    gets +2 at one element: its KL is orders of magnitude larger, so every element of row 3 passes the
    fence, and no element of the other rows (their scores are c·(j + 1), 7 copies each: q₁ = 5c,
    median = 10c, q₃ = 14c, t = 23.5c > 16c, while row 3's smallest score is far above that)."""
    method = registry.method("arcee_fusion")()
    row = torch.linspace(-0.5, 0.5, 16)
    base = row.repeat(8, 1)
    other = base + torch.arange(1, 17) * 2.0**-10
    other[3, 0] += 2.0
    out = method.apply([other], base, method.Parameters(), [method.ModelParameters()], _ctx("w", (8, 16)))
    assert torch.equal(out[3], other[3])
    assert torch.equal(torch.cat([out[:3], out[4:]]), torch.cat([base[:3], base[4:]]))
    _, expected, _, _ = _definition(base.double().numpy(), other.double().numpy())
    np.testing.assert_array_equal(out.double().numpy(), expected)


def _vector() -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D base and a change whose size grows along it, with two outliers at the end; and element 5,
    of base probability e⁻⁴⁰/Σ (far below the 1e-8 floor), raised to 0: most of the KL is its term,
    p₅·log(p₅/(q₅ + 1e-8)), so the floor sets the KL's value."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1000, generator=gen)
    base[5] = -40.0
    step = torch.arange(1000, dtype=torch.float32) * 2.0**-16
    step[-2:] = torch.tensor([0.25, 0.5])
    other = base + step * torch.where(torch.arange(1000) % 2 == 0, 1.0, -1.0)
    other[5] = 0.0
    return base, other


def test_a_vector_is_one_row_whole_or_in_element_blocks(registry: Registry) -> None:
    """A 1-D tensor's KL is over the whole vector: with |θ − b| growing along it, the elements that pass
    are the outliers of |θ − b| itself (the fence scales with the one KL). Fed as element ranges, as the
    engine feeds a large 1-D tensor to a blockwise method, it merges to the same tensor."""
    method = registry.method("arcee_fusion")()
    params, model_params = method.Parameters(), [method.ModelParameters()]
    base, other = _vector()
    whole = method.apply([other], base, params, model_params, _ctx("model.norm.weight", (1000,)))
    _, expected, _, _ = _definition(base.double().numpy(), other.double().numpy())
    np.testing.assert_array_equal(whole.double().numpy(), expected)
    kept = torch.nonzero(whole != base).flatten().tolist()
    assert kept == [5, 998, 999]  # t ≈ (499 + 1.5·500)·2⁻¹⁶·KL: above every change but the outliers

    ranges = [(start, min(start + 128, 1000)) for start in range(0, 1000, 128)]

    def read(rows: tuple[int, int] | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        assert rows is not None
        return [other[rows[0] : rows[1]]], base[rows[0] : rows[1]]

    ctx = _ctx("model.norm.weight", (1000,))
    stats = method.tensor_statistics(RowBlocks((1000,), ranges, read), params, model_params, ctx)
    p, q = (_softmax(v.double().numpy()) + 1e-8 for v in (other, base))
    assert stats.kl == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-12)  # float64, whole vector
    blocks = [
        method.apply(
            *read(rows), params, model_params, _ctx("model.norm.weight", (1000,), rows=rows, statistics=stats)
        )
        for rows in ranges
    ]
    assert torch.equal(torch.cat(blocks), whole)


def test_equal_scores_all_reach_the_fence(registry: Registry) -> None:
    """The fence is reached with ≥: where every score is the same (here: one change size), t is that
    score and θ is taken whole, as in mergekit."""
    method = registry.method("arcee_fusion")()
    base = (torch.arange(16) / 16 - 0.5).repeat(4, 1)  # multiples of 2⁻⁴: every θ − b exactly ±1/8
    other = base + torch.where(torch.arange(16) < 8, 0.125, -0.125)
    out = method.apply([other], base, method.Parameters(), [method.ModelParameters()], _ctx("w", (4, 16)))
    assert torch.equal(out, other)


@pytest.mark.parametrize("chunk", [300, 16], ids=["row-blocks", "one-row-and-element-blocks"])
def test_blocks_merge_to_the_whole_tensor_result(
    tiny_family: dict[str, Path],
    tmp_path: Path,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
) -> None:
    """The fence comes from the whole tensor's order statistics and a vector's KL from its whole length:
    fed in small row blocks (and, at 16 elements, the 64-element norms in element blocks), the merge is
    the same, bit for bit."""
    import workbench.engine.runner as runner

    whole = _merge(tmp_path, registry, _native(tiny_family), "whole")
    method = type(registry.method("arcee_fusion")())
    seen: dict[str, list[tuple[int, int] | None]] = {}
    apply = method.apply

    def spy(self, tensors, base, params, model_params, ctx):  # type: ignore[no-untyped-def]
        seen.setdefault(ctx.name, []).append(ctx.rows)
        return apply(self, tensors, base, params, model_params, ctx)

    monkeypatch.setattr(method, "apply", spy)
    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", chunk)
    blocks = _merge(tmp_path, registry, _native(tiny_family), "blocks")
    assert len(seen["model.embed_tokens.weight"]) > 1
    assert (len(seen["model.norm.weight"]) > 1) == (chunk < 64)  # a 1-D tensor split into element ranges
    assert set(whole) == set(blocks)
    for name in whole:
        np.testing.assert_array_equal(blocks[name], whole[name], err_msg=name)


def test_it_takes_exactly_one_model_besides_the_base(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    """The declaration (one model at most and at least) is checked while planning; a direct call
    (another method wrapping this one) gets the same kind of error."""
    with pytest.raises(RecipeError, match="arcee_fusion.*at most 1"):
        _merge(tmp_path, registry, _native(tiny_family, ("ft1", "ft2")))
    method = registry.method("arcee_fusion")()
    x = torch.ones(2, 4)
    with pytest.raises(RecipeError, match="arcee_fusion.*exactly one"):
        method.apply([x, x], x, method.Parameters(), [method.ModelParameters()] * 2, _ctx("w", (2, 4)))


def test_it_needs_a_base(tiny_family: dict[str, Path], tmp_path: Path, registry: Registry) -> None:
    text = f"method: arcee_fusion\nmodels: [{json.dumps(str(tiny_family['ft1']))}]\n"
    with pytest.raises(RecipeError, match="arcee_fusion.*base"):
        _merge(tmp_path, registry, text)


@pytest.mark.parametrize("base_listed", [False, True], ids=["as-in-mergekit-examples", "base-listed"])
def test_a_mergekit_recipe_runs_unchanged(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry, base_listed: bool
) -> None:
    """mergekit's examples/arcee_fusion.yml with the tiny family's paths: the same merge as the native
    recipe (in bfloat16, as it asks); a base listed among the models too is not a second model."""
    b, f1 = (json.dumps(str(tiny_family[k])) for k in ("base", "ft1"))
    listed = f"  - model: {b}\n" if base_listed else ""
    text = f"models:\n{listed}  - model: {f1}\nmerge_method: arcee_fusion\nbase_model: {b}\ndtype: bfloat16\n"
    recipe = parse_recipe(text)
    assert recipe.method == "arcee_fusion" and [m.model for m in recipe.models] == [
        tiny_family["ft1"].as_posix()
    ]
    merged = _merge(tmp_path, registry, text, "mergekit")
    native = _merge(tmp_path, registry, _native(tiny_family, dtype="bfloat16"), "native")
    assert set(merged) == set(native)
    for name in native:
        np.testing.assert_array_equal(merged[name], native[name], err_msg=name)
