"""``workbench lora extract`` (truncated SVD of a fine-tune's difference) and ``workbench lora merge``
(merge methods on the adapters' ΔW). Expectations come from the input tensors read with safetensors
and numpy's SVD, never from the code under test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_lora_inputs import TARGETS, write_peft

from workbench.errors import RecipeError
from workbench.lora.extract import extract_lora
from workbench.lora.merge import merge_loras
from workbench.registry import Registry


def adapter_delta(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW of every module of a written adapter, from its files (scale = lora_alpha / r, patterns)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
            out[f"{module}.weight"] = (alpha / a.shape[0]) * (b.double() @ a.double())
    return out


def target_names(weights: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in weights.items() if t.ndim == 2 and ".layers." in n]


def test_full_rank_extraction_reconstructs_the_finetune(
    tmp_path: Path,
    tiny_family: dict[str, Path],
    weights: dict[str, dict[str, torch.Tensor]],
    registry: Registry,
) -> None:
    report = extract_lora(
        str(tiny_family["base"]), str(tiny_family["ft1"]), tmp_path / "full", 1000, registry
    )
    deltas = adapter_delta(tmp_path / "full")
    base, tuned = weights["base"], weights["ft1"]
    assert set(deltas) == {n for n in target_names(base) if not torch.equal(base[n], tuned[n])}
    for name, delta in deltas.items():
        truth = tuned[name].double() - base[name].double()
        torch.testing.assert_close(delta, truth, rtol=0, atol=1e-5 * float(truth.abs().max()), msg=name)
        assert report.tensors and all(t.relative_error < 1e-5 for t in report.tensors)
    # norms and embeddings changed too, and a LoRA cannot carry them: reported, not silently dropped
    changed_elsewhere = {
        n for n in base if n not in target_names(base) and not torch.equal(base[n], tuned[n])
    }
    assert set(report.not_captured) == changed_elsewhere
    saved = json.loads((tmp_path / "full" / "lora_report.json").read_text())
    assert set(saved["not_captured"]) == changed_elsewhere


def test_error_falls_as_rank_grows_and_matches_the_singular_values(
    tmp_path: Path,
    tiny_family: dict[str, Path],
    weights: dict[str, dict[str, torch.Tensor]],
    registry: Registry,
) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    truth = (weights["ft1"][name].double() - weights["base"][name].double()).numpy()
    singular = np.linalg.svd(truth, compute_uv=False)
    errors = []
    for rank in (1, 4, 16, 64):
        extract_lora(
            str(tiny_family["base"]),
            str(tiny_family["ft1"]),
            tmp_path / f"r{rank}",
            rank,
            registry,
            targets={"down_proj"},
        )
        delta = adapter_delta(tmp_path / f"r{rank}")
        assert set(delta) == {n for n in weights["base"] if n.endswith("down_proj.weight")}
        error = np.linalg.norm(delta[name].numpy() - truth) / np.linalg.norm(truth)
        optimum = np.sqrt((singular[rank:] ** 2).sum() / (singular**2).sum())  # Eckart-Young
        assert error == pytest.approx(optimum, rel=1e-3, abs=1e-6)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] + 0.1


def test_extracting_identical_models_writes_nothing(
    tmp_path: Path, tiny_family: dict[str, Path], registry: Registry
) -> None:
    with pytest.raises(RecipeError, match="no target weight differs"):
        extract_lora(str(tiny_family["base"]), str(tiny_family["base"]), tmp_path / "none", 4, registry)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()


@pytest.fixture
def adapters(
    tmp_path: Path, tiny_family: dict[str, Path], weights: dict[str, dict[str, torch.Tensor]]
) -> list[Path]:
    shapes = {n: tuple(t.shape) for n, t in weights["base"].items()}
    folders = [tmp_path / "one", tmp_path / "two"]
    write_peft(folders[0], tiny_family["base"], shapes, r=4, alpha=8, seed=1)
    write_peft(folders[1], tiny_family["base"], shapes, r=2, alpha=2, seed=2)
    return folders


def test_one_adapter_merged_at_weight_one_is_itself(
    tmp_path: Path, adapters: list[Path], registry: Registry
) -> None:
    merge_loras([adapters[0]], tmp_path / "merged", registry, "task_arithmetic", weights=[1.0])
    got, want = adapter_delta(tmp_path / "merged"), adapter_delta(adapters[0])
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=0, atol=1e-5 * float(want[name].abs().max()), msg=name
        )
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "method, params, given", [("task_arithmetic", {}, [0.7, -0.4]), ("linear", {}, [3.0, 1.0])]
)
def test_weighted_sums_of_delta_w_are_exact_at_the_default_rank(
    tmp_path: Path,
    adapters: list[Path],
    registry: Registry,
    method: str,
    params: dict[str, Any],
    given: list[float],
) -> None:
    report = merge_loras(adapters, tmp_path / "merged", registry, method, params, given)
    got, first, second = (
        adapter_delta(tmp_path / "merged"),
        adapter_delta(adapters[0]),
        adapter_delta(adapters[1]),
    )
    w = np.array(given) / (sum(given) if method == "linear" else 1.0)  # linear normalises its weights
    for name in first:
        want = w[0] * first[name] + w[1] * second[name]  # not (w·B)(w·A): the factors are never averaged
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-5 * float(want.abs().max()), msg=name)
    assert {t.rank for t in report.tensors} == {6}  # 4 + 2


def test_ties_merge_is_factored_at_the_asked_rank_with_its_error_reported(
    tmp_path: Path, adapters: list[Path], registry: Registry
) -> None:
    report = merge_loras(adapters, tmp_path / "merged", registry, "ties", {"density": 0.5}, rank=3)
    assert {t.rank for t in report.tensors} == {3}
    assert all(0 < t.relative_error < 1 for t in report.tensors)  # TIES' sparse result is not rank 3
    saved = json.loads((tmp_path / "merged" / "lora_report.json").read_text())
    assert set(saved["tensors"]) == {f"{m}.weight" for m in TARGETS}


def test_merge_refuses_a_weight_count_that_does_not_match(
    tmp_path: Path, adapters: list[Path], registry: Registry
) -> None:
    with pytest.raises(RecipeError, match="1 weights for 2 adapters"):
        merge_loras(adapters, tmp_path / "merged", registry, weights=[1.0])
    assert not (tmp_path / "merged").exists()


def test_cli_extract_and_merge(
    tmp_path: Path, tiny_family: dict[str, Path], adapters: list[Path], cli: Any
) -> None:
    from workbench.cli.main import main

    result = cli.invoke(
        main,
        [
            "lora",
            "extract",
            str(tiny_family["base"]),
            str(tiny_family["ft1"]),
            "--rank",
            "4",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "extracted" in result.output and "tensors outside the LoRA targets changed" in result.output
    result = cli.invoke(
        main,
        [
            "lora",
            "merge",
            *map(str, adapters),
            "-m",
            "ties",
            "-o",
            "density=0.5",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    result = cli.invoke(main, ["lora", "merge", *map(str, adapters), "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and "exists" in result.output


def test_merge_refuses_adapters_of_different_bases(
    tmp_path: Path,
    tiny_family: dict[str, Path],
    adapters: list[Path],
    registry: Registry,
    weights: dict[str, dict[str, torch.Tensor]],
) -> None:
    from workbench.errors import CheckpointError

    shapes = {n: tuple(t.shape) for n, t in weights["base"].items()}
    shapes[f"{TARGETS[0]}.weight"] = (48, 64)  # another model's q_proj
    write_peft(tmp_path / "other", tiny_family["base"], shapes)
    with pytest.raises(
        CheckpointError,
        match=rf"changes '{TARGETS[0]}.weight' as \(48, 64\), another adapter as \(64, 64\): they are not for one base",
    ):
        merge_loras([adapters[0], tmp_path / "other"], tmp_path / "merged", registry)
    assert not (tmp_path / "merged").exists()
