"""Merge Workbench: plugin-based merging and editing of neural-network checkpoints.

Importing this package is cheap (no torch): the Python API functions load what they need on use.
"""

from __future__ import annotations

from typing import Any

from workbench.hookspecs import hookimpl

__all__ = ["hookimpl", "load_recipe", "run", "__version__"]
__version__ = "0.1.0"


def load_recipe(path: Any) -> Any:
    """Load and validate a recipe file (native or mergekit YAML); see :mod:`workbench.recipe`."""
    from workbench.recipe import load_recipe as _load

    return _load(path)


def run(recipe: Any, **options: Any) -> Any:
    """Run a recipe (a path or a loaded ``Recipe``); see :func:`workbench.engine.run_recipe`."""
    from workbench.engine import run_recipe

    return run_recipe(recipe, **options)
