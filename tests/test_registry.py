"""The plugin registry: discovery through entry points, provenance and validation of third-party
plugins (allow/block lists, the listing, hooks and lazy torch import: test_registry_listing.py).

Third-party plugins are simulated without installing anything: a ``<name>.dist-info`` folder
(METADATA + entry_points.txt) and a plugin module in a temporary folder put on ``sys.path``, which is
exactly what ``importlib.metadata`` finds for an installed package.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from plugin_helpers import BUILTIN_METHODS, CORE, FAKE_MAX, WIDE, MakePlugin, _rows
from safetensors.torch import load_file

import workbench.registry as registry_module
from workbench.cli.main import main
from workbench.engine.run import run_recipe
from workbench.recipe.schema import parse_recipe
from workbench.registry import load_registry

pytestmark = pytest.mark.usefixtures("_no_plugin_env")


def _linear_recipe_text(a: Path, b: Path) -> str:
    return f"method: linear\nmodels:\n  - {json.dumps(str(a))}\n  - {json.dumps(str(b))}\n"


# ------------------------------------------------------------------------------------------------
# (a) a third-party plugin found through its entry point
# ------------------------------------------------------------------------------------------------


@pytest.mark.hook("register_methods")
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


@pytest.mark.hook("register_methods")
def test_third_party_method_runs_a_real_merge(
    make_plugin: MakePlugin, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    make_plugin("workbench-fake", "fake", FAKE_MAX)
    registry = load_registry()
    recipe = parse_recipe(
        f"method: fake_max\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n"
        f"  - {json.dumps(str(tiny_family['ft2']))}\n"
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


def test_third_party_method_appears_in_the_cli(
    make_plugin: MakePlugin,
    cli: CliRunner,
    fresh_cli_registry: None,
    tiny_family: dict[str, Path],
    tmp_path: Path,
) -> None:
    make_plugin("workbench-fake", "fake", FAKE_MAX)
    listing = cli.invoke(main, ["methods"], env=WIDE)
    assert listing.exit_code == 0, listing.output
    row = _rows(listing.output)["fake_max"]
    assert row[1:] == [
        "workbench-fake",
        "Elementwise maximum of the models, scaled.",
        "https://example.org/fake-max",
    ]

    detail = cli.invoke(main, ["methods", "fake_max"], env=WIDE)
    assert detail.exit_code == 0, detail.output
    assert "package workbench-fake" in detail.output
    assert _rows(detail.output)["scale"] == [
        "scale",
        "global",
        "float",
        "1.0",
        "yes",
        "Multiply the elementwise maximum by this.",
    ]

    recipe = tmp_path / "fake.yaml"
    recipe.write_text(
        f"method: fake_max\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n"
        f"  - {json.dumps(str(tiny_family['ft2']))}\n"
    )
    run = cli.invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), "-q"], env=WIDE)
    assert run.exit_code == 0, run.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# (b) a plugin that cannot be imported
# ------------------------------------------------------------------------------------------------

BROKEN = """
    raise ImportError("workbench-broken needs the package 'frobnicate', which is not installed")
"""


def test_broken_plugin_is_skipped_and_named(
    make_plugin: MakePlugin, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    make_plugin("workbench-broken", "broken", BROKEN)
    registry = load_registry()
    assert len(registry.problems) == 1
    problem = registry.problems[0]
    assert "workbench-broken" in problem and "'broken'" in problem
    assert "ImportError" in problem and "frobnicate" in problem and "skipped" in problem
    assert set(registry.methods) == BUILTIN_METHODS
    assert all(p.package != "workbench-broken" for p in registry.plugins)

    out = tmp_path / "out"
    run_recipe(
        parse_recipe(_linear_recipe_text(tiny_family["ft1"], tiny_family["ft2"]), "r.yaml"),
        out=out,
        registry=registry,
    )
    assert (out / "model.safetensors").is_file()


def test_broken_plugin_is_reported_by_the_cli(
    make_plugin: MakePlugin, cli: CliRunner, fresh_cli_registry: None
) -> None:
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


@pytest.mark.hook("register_methods")
def test_duplicate_method_name_is_reported_and_skipped(make_plugin: MakePlugin) -> None:
    make_plugin("workbench-dup", "dup", DUPLICATE)
    registry = load_registry()
    _assert_builtin_linear_kept(registry)
    assert registry.methods["fake_distinct"].plugin.package == "workbench-dup"
    assert len(registry.problems) == 1
    problem = registry.problems[0]
    assert (
        "workbench-dup" in problem
        and "'linear'" in problem
        and "already provides" in problem
        and CORE in problem
    )


def test_duplicate_from_a_plugin_loaded_later_is_skipped_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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


    class NoStatistics(MergeMethod):
        name = "fake_no_statistics"
        summary = "Blockwise, but gathers no statistics of the whole tensor."
        mode = "blockwise"

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    class UnknownMode(MergeMethod):
        name = "fake_unknown_mode"
        summary = "Declares a mode the engine does not know."
        mode = "columnwise"

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


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
        for cls in (NoSummary, NoDescription, NotAMethod, BadName, NoApply, NoStatistics, UnknownMode, Valid):
            register(cls)
"""


