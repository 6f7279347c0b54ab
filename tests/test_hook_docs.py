"""Meta-tests of the plugin hooks: the reference in docs/plugins.md is what workbench.tools.hook_docs
generates from workbench/hookspecs.py, every hookspec is documented, and every hookspec has a test
marked ``@pytest.mark.hook("<name>")`` somewhere in tests/."""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import hookspecs
from workbench.tools import hook_docs

REPO = Path(__file__).resolve().parent.parent
PLUGINS_MD = REPO / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent
REGENERATE = "python -m workbench.tools.hook_docs docs/plugins.md (or: make docs)"

#: Found by introspection: the functions pluggy's HookspecMarker marked (attribute "workbench_spec").
HOOKS = {hook.__name__: hook for hook in hook_docs.find_hookspecs(hookspecs)}


def _block(text: str) -> str:
    return text.split(hook_docs.START + "\n", 1)[1].split(hook_docs.END, 1)[0]


def hook_markers(source: str, filename: str = "<test>") -> dict[str, list[str]]:
    """Hook name -> the tests (``file::function``) decorated with ``@pytest.mark.hook("<name>")``."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for decorator in node.decorator_list:
            if (
                isinstance(decorator, ast.Call)
                and ast.unparse(decorator.func) == "pytest.mark.hook"
                and len(decorator.args) == 1
                and isinstance(decorator.args[0], ast.Constant)
                and isinstance(decorator.args[0].value, str)
            ):
                found.setdefault(decorator.args[0].value, []).append(f"{filename}::{node.name}")
    return found


def marker_problems(markers: dict[str, list[str]], hooks: set[str]) -> list[str]:
    """Hooks with no marked test, and markers naming a hook that does not exist."""
    missing = [
        f"hook {name} has no test marked @pytest.mark.hook({name!r})" for name in sorted(hooks - set(markers))
    ]
    unknown = [
        f"{', '.join(tests)}: @pytest.mark.hook({name!r}) names no hookspec"
        for name, tests in sorted(markers.items())
        if name not in hooks
    ]
    return missing + unknown


def test_hookspecs_are_found_by_introspection() -> None:
    assert {"register_methods", "register_formats", "register_executors", "register_evaluators"} <= set(HOOKS)
    assert list(HOOKS) == sorted(HOOKS, key=lambda name: HOOKS[name].__code__.co_firstlineno)
    assert all(hasattr(hook, f"{hookspecs.hookspec.project_name}_spec") for hook in HOOKS.values())


def test_committed_hook_reference_is_up_to_date() -> None:
    committed = _block(PLUGINS_MD.read_text(encoding="utf-8"))
    assert committed == hook_docs.render(), (
        f"docs/plugins.md's hook reference is out of date; regenerate it: {REGENERATE}"
    )


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hookspec_is_documented_and_in_the_reference(name: str) -> None:
    doc = inspect.getdoc(HOOKS[name])
    assert doc and doc.strip(), f"hookspec {name} has no docstring"
    block = _block(PLUGINS_MD.read_text(encoding="utf-8"))
    assert f"#### `{name}`" in block and f"{hook_docs.signature(HOOKS[name])}\n" in block, (
        f"{name} is missing from docs/plugins.md; {REGENERATE}"
    )


def test_every_hookspec_is_in_a_phase() -> None:
    grouped = [hook.__name__ for phase in hook_docs.phases(hookspecs) for hook in phase.hooks]
    assert grouped == list(HOOKS)


def test_every_hookspec_has_a_marked_test() -> None:
    markers: dict[str, list[str]] = {}
    for path in sorted(TESTS.glob("*.py")):
        for name, tests in hook_markers(path.read_text(encoding="utf-8"), path.name).items():
            markers.setdefault(name, []).extend(tests)
    problems = marker_problems(markers, set(HOOKS))
    assert not problems, "\n".join(problems)


def test_the_marker_scanner_can_fail() -> None:
    source = """
import pytest

@pytest.mark.hook("register_methods")
def test_a(): ...

@pytest.mark.hook("register_metods")
async def test_b(): ...

@pytest.mark.slow
@pytest.mark.parametrize("x", [1])
def test_c(x): ...

@pytest.mark.hook("register_formats")
class TestFormats:
    def test_d(self): ...
"""
    markers = hook_markers(source, "synthetic.py")
    assert markers == {
        "register_methods": ["synthetic.py::test_a"],
        "register_metods": ["synthetic.py::test_b"],
        "register_formats": ["synthetic.py::TestFormats"],
    }
    problems = marker_problems(markers, {"register_methods", "register_formats", "register_executors"})
    assert problems == [
        "hook register_executors has no test marked @pytest.mark.hook('register_executors')",
        "synthetic.py::test_b: @pytest.mark.hook('register_metods') names no hookspec",
    ]
    assert marker_problems(hook_markers("def test_nothing(): ...\n"), {"register_methods"}) != []


def _run_hook_docs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workbench.tools.hook_docs", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_fails_on_a_stale_file_and_regeneration_fixes_it(tmp_path: Path) -> None:
    copy = tmp_path / "plugins.md"
    shutil.copy(PLUGINS_MD, copy)
    fresh = _run_hook_docs("--check", str(copy))
    assert fresh.returncode == 0, fresh.stderr

    text = copy.read_text(encoding="utf-8")
    stale = text.replace("#### `register_formats`", "#### `register_formats (old)`")
    assert stale != text
    copy.write_text(stale, encoding="utf-8")
    checked = _run_hook_docs("--check", str(copy))
    assert checked.returncode == 1
    assert "out of date" in checked.stderr and f"python -m workbench.tools.hook_docs {copy}" in checked.stderr
    assert copy.read_text(encoding="utf-8") == stale  # --check writes nothing

    assert _run_hook_docs(str(copy)).returncode == 0
    assert copy.read_text(encoding="utf-8") == text  # only the block changed back
    assert hook_docs.main(["--check", str(copy)]) == 0


def test_text_outside_the_markers_is_kept(tmp_path: Path) -> None:
    copy = tmp_path / "guide.md"
    copy.write_text(
        f"# Title\n\nbefore\n{hook_docs.START}\nold text\n{hook_docs.END}\nafter\n", encoding="utf-8"
    )
    assert hook_docs.main(["--check", str(copy)]) == 1
    assert hook_docs.main([str(copy)]) == 0
    assert (
        copy.read_text(encoding="utf-8")
        == f"# Title\n\nbefore\n{hook_docs.START}\n{hook_docs.render()}{hook_docs.END}\nafter\n"
    )


def test_a_missing_marker_is_an_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "no_markers.md"
    copy.write_text(f"# Title\n{hook_docs.START}\n", encoding="utf-8")
    assert hook_docs.main([str(copy)]) == 2
    assert hook_docs.main(["--check", str(copy)]) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and hook_docs.END in err
    assert copy.read_text(encoding="utf-8") == f"# Title\n{hook_docs.START}\n"
