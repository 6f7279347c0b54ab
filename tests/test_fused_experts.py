"""Fused expert tensors (transformers 5's ``mlp.experts.gate_up_proj``, ``[experts, ...]``) are merged
expert by expert by the task-vector methods, as the per-expert matrices of the older layout
(``block_sparse_moe.experts.N.w1``) are: the same values in either layout give the same experts.

The expected values are the per-expert layout's own merge, whose per-tensor top-k the other tests
check against independent references; here the two layouts must agree bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merging import load_dir, merge

EXPERTS, ROWS, COLS = 4, 12, 10


def _write(folder: Path, experts: torch.Tensor, fused: bool) -> None:
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    if fused:
        tensors = {"model.layers.0.mlp.experts.gate_up_proj": experts.contiguous()}
    else:
        tensors = {
            f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": experts[e].clone()
            for e in range(EXPERTS)
        }
    tensors["model.norm.weight"] = torch.ones(COLS, dtype=experts.dtype)
    save_file(tensors, folder / "model.safetensors")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """base and two fine-tunes, in both layouts; bf16, so equal magnitudes meet the top-k cut."""
    root = tmp_path_factory.mktemp("experts")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(EXPERTS, ROWS, COLS, generator=g)
    # expert 0 changes a lot, expert 3 barely: a top-k over the fused tensor would take most of
    # what it keeps from expert 0, one per expert keeps each expert's own top half
    scale = torch.tensor([1.0, 0.3, 0.1, 0.01]).view(-1, 1, 1)
    models = {"base": base}
    for k in ("ft1", "ft2"):
        models[k] = base + scale * torch.randn(EXPERTS, ROWS, COLS, generator=g)
    out: dict[str, dict[str, Path]] = {"fused": {}, "split": {}}
    for layout in out:
        for k, t in models.items():
            out[layout][k] = root / layout / k
            _write(out[layout][k], t.to(torch.bfloat16), layout == "fused")
    return out


def _recipe(paths: dict[str, Path], method: str, extra: str = "") -> str:
    models = ", ".join(
        json.dumps({"model": str(paths[k]), "parameters": {"weight": 1.0, "density": 0.5}})
        for k in ("ft1", "ft2")
    )
    return f"method: {method}\nbase: {json.dumps(str(paths['base']))}\nmodels: [{models}]\n{extra}dtype: float32\n"


@pytest.mark.parametrize("chunk", [None, 2 * ROWS * COLS, ROWS * COLS])
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ties", ""),
        ("breadcrumbs_ties", "parameters: {gamma: 0.05}\n"),
        ("dare_linear", "parameters: {rescale: false}\n"),
    ],
)
def test_a_fused_expert_tensor_merges_as_its_experts_do(
    layouts: dict[str, dict[str, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    extra: str,
    chunk: int | None,
) -> None:
    """Whole, two experts per block, one per block: expert e of the fused result equals the merge of
    expert e's own matrix (a random drop: the same rule, drawn apart per expert)."""
    import workbench.engine.runner as runner

    if chunk is not None:
        monkeypatch.setattr(runner, "CHUNK_ELEMENTS", chunk)
    fused = merge(tmp_path, _recipe(layouts["fused"], method, extra), "fused")[
        "model.layers.0.mlp.experts.gate_up_proj"
    ]
    split = merge(tmp_path, _recipe(layouts["split"], method, extra), "split")
    base = load_dir(layouts["fused"]["base"])["model.layers.0.mlp.experts.gate_up_proj"]
    kept = []
    for e in range(EXPERTS):
        own = split[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"]
        changed = fused[e] != base[e]
        kept.append(changed)
        if method != "dare_linear":  # random masks are drawn per tensor name: other draws, same rule
            assert torch.equal(fused[e], own), e
        # each expert keeps its own top half of each task vector: even expert 3, whose changes are 100x
        # smaller than expert 0's and would lose nearly every entry to a top-k over the fused tensor
        assert changed.float().mean().item() > 0.3, (e, method)
    assert not torch.equal(kept[0], kept[1])
