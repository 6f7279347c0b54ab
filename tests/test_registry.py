"""The plugin registry: discovery through entry points, provenance, validation, allow/block lists,
the ``workbench methods`` listing, hook documentation and lazy torch import.

Third-party plugins are simulated without installing anything: a ``<name>.dist-info`` folder
(METADATA + entry_points.txt) and a plugin module in a temporary folder put on ``sys.path``, which is
exactly what ``importlib.metadata`` finds for an installed package.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import workbench.registry as registry_module
from workbench import hookspecs
from workbench.cli import main
from workbench.engine import run_recipe
from workbench.recipe import parse_recipe
from workbench.registry import load_registry

REPO = Path(__file__).resolve().parent.parent
WIDE = {"COLUMNS": "1000"}
#: What the installed built-in plugins register, read before any fake plugin exists: the tests below
#: check that a broken or clashing plugin leaves exactly this set in place.
BUILTIN_METHODS = set(load_registry().methods)
CORE = "merge-workbench"

MakePlugin = Callable[..., str]


@pytest.fixture
def make_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakePlugin]:
    """Create a fake installed distribution with one ``workbench.plugins`` entry point.

    Returns the plugin's module name. The folder is put on ``sys.path`` first, like a package
    installed in an earlier site directory.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def make(package: str, entry_point: str, source: str, version: str = "0.1") -> str:
        module = f"wb_test_plugin_{entry_point}_{uuid.uuid4().hex[:8]}"
        dist_info = site / f"{package.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        (dist_info / "entry_points.txt").write_text(f"[workbench.plugins]\n{entry_point} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        modules.append(module)
        importlib.invalidate_caches()
        return module

    yield make
    for module in modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


@pytest.fixture
def fresh_cli_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI load the registry again (it caches one per process); restored afterwards."""
    monkeypatch.setattr(registry_module, "_cached", None)


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKBENCH_PLUGINS", raising=False)
    monkeypatch.delenv("WORKBENCH_DISABLE_PLUGINS", raising=False)


FAKE_MAX = """
    from workbench import hookimpl
    from workbench.method import MergeMethod, MethodParameters, Param


    class FakeMaxParameters(MethodParameters):
        scale: float = Param(1.0, description="Multiply the elementwise maximum by this.")


    class FakeMax(MergeMethod):
        name = "fake_max"
        summary = "Elementwise maximum of the models, scaled."
        paper = "https://example.org/fake-max"
        Parameters = FakeMaxParameters
        base_model = "unused"
        min_models = 2

        def apply(self, tensors, base, params, model_params, ctx):
            import torch

            out = tensors[0].to(ctx.compute_dtype)
            for t in tensors[1:]:
                out = torch.maximum(out, t.to(ctx.compute_dtype))
            return out * params.scale


    @hookimpl
    def register_methods(register):
        register(FakeMax)
