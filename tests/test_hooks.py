"""Each plugin hook exercised through a plugin that implements it: a fake plugin object (no installed
package) loaded with ``load_registry(extra_plugins=...)``, its item registered with the plugin's
provenance and usable by the engine. Hooks whose third-party tests live elsewhere (methods in
test_registry.py, evaluators in test_sweep.py) are covered here too, cheaply, so that every hook has a
fast test; tests/test_hook_docs.py checks every hook has a ``@pytest.mark.hook`` test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file

from workbench import hookimpl
from workbench.checkpoint import CheckpointFormat, CheckpointReader
from workbench.checkpoint.base import TensorInfo
from workbench.engine.run import run_recipe
from workbench.errors import CheckpointError
from workbench.evaluator import Evaluator, EvaluatorOptions, LoadedModel
from workbench.executor import Executor
from workbench.method import MergeMethod
from workbench.recipe.schema import parse_recipe
from workbench.registry import Registry, load_registry

pytestmark = pytest.mark.usefixtures("_no_plugin_env")

FAKE_FILE = "tensors.fakept"  # a torch.save'd dict of float32 tensors, which no built-in format detects


class FakeReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] = torch.load(path / FAKE_FILE, weights_only=True)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        return TensorInfo(name, "F32", tuple(self._tensors[name].shape), self.path / FAKE_FILE)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self._tensors[name]
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    def files(self) -> list[Path]:
        return [self.path / FAKE_FILE]


class FakeFormat(CheckpointFormat):
    name = "fake_pt"
    description = "A torch.save'd dict in tensors.fakept (hook tests)."

    def detect(self, path: Path) -> bool:
        return (path / FAKE_FILE).is_file()

    def open(self, path: Path) -> CheckpointReader:
        return FakeReader(path)


class ReversedExecutor(Executor):
    """Runs the jobs last first (as a pool might finish them) and returns results in job order."""

    name = "fake_reversed"
    summary = "Shard jobs in reverse order, in this process (hook tests)."
    ran: ClassVar[list[Any]] = []

    def run(
        self,
        jobs: Sequence[Any],
        run_job: Callable[[Any], Any],
        on_done: Callable[[Any, Any], None] | None = None,
    ) -> list[Any]:
        results: dict[int, Any] = {}
        for index in reversed(range(len(jobs))):
            results[index] = run_job(jobs[index])
            type(self).ran.append(jobs[index])
            if on_done is not None:
                on_done(jobs[index], results[index])
        return [results[i] for i in range(len(jobs))]


class FirstModel(MergeMethod):
    name = "fake_first"
    summary = "The first model's tensors, unchanged (hook tests)."
    base_model = "unused"

    def apply(self, tensors, base, params, model_params, ctx):  # type: ignore[no-untyped-def]
        return tensors[0].to(ctx.out_dtype)


class CountOptions(EvaluatorOptions):
    pass


class ParameterCount(Evaluator):
    name = "fake_parameter_count"
    summary = "Number of parameters of the model (hook tests)."
    Options = CountOptions

    def evaluate(self, model: LoadedModel) -> dict[str, float | str]:
        return {"parameters": float(sum(p.numel() for p in model.module.parameters()))}


class Plugin:
    """A plugin object: pluggy collects its ``@hookimpl`` methods like a module's functions."""

    @hookimpl
    def register_methods(self, register: Callable[[Any], None]) -> None:
        register(FirstModel)

    @hookimpl
    def register_formats(self, register: Callable[[Any], None]) -> None:
        register(FakeFormat())

    @hookimpl
    def register_executors(self, register: Callable[[Any], None]) -> None:
        register(ReversedExecutor)

    @hookimpl
    def register_evaluators(self, register: Callable[[Any], None]) -> None:
        register(ParameterCount)


@pytest.fixture
def registry() -> Registry:
    loaded = load_registry(extra_plugins=[(Plugin(), "fake_hooks")])
    assert loaded.problems == []
    assert any(p.name == "fake_hooks" for p in loaded.plugins)
    return loaded


def _provenance(entry: Any) -> tuple[str, str, str]:
    return entry.plugin.name, entry.plugin.package, entry.plugin.version


