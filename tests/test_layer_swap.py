"""layer_swap: the language expert's outer layers around the task expert's middle layers.

Expected outputs are built here from the experts' tensors, read with safetensors, layer by layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from merging import load_dir, merge, q

from workbench.checkpoint.synthetic import LlamaShape, write_model
from workbench.errors import RecipeError
from workbench.recipe.schema import parse_recipe

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = LAYER.match(name)
    return int(match[1]) if match else None


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float32 task expert and language expert (4 layers) and a 12-layer pair."""
    root = tmp_path_factory.mktemp("swap")
    four = LlamaShape(32, 64, 4, 4, 2, 64)
    twelve = LlamaShape(32, 64, 12, 4, 2, 64)
    return {
        "task": write_model(root / "task", four, dtype="float32", variant=1),
        "language": write_model(root / "language", four, dtype="float32", variant=2),
        "task12": write_model(root / "task12", twelve, variant=1),
        "language12": write_model(root / "language12", twelve, variant=2),
    }


def recipe(task: Path, language: Path, parameters: str, roles: bool = True) -> str:
    if roles:
        models = (
            f"  - model: {q(language)}\n    parameters: {{role: language}}\n"
            f"  - model: {q(task)}\n    parameters: {{role: task}}\n"
        )
    else:
        models = f"  - {q(task)}\n  - {q(language)}\n"
    return f"method: layer_swap\nmodels:\n{models}parameters: {parameters}\n"


def test_no_swap_returns_the_task_expert_bit_exactly(tmp_path: Path, experts: dict[str, Path]) -> None:
    out = merge(tmp_path, recipe(experts["task"], experts["language"], "{bottom: 0, top: 0}"))
    task = load_dir(experts["task"])
    assert set(out) == set(task)
    assert all(out[n].dtype == task[n].dtype and torch.equal(out[n], task[n]) for n in task)


def test_all_layers_swapped_gives_the_language_experts_layers(
    tmp_path: Path, experts: dict[str, Path]
) -> None:
    out = merge(tmp_path, recipe(experts["task"], experts["language"], "{bottom: 2, top: 2}", roles=False))
    task, language = load_dir(experts["task"]), load_dir(experts["language"])
    for name in task:
        source = language if layer_of(name) is not None else task  # non_layer defaults to the task expert
        assert torch.equal(out[name], source[name]), name


@pytest.mark.parametrize("policy", ["language", "average"])
def test_non_layer_policy(tmp_path: Path, experts: dict[str, Path], policy: str) -> None:
    out = merge(
        tmp_path, recipe(experts["task"], experts["language"], f"{{bottom: 1, top: 1, non_layer: {policy}}}")
    )
    task, language = load_dir(experts["task"]), load_dir(experts["language"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        expected = (
            language[name] if policy == "language" else (task[name].double() + language[name].double()) / 2
        )
        torch.testing.assert_close(out[name].double(), expected.double(), rtol=0, atol=1e-6)


def test_zones_and_transition_layers_are_exact_convex_combinations(
    tmp_path: Path, experts: dict[str, Path]
) -> None:
    # 4 layers: 0 language (bottom), 1 transition (w = 0.25), 2 transition (w = 0.75), 3 language (top)
    params = "{bottom: 1, top: 1, transition_bottom: 1, transition_top: 1, transition_weight: [0.25, 0.75]}"
    out = merge(tmp_path, recipe(experts["task"], experts["language"], params))
    task, language = load_dir(experts["task"]), load_dir(experts["language"])
    weights = {0: 1.0, 1: 0.25, 2: 0.75, 3: 1.0}
    seen = set()
    for name in task:
        layer = layer_of(name)
        if layer is None:
            assert torch.equal(out[name], task[name])
            continue
        w = weights[layer]
        expected = w * language[name].double() + (1 - w) * task[name].double()
        if w == 1.0:
            assert torch.equal(out[name], language[name]), name
        else:
            torch.testing.assert_close(
                out[name].double(), expected, rtol=0, atol=2e-7 * float(expected.abs().max()) + 1e-12
            )
        seen.add(layer)
    assert seen == {0, 1, 2, 3}


def test_layer_map_general_form_and_no_substring_trap(tmp_path: Path, experts: dict[str, Path]) -> None:
    """12 layers, only layer 1 from the language expert: layers 10 and 11 (`.1` as a prefix) stay."""
    layer_map = ["task", "language"] + ["task"] * 10
    out = merge(tmp_path, recipe(experts["task12"], experts["language12"], f"{{layer_map: {layer_map}}}"))
    task, language = load_dir(experts["task12"]), load_dir(experts["language12"])
    for name in task:
        source = language if layer_of(name) == 1 else task
        assert torch.equal(out[name], source[name]), name
    assert any(layer_of(n) == 11 for n in task) and any(layer_of(n) == 10 for n in task)


@pytest.mark.parametrize(
    "params, message",
    [
        ("{bottom: 2, top: 2, transition_bottom: 1}", "= 5, more than the models' 4 layers"),
        ("{layer_map: [task, language]}", "layer_map has 2 entries but the models have 4 layers"),
        ("{layer_map: [task, task, task, task], bottom: 1}", "either layer_map or bottom/top"),
        (
            "{transition_bottom: 1, transition_weight: [0.5, 0.5]}",
            "transition_weight lists 2 weight(s) but there are 1",
        ),
        ("{transition_bottom: 1, transition_weight: 1.5}", "transition_weight must lie in [0, 1]"),
    ],
)
def test_impossible_configurations_are_refused_before_the_merge(
    tmp_path: Path, experts: dict[str, Path], params: str, message: str
) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        merge(tmp_path, recipe(experts["task"], experts["language"], params))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_roles_must_name_one_task_and_one_language_expert(tmp_path: Path, experts: dict[str, Path]) -> None:
    text = (
        f"method: layer_swap\nmodels:\n  - model: {q(experts['task'])}\n"
        f"    parameters: {{role: task}}\n  - {q(experts['language'])}\nparameters: {{bottom: 1}}\n"
    )
    with pytest.raises(RecipeError, match="one model role 'task' and the other role 'language'"):
        merge(tmp_path, text)


def test_validate_reports_the_layer_count_without_reading_tensors(experts: dict[str, Path]) -> None:
    from workbench.engine.plan import build_plan
    from workbench.registry import get_registry

    text = recipe(experts["task12"], experts["language12"], "{bottom: 6, top: 6, transition_top: 1}")
    with pytest.raises(RecipeError, match="more than the models' 12 layers"):
        build_plan(parse_recipe(text), get_registry())


def test_a_method_check_names_the_recipe_line(tmp_path: Path, experts: dict[str, Path]) -> None:
    """check_plan's refusal carries the recipe's file and line, as a schema error does."""
    from workbench.engine.plan import build_plan
    from workbench.recipe.schema import load_recipe
    from workbench.registry import get_registry

    path = tmp_path / "swap.yaml"
    path.write_text(recipe(experts["task"], experts["language"], "{bottom: 2, top: 2, transition_bottom: 1}"))
    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.startswith("parameters:"))
    with pytest.raises(RecipeError) as caught:
        build_plan(load_recipe(path), get_registry())
    assert str(caught.value).startswith(f"{path}:{line}: parameters: layer_swap:")
