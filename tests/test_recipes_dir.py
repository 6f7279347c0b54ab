"""Every example recipe in recipes/ runs on generated tiny models, through the CLI as a user would.

The recipes name their inputs ``demo/models/...`` (base, ft1, ft2, LoRA adapters, texts) relative to
the current folder, so each test works in its own temporary folder where it generates them with
``workbench.tools.demo.write_demo_inputs``, as ``workbench demo`` does.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.cli.main import main
from workbench.recipe.schema import Recipe, load_recipe
from workbench.registry import load_registry
from workbench.tools.demo import write_demo_inputs

REPO = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml")) + sorted(RECIPES_DIR.glob("*.yml"))


def read_folder(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an output folder; when sharded, the index must list exactly the shards' tensors."""
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors file in {directory}"
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for file in files:
        for name, value in load_file(file).items():
            assert name not in tensors, f"{name} is stored twice"
            tensors[name] = value
            where[name] = file.name
    index = directory / "model.safetensors.index.json"
    if len(files) > 1:
        assert index.is_file(), "a sharded output needs model.safetensors.index.json"
        assert json.loads(index.read_text())["weight_map"] == where
    else:
        assert files[0].name == "model.safetensors"
    return tensors


def header_dtypes(file: Path) -> set[str]:
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return {entry["dtype"] for entry in header.values()}


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo/models as ``workbench demo`` writes it, generated once for this module (the tests copy it)."""
    root = tmp_path_factory.mktemp("demo-inputs")
    paths = write_demo_inputs(root / "demo" / "models")
    assert {"base", "ft1", "ft2", "lora/ft1", "lora/ft2", "data/prose.txt", "data/arithmetic.txt"} <= set(
        paths
    )
    return root / "demo" / "models"


@pytest.fixture
def demo_models(
    demo_inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh working folder holding demo/models (base, ft1, ft2, lora/, data/); returns the models' tensors."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_inputs, Path("demo/models"))
    return {name: read_folder(Path("demo/models") / name) for name in ("base", "ft1", "ft2")}


def recipe_layers(recipe: Recipe, base_layers: int) -> int:
    """The output's layer count: the slices' ranges together, else the inputs'."""
    if recipe.slices:
        return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
    return base_layers


def expected_shapes(reference: dict[str, torch.Tensor], layers: int) -> dict[str, tuple[int, ...]]:
    """The reference model's tensors with ``layers`` layers (every layer shaped as layer 0)."""
    shapes = {k: tuple(v.shape) for k, v in reference.items() if _layer(k) is None}
    for name, value in reference.items():
        if _layer(name) == 0:
            for i in range(layers):
                shapes[name.replace("model.layers.0.", f"model.layers.{i}.", 1)] = tuple(value.shape)
    return shapes