"""


def _linear_recipe_text(a: Path, b: Path) -> str:
    return f"method: linear\nmodels:\n  - {json.dumps(str(a))}\n  - {json.dumps(str(b))}\n"


def _rows(output: str) -> dict[str, list[str]]:
    """Table rows of a rich listing, keyed by first cell (cells are separated by 2+ spaces)."""
    rows = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


# ------------------------------------------------------------------------------------------------
# (a) a third-party plugin found through its entry point
# ------------------------------------------------------------------------------------------------


def test_third_party_plugin_is_discovered_with_its_package(make_plugin: MakePlugin) -> None:
    make_plugin("workbench-fake", "fake", FAKE_MAX)
    registry = load_registry()
    assert registry.problems == []
    assert "fake_max" in registry.methods
    entry = registry.methods["fake_max"]
    assert entry.plugin.package == "workbench-fake"
    assert entry.plugin.name == "fake"
    assert entry.plugin.version == "0.1"
    assert any(p.package == "workbench-fake" and p.name == "fake" for p in registry.plugins)
    assert {"linear", "slerp", "task_arithmetic"} <= BUILTIN_METHODS <= set(registry.methods)
    assert all(registry.methods[m].plugin.package == CORE for m in BUILTIN_METHODS)


def test_third_party_method_runs_a_real_merge(make_plugin: MakePlugin, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    make_plugin("workbench-fake", "fake", FAKE_MAX)
    registry = load_registry()
    recipe = parse_recipe(
        f"method: fake_max\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n  - {json.dumps(str(tiny_family['ft2']))}\n"
        "parameters:\n  scale: 2.0\n",
        "fake.yaml",
    )
    out = tmp_path / "merged"
    result = run_recipe(recipe, out=out, registry=registry)
    assert result.out_dir == out
    merged = load_file(out / "model.safetensors")
    a = load_file(tiny_family["ft1"] / "model.safetensors")
    b = load_file(tiny_family["ft2"] / "model.safetensors")
    assert set(merged) == set(a)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        # max of two bf16 values is one of them; doubling is exact in bf16
        expected = torch.where(a[name] > b[name], a[name], b[name]).float() * 2.0
        assert torch.equal(tensor.float(), expected), name


def test_third_party_method_appears_in_the_cli(make_plugin: MakePlugin, cli: CliRunner, fresh_cli_registry: None, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    make_plugin("workbench-fake", "fake", FAKE_MAX)
    listing = cli.invoke(main, ["methods"], env=WIDE)
    assert listing.exit_code == 0, listing.output
    row = _rows(listing.output)["fake_max"]
    assert row[1:] == ["workbench-fake", "Elementwise maximum of the models, scaled.", "https://example.org/fake-max"]

    detail = cli.invoke(main, ["methods", "fake_max"], env=WIDE)
    assert detail.exit_code == 0, detail.output
    assert "package workbench-fake" in detail.output
    assert _rows(detail.output)["scale"] == ["scale", "global", "float", "1.0", "yes", "Multiply the elementwise maximum by this."]

    recipe = tmp_path / "fake.yaml"
    recipe.write_text(f"method: fake_max\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n  - {json.dumps(str(tiny_family['ft2']))}\n")
    run = cli.invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), "-q"], env=WIDE)
    assert run.exit_code == 0, run.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# (b) a plugin that cannot be imported
# ------------------------------------------------------------------------------------------------

BROKEN = """
    raise ImportError("workbench-broken needs the package 'frobnicate', which is not installed")
"""


def test_broken_plugin_is_skipped_and_named(make_plugin: MakePlugin, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    make_plugin("workbench-broken", "broken", BROKEN)
    registry = load_registry()
    assert len(registry.problems) == 1
    problem = registry.problems[0]
    assert "workbench-broken" in problem and "'broken'" in problem
    assert "ImportError" in problem and "frobnicate" in problem and "skipped" in problem
    assert set(registry.methods) == BUILTIN_METHODS
    assert all(p.package != "workbench-broken" for p in registry.plugins)

    out = tmp_path / "out"
    run_recipe(parse_recipe(_linear_recipe_text(tiny_family["ft1"], tiny_family["ft2"]), "r.yaml"), out=out, registry=registry)
    assert (out / "model.safetensors").is_file()


def test_broken_plugin_is_reported_by_the_cli(make_plugin: MakePlugin, cli: CliRunner, fresh_cli_registry: None) -> None:
    make_plugin("workbench-broken", "broken", BROKEN)
    result = cli.invoke(main, ["methods"], env=WIDE)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "workbench-broken" in warnings[0] and "ImportError" in warnings[0]
    assert BUILTIN_METHODS <= set(_rows(result.output))


def test_plugin_raising_inside_a_hook_is_skipped(make_plugin: MakePlugin) -> None:
    make_plugin(
        "workbench-raises",
        "raises",
        """
        from workbench import hookimpl

        @hookimpl
        def register_methods(register):
            raise RuntimeError("boom while registering")
        """,
    )
    registry = load_registry()
    assert len(registry.problems) == 1
    assert "workbench-raises" in registry.problems[0] and "boom while registering" in registry.problems[0]
    assert set(registry.methods) == BUILTIN_METHODS


# ------------------------------------------------------------------------------------------------
# (c) duplicates, invalid methods, misspelled hooks
# ------------------------------------------------------------------------------------------------

DUPLICATE = """
    from workbench import hookimpl
    from workbench.method import MergeMethod


    class NotLinear(MergeMethod):
        name = "linear"
        summary = "A second method called linear."

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    class Distinct(MergeMethod):
        name = "fake_distinct"
        summary = "A method with a name of its own."

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    @hookimpl
    def register_methods(register):
        register(NotLinear)
        register(Distinct)
