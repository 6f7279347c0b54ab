"""The demo: tiny Llama-shaped models generated here, merged by every recipe in ``recipes/``.

The example recipes name their inputs as ``demo/models/{base,ft1,ft2}``, relative to the current
folder, which is where the demo generates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_DIR = Path("demo")


def run_demo(recipes: Path, console: Any) -> list[Path]:
    """Generate ``demo/models`` and run every recipe into ``demo/out/<recipe name>``."""
    from workbench.engine import run_recipe
    from workbench.errors import RecipeError
    from workbench.synthetic import write_family

    recipe_files = sorted(recipes.glob("*.yaml")) + sorted(recipes.glob("*.yml"))
    if not recipe_files:
        raise RecipeError(f"no recipes (*.yaml) in {recipes}.")
    models = DEMO_DIR / "models"
    write_family(models, "tiny", fine_tunes=2)
    console.print(f"generated tiny models in {models}/ (base, ft1, ft2)")
    outputs = []
    for recipe in recipe_files:
        out = DEMO_DIR / "out" / recipe.stem
        result = run_recipe(recipe, out=out, overwrite=True)
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        console.print(f"[green]ok[/] {recipe.name}: {result.tensors} tensors -> {out}/")
        outputs.append(out)
    return outputs