@pytest.mark.hook("register_methods")
def test_register_methods_adds_a_usable_method(
    registry: Registry, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    assert _provenance(registry.methods["fake_first"]) == ("fake_hooks", "fake_hooks", "local")
    assert registry.method("fake_first") is FirstModel
    recipe = parse_recipe(
        f"method: fake_first\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n", "first.yaml"
    )
    run_recipe(recipe, out=tmp_path / "out", registry=registry)
    merged, original = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tiny_family["ft1"] / "model.safetensors"),
    )
    assert set(merged) == set(original) and all(torch.equal(merged[n], original[n]) for n in merged)


@pytest.mark.hook("register_formats")
def test_register_formats_adds_a_format_that_opens_and_merges(registry: Registry, tmp_path: Path) -> None:
    assert _provenance(registry.formats["fake_pt"]) == ("fake_hooks", "fake_hooks", "local")
    assert isinstance(registry.format("fake_pt"), FakeFormat)
    assert list(registry.formats)[-1] == "fake_pt"  # a plugin's format is asked after the built-in ones
    folders = []
    for i, scale in enumerate((1.0, 3.0)):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        torch.save({"w": torch.full((4, 3), scale), "b": torch.arange(3.0) * scale}, folder / FAKE_FILE)
        folders.append(folder)
    with registry.open_checkpoint(folders[1]) as reader:
        assert isinstance(reader, FakeReader)
        assert reader.tensor_names() == ["w", "b"] and reader.info("w").shape == (4, 3)
        assert torch.equal(reader.read("w", rows=(1, 2)), torch.full((1, 3), 3.0))
    recipe = parse_recipe(
        "method: linear\noutput: {dtype: float32}\nmodels:\n"
        + "".join(f"  - {json.dumps(str(f))}\n" for f in folders),
        "lin.yaml",
    )
    run_recipe(recipe, out=tmp_path / "out", registry=registry)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["w"], torch.full((4, 3), 2.0)) and torch.equal(
        merged["b"], torch.arange(3.0) * 2.0
    )


@pytest.mark.hook("register_executors")
def test_register_executors_adds_an_executor_that_runs_the_shards(
    registry: Registry, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    assert _provenance(registry.executors["fake_reversed"]) == ("fake_hooks", "fake_hooks", "local")
    assert registry.executor("fake_reversed") is ReversedExecutor
    ReversedExecutor.ran = []
    text = (
        f"method: linear\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n"
        f"  - {json.dumps(str(tiny_family['ft2']))}\n"
    )
    run_recipe(
        parse_recipe(text + "output: {shard_size: 64KB}\n", "r.yaml"),
        out=tmp_path / "reversed",
        registry=registry,
        executor="fake_reversed",
    )
    run_recipe(
        parse_recipe(text + "output: {shard_size: 64KB}\n", "r.yaml"),
        out=tmp_path / "local",
        registry=registry,
    )
    assert len(ReversedExecutor.ran) > 1  # several shard jobs went through the plugin's executor
    local = sorted(p.name for p in (tmp_path / "local").glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "reversed").glob("*.safetensors")) == local
    for name in local:
        assert (tmp_path / "reversed" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


@pytest.mark.hook("register_evaluators")
def test_register_evaluators_adds_an_evaluator_that_scores_a_model(registry: Registry) -> None:
    assert _provenance(registry.evaluators["fake_parameter_count"]) == ("fake_hooks", "fake_hooks", "local")
    evaluator = registry.evaluator("fake_parameter_count")()
    model = LoadedModel(module=torch.nn.Linear(3, 2), config={})
    assert evaluator.evaluate(model) == {"parameters": 8.0}


def test_a_plugin_registering_a_taken_name_is_skipped_per_namespace() -> None:
    """Names are per kind: a format called 'linear' does not clash with the method 'linear'."""

    class LinearFormat(FakeFormat):
        name = "linear"

    class Clash:
        @hookimpl
        def register_formats(self, register: Callable[[Any], None]) -> None:
            register(LinearFormat())

        @hookimpl
        def register_executors(self, register: Callable[[Any], None]) -> None:
            register(ReversedExecutor)

    loaded = load_registry(extra_plugins=[(Plugin(), "fake_hooks"), (Clash(), "clash")])
    assert loaded.formats["linear"].plugin.name == "clash"
    assert loaded.executors["fake_reversed"].plugin.name == "fake_hooks"
    assert (
        len(loaded.problems) == 1
        and "'clash'" in loaded.problems[0]
        and "'fake_reversed'" in loaded.problems[0]
    )