"""


def _assert_builtin_linear_kept(registry: registry_module.Registry) -> None:
    entry = registry.methods["linear"]
    assert entry.plugin.package == CORE
    assert entry.obj.summary.startswith("Weighted average")


def test_duplicate_method_name_is_reported_and_skipped(make_plugin: MakePlugin) -> None:
    make_plugin("workbench-dup", "dup", DUPLICATE)
    registry = load_registry()
    _assert_builtin_linear_kept(registry)
    assert registry.methods["fake_distinct"].plugin.package == "workbench-dup"
    assert len(registry.problems) == 1
    problem = registry.problems[0]
    assert "workbench-dup" in problem and "'linear'" in problem and "already provides" in problem and CORE in problem


def test_duplicate_from_a_plugin_loaded_later_is_skipped_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever order plugins load in, the built-in keeps its name (first registration wins)."""
    module_name = f"wb_test_late_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(DUPLICATE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(module_name)
    try:
        registry = load_registry(extra_plugins=[(module, "late")])
    finally:
        sys.modules.pop(module_name, None)
    _assert_builtin_linear_kept(registry)
    assert registry.methods["fake_distinct"].plugin.name == "late"
    assert len(registry.problems) == 1
    assert "'late'" in registry.problems[0] and "'linear'" in registry.problems[0]


def test_entry_point_name_clash_is_reported(make_plugin: MakePlugin) -> None:
    """A third-party entry point called 'linear' neither hides the built-in one nor goes unreported."""
    make_plugin("workbench-clash", "linear", FAKE_MAX)
    registry = load_registry()
    _assert_builtin_linear_kept(registry)
    assert BUILTIN_METHODS <= set(registry.methods)
    assert "fake_max" not in registry.methods
    assert len(registry.problems) == 1 and "workbench-clash" in registry.problems[0]


INVALID = """
    from workbench import hookimpl
    from workbench.method import MergeMethod, MethodParameters, Param
    from pydantic import Field


    class NoSummary(MergeMethod):
        name = "fake_no_summary"
        summary = "   "

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    class Undescribed(MethodParameters):
        strength: float = Field(1.0)


    class NoDescription(MergeMethod):
        name = "fake_no_description"
        summary = "Its parameter has no description."
        Parameters = Undescribed

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    class NotAMethod:
        name = "fake_not_a_method"
        summary = "Does not subclass MergeMethod."

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    class BadName(MergeMethod):
        name = "Fake-Bad-Name"
        summary = "Its name is not a lowercase identifier."

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    class NoApply(MergeMethod):
        name = "fake_no_apply"
        summary = "Never implements apply."


    class Described(MethodParameters):
        k: float = Param(1.0, description="A described parameter.")


    class Valid(MergeMethod):
        name = "fake_valid"
        summary = "The one valid method of this plugin."
        Parameters = Described

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    @hookimpl
    def register_methods(register):
        for cls in (NoSummary, NoDescription, NotAMethod, BadName, NoApply, Valid):
            register(cls)
"""


