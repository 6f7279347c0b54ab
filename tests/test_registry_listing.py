"""The registry as users meet it: allow/block lists, the ``workbench methods`` listing, hook docstrings
and no torch import at start-up."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from plugin_helpers import BUILTIN_METHODS, CORE, FAKE_MAX, WIDE, MakePlugin, _rows

from workbench import hookspecs
from workbench.cli.main import main
from workbench.registry import load_registry

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("_no_plugin_env")


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
    assert set(registry.formats) == {"safetensors", "torch_bin", "gguf"} and set(registry.executors) == {
        "local",
        "ray",
    }


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


def test_methods_lists_builtins_with_plugin_summary_and_paper(
    cli: CliRunner, fresh_cli_registry: None
) -> None:
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
    assert rows["lambda"] == [
        "lambda",
        "global",
        "float",
        "1.0",
        "yes",
        "lambda: scale of the summed task vectors.",
    ]
    assert rows["normalize"] == [
        "normalize",
        "global",
        "bool",
        "False",
        "no",
        "Divide the weights by their sum.",
    ]
    assert rows["weight"] == [
        "weight",
        "per-model",
        "float",
        "1.0",
        "yes",
        "Weight of this model's task vector.",
    ]


def test_methods_shows_required_parameters(cli: CliRunner, fresh_cli_registry: None) -> None:
    result = cli.invoke(main, ["methods", "slerp"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert _rows(result.output)["t"] == [
        "t",
        "global",
        "float",
        "(required)",
        "yes",
        "Position between models[0] (t=0) and models[1] (t=1).",
    ]
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
    hooks = {
        name: obj for name, obj in vars(hookspecs).items() if inspect.isfunction(obj) and hasattr(obj, marker)
    }
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
    code = (
        "import sys, workbench.registry as r; reg = r.load_registry(); "
        "assert reg.methods; print('torch' in sys.modules)"
    )
    assert _python(code) == "False"


def test_listing_methods_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from workbench.cli.main import main\n"
        "r = CliRunner().invoke(main, ['methods', 'task_arithmetic'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    assert _python(code) == "False"


def test_the_subprocess_check_would_see_torch() -> None:
    """Guard for the two tests above: the same check reports True once torch is imported."""
    assert (
        _python(
            "import sys, torch, workbench.registry as r; r.load_registry(); print('torch' in sys.modules)"
        )
        == "True"
    )