def test_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert len(RECIPES) >= 4
    assert any(n.endswith(".yml") for n in names) and any(n.endswith(".yaml") for n in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_runs_on_tiny_models(recipe: Path, demo_models, tmp_path: Path, cli) -> None:
    out = tmp_path / "merged" / recipe.stem
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert out.is_dir() and not out.with_name(out.name + ".partial").exists()
    # Nothing was written where the recipe's own output.path points (--out wins).
    assert not Path("demo/out").exists()

    parsed = load_recipe(recipe)
    merged = read_folder(out)
    reference = demo_models["base"]
    config = json.loads((out / "config.json").read_text())
    layers = recipe_layers(
        parsed, json.loads(Path("demo/models/base/config.json").read_text())["num_hidden_layers"]
    )
    assert config["num_hidden_layers"] == layers
    assert {k: tuple(v.shape) for k, v in merged.items()} == expected_shapes(reference, layers)
    for name, value in merged.items():
        assert value.dtype == torch.bfloat16, name
        assert bool(torch.isfinite(value.float()).all()), name
    for file in out.glob("*.safetensors"):
        assert header_dtypes(file) == {"BF16"}
    if parsed.method == "lora_experts":
        # Experts and routers: the dense weights stay the base's, the adapters live in mola/.
        assert all(torch.equal(merged[n], reference[n]) for n in merged)
        assert (out / "mola" / "experts.safetensors").is_file() and (
            out / "mola" / "mola_config.json"
        ).is_file()
    else:
        # Merged from the fine-tunes, so the output is not just a copy of the base.
        assert any(n in reference and not torch.equal(merged[n], reference[n]) for n in merged)
    assert config["model_type"] == "llama"
    assert (out / "workbench_recipe.yaml").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_on_tiny_models(recipe: Path, demo_models, cli) -> None:
    result = cli.invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "ok" in result.output


def test_every_builtin_method_has_a_recipe() -> None:
    """Each method the merge-workbench package registers is used by at least one recipe in recipes/
    (a mergekit recipe counts under its translated method)."""
    builtin = {
        name for name, entry in load_registry().methods.items() if entry.plugin.package == "merge-workbench"
    }
    assert builtin, "no built-in methods registered"
    used = {load_recipe(path).method for path in RECIPES}
    assert builtin - used == set(), f"methods without an example recipe in recipes/: {sorted(builtin - used)}"


def test_lora_experts_recipe_builds_its_allocation(demo_models, tmp_path: Path, cli) -> None:
    """recipes/lora_experts.yaml: allocation 1-2 over 4 layers gives 1, 1, 2, 2 experts, the single
    expert of the lower layers holding both adapters (overflow: merge)."""
    out = tmp_path / "mola"
    result = cli.invoke(main, ["run", str(RECIPES_DIR / "lora_experts.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "mola" / "mola_config.json").read_text())
    assert config["allocation"]["per_layer"] == [1, 1, 2, 2]
    assert config["experts_per_layer"]["0"] == [["ft1", "ft2"]]
    assert config["experts_per_layer"]["3"] == [["ft1"], ["ft2"]]
    assert config["router"] == "prompts"


def test_passthrough_recipe_stacks_layers(demo_models, tmp_path: Path, cli) -> None:
    """recipes/passthrough.yaml: ft1's layers [0, 3) then [1, 4), renumbered 0..5."""
    out = tmp_path / "dus"
    result = cli.invoke(main, ["run", str(RECIPES_DIR / "passthrough.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    merged, ft1 = read_folder(out), demo_models["ft1"]
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):
        name = "self_attn.q_proj.weight"
        assert torch.equal(merged[f"model.layers.{new}.{name}"], ft1[f"model.layers.{old}.{name}"])
    assert torch.equal(merged["lm_head.weight"], ft1["lm_head.weight"])


def test_task_arithmetic_recipe_shards_its_output(demo_models, tmp_path: Path, cli) -> None:
    """recipes/task_arithmetic.yaml asks for 200KB shards: the output must be sharded with an index."""
    recipe = RECIPES_DIR / "task_arithmetic.yaml"
    out = tmp_path / "ta"
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out)])  # with progress and summary
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        assert shard.stat().st_size <= 200_000 + 64 * 1024  # at most one tensor over the limit
    assert set(read_folder(out)) == set(demo_models["base"])


def test_demo_command_runs_every_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(main, ["demo", "--recipes", str(RECIPES_DIR)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    inputs = read_folder(Path("demo/models/base"))
    layers = json.loads(Path("demo/models/base/config.json").read_text())["num_hidden_layers"]
    for model in ("base", "ft1", "ft2"):
        assert (Path("demo/models") / model / "config.json").is_file()
        assert (Path("demo/models") / model / "tokenizer.json").is_file()
    for adapter in ("ft1", "ft2"):
        assert (Path("demo/models/lora") / adapter / "adapter_config.json").is_file()
    assert Path("demo/models/data/prose.txt").is_file() and Path("demo/models/data/arithmetic.txt").is_file()
    outputs = sorted(p.name for p in Path("demo/out").iterdir())
    assert outputs == sorted(p.stem for p in RECIPES)
    for recipe in RECIPES:
        out = Path("demo/out") / recipe.stem
        merged = read_folder(out)
        assert {k: tuple(v.shape) for k, v in merged.items()} == expected_shapes(
            inputs, recipe_layers(load_recipe(recipe), layers)
        )
        assert f"{recipe.name}" in result.output


def test_demo_command_is_repeatable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    """A second demo run replaces the first one's outputs instead of failing on them."""
    monkeypatch.chdir(tmp_path)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "linear.yaml").write_text((RECIPES_DIR / "linear.yaml").read_text())
    first = cli.invoke(main, ["demo", "--recipes", str(recipes)])
    assert first.exit_code == 0, first.output
    before = read_folder(Path("demo/out/linear"))
    second = cli.invoke(main, ["demo", "--recipes", str(recipes)])
    assert second.exit_code == 0, second.output
    after = read_folder(Path("demo/out/linear"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_demo_command_without_recipes_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    result = cli.invoke(main, ["demo", "--recipes", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "no recipes" in result.output


def _layer(name: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m[1]) if m else None


def test_mergekit_recipe_keeps_mergekit_semantics(demo_models, tmp_path: Path, cli) -> None:
    """recipes/mergekit_linear.yml: ft2's weight [0, 0.5, 1] is a gradient over the layers (t = i/(n-1),
    tensors outside the layers at t = 0), normalised as mergekit's linear does by default."""
    out = tmp_path / "mk"
    result = cli.invoke(main, ["run", str(RECIPES_DIR / "mergekit_linear.yml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    merged = read_folder(out)
    ft1, ft2 = demo_models["ft1"], demo_models["ft2"]
    n = json.loads(Path("demo/models/base/config.json").read_text())["num_hidden_layers"]
    for name, value in merged.items():
        layer = _layer(name)
        t = layer / (n - 1) if layer is not None else 0.0
        w2 = float(np.interp(t, [0.0, 0.5, 1.0], [0.0, 0.5, 1.0]))
        expected = (ft1[name].double() + w2 * ft2[name].double()) / (1.0 + w2)
        if w2 == 0.0:
            assert torch.equal(value, ft1[name]), name
        magnitude = (ft1[name].double().abs() + w2 * ft2[name].double().abs()) / (1.0 + w2)
        assert bool(((value.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-5 * magnitude).all()), (
            name
        )


def test_slerp_recipe_does_what_its_comment_says(demo_models, tmp_path: Path, cli) -> None:
    """recipes/slerp.yaml: attention goes from ft1 (first layer) to ft2 (last), the MLPs the other way."""
    out = tmp_path / "sl"
    result = cli.invoke(main, ["run", str(RECIPES_DIR / "slerp.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    merged = read_folder(out)
    ft1, ft2 = demo_models["ft1"], demo_models["ft2"]
    n = json.loads(Path("demo/models/base/config.json").read_text())["num_hidden_layers"]
    checked = 0
    for name, value in merged.items():
        layer = _layer(name)
        if layer not in (0, n - 1):
            continue
        if "self_attn" in name:
            source = ft1 if layer == 0 else ft2
        elif "mlp" in name:
            source = ft2 if layer == 0 else ft1
        else:
            continue
        assert torch.equal(value, source[name]), name
        checked += 1
    assert checked == 2 * 7  # 4 attention and 3 MLP matrices in each of the two end layers