def test_invalid_methods_are_reported_and_skipped(make_plugin: MakePlugin) -> None:
    make_plugin("workbench-invalid", "invalid", INVALID)
    registry = load_registry()
    assert "fake_valid" in registry.methods
    assert registry.methods["fake_valid"].plugin.package == "workbench-invalid"
    for skipped in ("fake_no_summary", "fake_no_description", "fake_not_a_method", "Fake-Bad-Name", "fake_no_apply"):
        assert skipped not in registry.methods
    assert BUILTIN_METHODS <= set(registry.methods)
    problems = registry.problems
    assert len(problems) == 5, problems
    assert all("workbench-invalid" in p and "invalid method" in p for p in problems)
    text = "\n".join(problems)
    assert "'fake_no_summary' has no summary" in text
    assert "parameter 'strength' has no description" in text
    assert "NotAMethod" in text and "not a MergeMethod subclass" in text
    assert "'Fake-Bad-Name'" in text
    assert "'fake_no_apply' does not implement apply()" in text


def test_misspelled_hook_is_reported_and_the_plugin_skipped(make_plugin: MakePlugin) -> None:
    make_plugin(
        "workbench-typo",
        "typo",
        """
        from workbench import hookimpl
        from workbench.method import MergeMethod


        class Unused(MergeMethod):
            name = "fake_unused"
            summary = "Registered by a plugin that is skipped."

            def apply(self, tensors, base, params, model_params, ctx):
                return tensors[0]


        @hookimpl
        def register_method(register):  # missing 's'
            register(Unused)


        @hookimpl
        def register_methods(register):
            register(Unused)
        """,
    )
    registry = load_registry()
    assert len(registry.problems) == 1
    problem = registry.problems[0]
    assert "workbench-typo" in problem and "unknown hook" in problem and "register_method" in problem
    assert "register_methods" not in problem
    assert "fake_unused" not in registry.methods
    assert all(p.package != "workbench-typo" for p in registry.plugins)
    assert set(registry.methods) == BUILTIN_METHODS


# ------------------------------------------------------------------------------------------------
# (d) allow and block lists
# ------------------------------------------------------------------------------------------------


def test_workbench_plugins_loads_only_the_named_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_PLUGINS", "linear")
    registry = load_registry()
    assert set(registry.methods) == {"linear"}
    assert [p.name for p in registry.plugins] == ["linear"]
    assert registry.formats == {} and registry.executors == {}


def test_workbench_plugins_accepts_several_names_with_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_PLUGINS", " slerp , safetensors ")
    registry = load_registry()
    assert set(registry.methods) == {"slerp"}
    assert set(registry.formats) == {"safetensors"}


def test_workbench_disable_plugins_blocks_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_DISABLE_PLUGINS", "slerp")
    registry = load_registry()
    assert set(registry.methods) == BUILTIN_METHODS - {"slerp"}
    assert "slerp" not in {p.name for p in registry.plugins}
    assert set(registry.formats) == {"safetensors"} and set(registry.executors) == {"local"}


def test_plugin_lists_accept_package_names(make_plugin: MakePlugin, monkeypatch: pytest.MonkeyPatch) -> None:
    make_plugin("workbench-fake", "fake", FAKE_MAX)
    monkeypatch.setenv("WORKBENCH_DISABLE_PLUGINS", "workbench-fake")
    assert "fake_max" not in load_registry().methods
    monkeypatch.delenv("WORKBENCH_DISABLE_PLUGINS")
    monkeypatch.setenv("WORKBENCH_PLUGINS", "workbench-fake")
    assert set(load_registry().methods) == {"fake_max"}


def test_blocked_plugin_is_missing_from_the_cli(cli: CliRunner, fresh_cli_registry: None) -> None:
    result = cli.invoke(main, ["methods"], env={**WIDE, "WORKBENCH_DISABLE_PLUGINS": "slerp"})
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert "linear" in rows and "task_arithmetic" in rows and "slerp" not in rows


# ------------------------------------------------------------------------------------------------
# (e) `workbench methods`
# ------------------------------------------------------------------------------------------------

