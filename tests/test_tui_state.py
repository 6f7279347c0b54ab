"""The terminal UI's recipe state: plain recipe data that opens native and mergekit files, checks
with the CLI's messages, and saves whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from workbench.errors import RecipeError
from workbench.recipe.schema import load_recipe
from workbench.tui.state import RecipeState


def test_a_mergekit_recipe_opens_as_native_data(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "mk.yml"
    path.write_text(
        "merge_method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n    parameters: {{weight: 0.75}}\n"
        "dtype: float32\n"
    )
    state = RecipeState.open(path)
    assert state.method == "linear" and "merge_method" not in state.data
    assert [(m["model"], m["parameters"]["weight"]) for m in state.models] == [
        (str(tiny_family["ft1"]), 0.25),
        (str(tiny_family["ft2"]), 0.75),
    ]
    assert state.references == [str(tiny_family["ft1"]), str(tiny_family["ft2"])]


def test_saving_writes_a_recipe_that_loads_to_the_same_data(
    tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    state = RecipeState(
        {
            "method": "task_arithmetic",
            "base": str(tiny_family["base"]),
            "models": [str(tiny_family["ft1"])],
            "parameters": {"lambda": 0.5},
        }
    )
    assert state.references == [str(tiny_family["base"]), str(tiny_family["ft1"])]
    target = tmp_path / "out.yaml"
    state.save(target)
    assert state.path == target and [p.name for p in tmp_path.iterdir()] == ["out.yaml"]
    loaded = load_recipe(target)
    assert (loaded.method, loaded.base, [m.model for m in loaded.models], loaded.parameters) == (
        "task_arithmetic",
        str(tiny_family["base"]),
        [str(tiny_family["ft1"])],
        {"lambda": 0.5},
    )


def test_an_invalid_state_is_not_saved_and_an_old_file_survives(tmp_path: Path) -> None:
    target = tmp_path / "keep.yaml"
    target.write_text("method: linear\nmodels: [a, b]\n")
    state = RecipeState({"method": "linear", "models": [], "dtype": "float7"})
    with pytest.raises(RecipeError, match="dtype"):
        state.save(target)
    assert target.read_text() == "method: linear\nmodels: [a, b]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.yaml"]


def test_edited_yaml_replaces_the_state_only_when_valid() -> None:
    state = RecipeState({"method": "linear", "models": ["a", "b"]})
    before = dict(state.data)
    with pytest.raises(RecipeError, match=r"<composed recipe>:2: models"):
        state.set_yaml("method: linear\nmodels: 5\n")
    assert state.data == before
    state.set_yaml("method: slerp\nmodels: [a, b]\nparameters: {t: 0.3}\n")
    assert state.method == "slerp" and state.data["parameters"] == {"t": 0.3}
    assert yaml.safe_load(state.to_yaml())["parameters"] == {"t": 0.3}
