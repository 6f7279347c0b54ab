"""Helpers shared by the bad-input tests: write a recipe, run the CLI on it, check a clean failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from workbench.cli.main import main

WIDE = {"COLUMNS": "1000"}  # rich never wraps a message in the middle of a path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def linear_recipe(tmp_path: Path, *models: Path | str, extra: str = "", name: str = "recipe.yaml") -> Path:
    lines = ["method: linear", "models:"] + [f"  - {json.dumps(str(m))}" for m in models]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def invoke(cli: CliRunner, command: str, recipe: Path, out: Path | None, *extra: str) -> Result:
    args = [command, str(recipe)] + (["--out", str(out)] if out is not None else []) + list(extra)
    return cli.invoke(main, args, env=WIDE)


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def assert_failed(result: Result, out: Path | None, *fragments: str) -> None:
    """Status 2, an 'error:' paragraph holding every fragment, no traceback, nothing written."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error:" in result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, f"{fragment!r} not in {result.output!r}"
    if out is not None:
        assert not out.exists()
        assert not partial_of(out).exists()


COMMANDS = pytest.mark.parametrize("command", ["run", "validate"])