EXPECTED_LISTING = {
    "linear": (
        "Weighted average of the models: sum(w_i * theta_i), divided by sum(w_i) when normalize is on.",
        "https://arxiv.org/abs/2203.05482",
    ),
    "slerp": (
        "Spherical interpolation of two models per tensor; linear where the tensors are nearly parallel.",
        "https://dl.acm.org/doi/10.1145/325165.325242",
    ),
    "task_arithmetic": (
        "base + lambda * sum(w_i * (theta_i - base)): add, scale or negate task vectors.",
        "https://arxiv.org/abs/2212.04089",
    ),
}


def test_methods_lists_builtins_with_plugin_summary_and_paper(cli: CliRunner, fresh_cli_registry: None) -> None:
    result = cli.invoke(main, ["methods"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["method"] == ["method", "plugin", "summary", "paper"]
    for name, (summary, paper) in EXPECTED_LISTING.items():
        assert rows[name] == [name, CORE, summary, paper]
    lines = [line.split()[0] for line in result.output.splitlines()[1:] if line.strip()]
    assert lines == sorted(lines)  # sorted by name


def test_methods_shows_the_parameters_of_one_method(cli: CliRunner, fresh_cli_registry: None) -> None:
    result = cli.invoke(main, ["methods", "task_arithmetic"], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "task_arithmetic (plugin task_arithmetic, package merge-workbench)" in out
    assert "paper: https://arxiv.org/abs/2212.04089" in out
    assert "base model: required" in out
    rows = _rows(out)
    assert rows["parameter"] == ["parameter", "scope", "type", "default", "per-layer", "description"]
    assert rows["lambda"] == ["lambda", "global", "float", "1.0", "yes", "lambda: scale of the summed task vectors."]
    assert rows["normalize"] == ["normalize", "global", "bool", "False", "no", "Divide the weights by their sum."]
    assert rows["weight"] == ["weight", "per-model", "float", "1.0", "yes", "Weight of this model's task vector."]


def test_methods_shows_required_parameters(cli: CliRunner, fresh_cli_registry: None) -> None:
    result = cli.invoke(main, ["methods", "slerp"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert _rows(result.output)["t"] == ["t", "global", "float", "(required)", "yes", "Position between models[0] (t=0) and models[1] (t=1)."]
    assert "models: 2..2" in result.output


def test_methods_with_an_unknown_name_suggests_one(cli: CliRunner, fresh_cli_registry: None) -> None:
    result = cli.invoke(main, ["methods", "slrep"], env=WIDE)
    assert result.exit_code == 2
    assert "unknown method 'slrep'" in result.output and "Did you mean 'slerp'?" in result.output


# ------------------------------------------------------------------------------------------------
# (f) hook documentation, (g) no torch at start-up
# ------------------------------------------------------------------------------------------------


def test_every_hook_has_a_docstring() -> None:
    marker = f"{hookspecs.hookspec.project_name}_spec"
    hooks = {name: obj for name, obj in vars(hookspecs).items() if inspect.isfunction(obj) and hasattr(obj, marker)}
    assert {"register_methods", "register_formats", "register_executors"} <= set(hooks)
    for name, hook in hooks.items():
        doc = inspect.getdoc(hook)
        assert doc and len(doc.split()) >= 10, f"hook {name} has no real docstring"
        assert "register(" in doc, f"hook {name} does not say how to call register"


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_loading_the_registry_does_not_import_torch() -> None:
    code = "import sys, workbench.registry as r; reg = r.load_registry(); assert reg.methods; print('torch' in sys.modules)"
    assert _python(code) == "False"


def test_listing_methods_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from workbench.cli import main\n"
        "r = CliRunner().invoke(main, ['methods', 'task_arithmetic'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    assert _python(code) == "False"


def test_the_subprocess_check_would_see_torch() -> None:
    """Guard for the two tests above: the same check reports True once torch is imported."""
    assert _python("import sys, torch, workbench.registry as r; r.load_registry(); print('torch' in sys.modules)") == "True"
