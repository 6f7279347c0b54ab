"""Blockwise methods in the engine: statistics of each whole tensor gathered once from its row
blocks, then the row blocks merged, give the result of merging whole tensors."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from merging import merge, q

import workbench.engine.runner as engine
from workbench.registry import get_registry

#: (method, model parameters, global parameters); the last two sum partial norms per block.
CASES = {
    "ties": ("{weight: 1.0, density: 0.3}", "{}"),
    "dare_ties_inverse_density": ("{weight: 0.7, density: 0.5}", "{rescale_mode: inverse_density}"),
    "dare_linear_no_rescale": ("{weight: 0.6, density: 0.4}", "{rescale: false}"),
    "ties_model_scope": ("{weight: 1.0, density: 0.2}", "{scope: model}"),
    "breadcrumbs_ties": ("{weight: 1.0, density: 0.5, gamma: 0.05}", "{}"),
    "dare_ties": ("{weight: 0.7, density: 0.5}", "{}"),
    "slerp": ("{}", "{t: 0.3}"),
}
SUMMED_PER_BLOCK = {"dare_ties", "slerp"}


def recipe(case: str, family: dict) -> str:
    model_params, params = CASES[case]
    method = case.split("_inverse")[0].split("_no_")[0].split("_model")[0]
    base = "" if method == "slerp" else f"base: {q(family['base'])}\n"
    return f"""
method: {method}
{base}models:
  - model: {q(family["ft1"])}
    parameters: {model_params}
  - model: {q(family["ft2"])}
    parameters: {model_params}
parameters: {params}
seed: 5
"""


@pytest.mark.parametrize("impl", ["numba", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_row_blocks_give_the_whole_tensor_result(tmp_path, tiny_family, monkeypatch, impl, case):
    monkeypatch.setenv("WORKBENCH_KERNELS", impl)
    text = recipe(case, tiny_family)
    whole = merge(tmp_path, text, "whole")
    method_class = get_registry().method(text.split()[1])
    gathered: Counter[str] = Counter()
    rows_seen: dict[str, list] = defaultdict(list)
    statistics, apply = method_class.tensor_statistics, method_class.apply

    def spy_statistics(self, blocks, params, model_params, ctx):
        gathered[ctx.name] += 1
        assert ctx.rows is None and len(blocks.rows) > 1 or blocks.rows == [None]
        return statistics(self, blocks, params, model_params, ctx)

    def spy_apply(self, tensors, base, params, model_params, ctx):
        rows_seen[ctx.name].append(ctx.rows)
        return apply(self, tensors, base, params, model_params, ctx)

    monkeypatch.setattr(method_class, "tensor_statistics", spy_statistics)
    monkeypatch.setattr(method_class, "apply", spy_apply)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    blocks = merge(tmp_path, text, "blocks")

    assert set(whole) == set(blocks) and set(gathered) == set(rows_seen)
    assert all(count == 1 for count in gathered.values())  # once per tensor, not once per block
    split = [name for name, rows in rows_seen.items() if len(rows) > 1]
    assert split, "no tensor was merged in row blocks"
    for name in split:
        stops = [r[1] for r in rows_seen[name]]
        assert [r[0] for r in rows_seen[name]] == [0, *stops[:-1]] and stops[-1] == whole[name].shape[0]
    for name in whole:
        if case in SUMMED_PER_BLOCK:  # partial sums grouped otherwise: at most one bf16 step apart
            a, b = whole[name].float(), blocks[name].float()
            assert torch.all((a - b).abs() <= a.abs().clamp_min(1e-30) * 2.0**-7), name
        else:
            assert torch.equal(whole[name], blocks[name]), name


def test_row_blocks_are_aligned_where_the_row_length_allows():
    """Blockwise methods start their blocks at multiples of ALIGN_ELEMENTS, so that partial sums per
    fixed block are the whole tensor's; elementwise methods only bound the block size."""
    from types import SimpleNamespace

    tensor = SimpleNamespace(shape=(32000, 2048))
    blocks = engine.row_blocks(tensor, True, engine.ALIGN_ELEMENTS)  # type: ignore[arg-type]
    assert all(start * 2048 % engine.ALIGN_ELEMENTS == 0 for start, _ in blocks)
    assert max(stop - start for start, stop in blocks) * 2048 <= 2 * engine.CHUNK_ELEMENTS
    odd = SimpleNamespace(shape=(5000, 4099))  # alignment would need 2**18 rows: bounded blocks instead
    blocks = engine.row_blocks(odd, True, engine.ALIGN_ELEMENTS)  # type: ignore[arg-type]
    assert max(stop - start for start, stop in blocks) * 4099 <= engine.CHUNK_ELEMENTS
    assert blocks[-1][1] == 5000
