"""The floors of the house (pyproject.toml, ``[tool.importlinter]``): imports run downward, no package
has an import cycle, no private module or name is used outside its own package.

``make test`` runs ``lint-imports`` on the checkout; these tests show each contract fails on purpose,
on a scratch copy of the sources with one wrong-way import added, and check the private names that
import-linter does not see."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: source folder -> the package it installs as
PACKAGES = {"workbench": "workbench", "plugins": "workbench_plugins", "kernels": "workbench_kernels"}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def private_imports(source: str, importer: str) -> list[str]:
    """``from <our package> import _name`` of a private name defined in another module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in PACKAGES.values()
        ):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != importer:
                    found.append(f"from {node.module} import {alias.name} (line {node.lineno})")
    return found


def test_no_private_name_is_imported_from_another_module() -> None:
    problems = []
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            module = ".".join([package, *path.relative_to(REPO / folder).with_suffix("").parts])
            problems += [f"{path.relative_to(REPO)}: {p}" for p in private_imports(path.read_text(), module)]
    assert problems == []


def test_the_private_name_check_sees_one() -> None:
    assert private_imports("from workbench.engine.runner import _helper\n", "workbench.cli.main") == [
        "from workbench.engine.runner import _helper (line 1)"
    ]
    assert (
        private_imports(
            "from workbench.engine.runner import helper\nfrom os import _exit\n", "workbench.cli.main"
        )
        == []
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three packages copied under their import names, with the contracts of pyproject.toml."""
    root = tmp_path_factory.mktemp("house")
    for folder, package in PACKAGES.items():
        shutil.copytree(
            REPO / folder, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.nb[ic]")
        )
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert contracts["contracts"], "pyproject.toml declares no import contract"
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(root), "PATH": str(LINT_IMPORTS.parent), "HOME": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "pyproject.toml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _add_line(path: Path, line: str) -> str:
    original = path.read_text()
    path.write_text(original + f"\n{line}\n")
    return original


def test_the_scratch_copy_keeps_the_contracts(scratch: Path) -> None:
    result = _lint(scratch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the ground floor reaching up into the engine
        (
            "workbench/errors.py",
            "import workbench.engine.plan",
            "workbench.errors is not allowed to import workbench.engine",
        ),
        # a plugin reaching into planning internals
        (
            "workbench_plugins/methods/linear.py",
            "from workbench.engine import run",
            "workbench_plugins is not allowed to import workbench.engine",
        ),
        # a cycle between two capabilities on the same floor (engine -> sweep -> engine)
        ("workbench/engine/plan.py", "import workbench.sweep.search", "No cycles are allowed in workbench"),
        # a private module used outside its package
        (
            "workbench/engine/plan.py",
            "import workbench_plugins.methods._weights",
            "workbench.engine.plan -> workbench_plugins.methods._weights",
        ),
    ],
)
def test_a_wrong_way_import_breaks_a_contract(scratch: Path, module: str, line: str, broken: str) -> None:
    path = scratch / module
    original = _add_line(path, line)
    try:
        result = _lint(scratch)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert broken in " ".join(result.stdout.split()), result.stdout
