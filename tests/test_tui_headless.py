"""The core stays headless: importing workbench, its CLI, and running a recipe end to end never
imports textual (the terminal UI is the only place that does). Checked in a fresh process, since
a test process has textual loaded already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from click.testing import CliRunner
import workbench, workbench.engine.runner, workbench.cli.main, workbench.registry
from workbench.cli.main import main

result = CliRunner().invoke(main, ["run", sys.argv[1], "--out", sys.argv[2], "-q"])
assert result.exit_code == 0, result.output
result = CliRunner().invoke(main, ["validate", sys.argv[1]])
assert result.exit_code == 0, result.output
print(sorted(m for m in sys.modules if m == "textual" or m.startswith("textual.")))
"""


def test_running_a_recipe_never_imports_textual(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: linear\nmodels: {json.dumps([str(tiny_family['ft1']), str(tiny_family['ft2'])])}\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(recipe), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "model.safetensors").is_file()


def test_the_tui_does_import_textual() -> None:
    """The check above could not fail if the probe were wrong: the TUI module does load textual."""
    probe = "import sys, workbench.tui.app; print('textual' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