@pytest.mark.hook("register_methods")
def test_invalid_methods_are_reported_and_skipped(make_plugin: MakePlugin) -> None:
    make_plugin("workbench-invalid", "invalid", INVALID)
    registry = load_registry()
    assert "fake_valid" in registry.methods
    assert registry.methods["fake_valid"].plugin.package == "workbench-invalid"
    for skipped in (
        "fake_no_summary",
        "fake_no_description",
        "fake_not_a_method",
        "Fake-Bad-Name",
        "fake_no_apply",
        "fake_no_statistics",
        "fake_unknown_mode",
    ):
        assert skipped not in registry.methods
    assert BUILTIN_METHODS <= set(registry.methods)
    problems = registry.problems
    assert len(problems) == 7, problems
    assert all("workbench-invalid" in p and "invalid method" in p for p in problems)
    text = "\n".join(problems)
    assert "'fake_no_summary' has no summary" in text
    assert "parameter 'strength' has no description" in text
    assert "NotAMethod" in text and "not a MergeMethod subclass" in text
    assert "'Fake-Bad-Name'" in text
    assert "'fake_no_apply' does not implement apply()" in text
    assert "'fake_no_statistics' is blockwise but does not implement tensor_statistics()" in text
    assert (
        "'fake_unknown_mode': mode must be one of elementwise, rowwise, blockwise, whole, not 'columnwise'"
        in text
    )


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
# (d) hook ordering flags and the plugin API version
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["trylast=True", "tryfirst=True"])
def test_hook_ordering_flags_cannot_take_a_builtin_name(flag: str, make_plugin: MakePlugin) -> None:
    """pluggy calls tryfirst/trylast implementations out of registration order; the registry does not."""
    make_plugin("workbench-pushy", "pushy", DUPLICATE.replace("@hookimpl", f"@hookimpl({flag})"))
    registry = load_registry()
    _assert_builtin_linear_kept(registry)
    assert (
        len(registry.problems) == 1
        and "workbench-pushy" in registry.problems[0]
        and "already provides" in registry.problems[0]
    )


def test_a_hook_wrapper_is_reported_not_silently_ignored(make_plugin: MakePlugin) -> None:
    make_plugin(
        "workbench-wrapper",
        "wrapper",
        DUPLICATE.replace("@hookimpl", "@hookimpl(hookwrapper=True)").replace(
            "register(Distinct)", "register(Distinct)\n        yield"
        ),
    )
    registry = load_registry()
    assert "fake_distinct" not in registry.methods
    assert len(registry.problems) == 1
    assert "workbench-wrapper" in registry.problems[0] and "hook wrapper" in registry.problems[0]
    assert set(registry.methods) == BUILTIN_METHODS


@pytest.mark.parametrize(
    ("declared", "loads"),
    [
        ("2.0", True),
        (None, True),
        ("1.0", False),
        ("1.1", False),
        ("2.1", False),
        ("3.0", False),
        ("one", False),
        (1.0, False),
    ],
)
def test_plugin_api_version_is_checked(declared: object, loads: bool, make_plugin: MakePlugin) -> None:
    import workbench

    assert workbench.API_VERSION == "2.0"  # the cases above are written for it
    source = FAKE_MAX + ("" if declared is None else f"\n    WORKBENCH_API = {declared!r}\n")
    make_plugin("workbench-versioned", "versioned", source)
    registry = load_registry()
    assert ("fake_max" in registry.methods) is loads
    assert set(registry.methods) - {"fake_max"} == BUILTIN_METHODS
    if loads:
        assert registry.problems == []
    else:
        assert len(registry.problems) == 1
        problem = registry.problems[0]
        assert "workbench-versioned" in problem and str(declared) in problem
        if declared in ("1.0", "1.1", "2.1", "3.0"):
            assert f"API {declared}" in problem and "plugin API 2.0" in problem


def test_a_newer_minor_version_of_the_core_loads_an_older_plugin(
    make_plugin: MakePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "API_VERSION", "2.3")
    make_plugin("workbench-versioned", "versioned", FAKE_MAX + "\n    WORKBENCH_API = '2.2'\n")
    assert "fake_max" in load_registry().methods
    make_plugin(
        "workbench-newer",
        "newer",
        FAKE_MAX.replace("fake_max", "fake_newer") + "\n    WORKBENCH_API = '2.4'\n",
    )
    registry = load_registry()
    assert "fake_newer" not in registry.methods
    assert (
        "built for workbench plugin API 2.4, but this workbench provides plugin API 2.3 (compatible: 2.0 to 2.3)"
        in registry.problems[0]
    )


BAD_DEFAULT = """
    from workbench import hookimpl
    from workbench.method import MergeMethod, MethodParameters, Param


    class Strength(MethodParameters):
        strength: float = Param(2.0, description="Must lie in [0, 1], but its default does not.", ge=0.0, le=1.0)


    class BadDefault(MergeMethod):
        name = "fake_bad_default"
        summary = "A schema whose default its own constraint refuses."
        Parameters = Strength

        def apply(self, tensors, base, params, model_params, ctx):
            return tensors[0]


    @hookimpl
    def register_methods(register):
        register(BadDefault)
"""


@pytest.mark.hook("register_methods")
def test_a_schema_with_an_invalid_default_gives_one_warning(
    make_plugin: MakePlugin,
    cli: CliRunner,
    fresh_cli_registry: None,
    tiny_family: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Every recipe that leaves the parameter out would fail: the method is refused at load instead."""
    make_plugin("workbench-bad-default", "bad_default", BAD_DEFAULT)
    result = cli.invoke(main, ["methods"], env=WIDE)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert (
        "workbench-bad-default" in warnings[0]
        and "default of 'strength' is invalid" in warnings[0]
        and "less than or equal to 1" in warnings[0]
    )
    assert set(_rows(result.output)) >= BUILTIN_METHODS and "fake_bad_default" not in _rows(result.output)
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(_linear_recipe_text(tiny_family["ft1"], tiny_family["ft2"]))
    run = cli.invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), "-q"], env=WIDE)
    assert run.exit_code == 0, run.output
