"""Merge Workbench: plugin-based merging and editing of neural-network checkpoints.

The names in ``__all__`` are the stable public API, versioned by :data:`API_VERSION` (see
docs/plugins.md, "The public API and its version"). Importing this package is cheap (no torch,
no pydantic): each name is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from workbench._version import API_VERSION, __version__
from workbench.hookspecs import hookimpl

#: Public name -> module that defines it (imported when the name is first used).
_LAZY = {
    "load_recipe": "workbench.recipe.schema",
    "run_recipe": "workbench.engine.run",
    # the method contract
    "MergeMethod": "workbench.method",
    "MethodParameters": "workbench.method",
    "Param": "workbench.method",
    "ParameterSet": "workbench.method",
    "TensorContext": "workbench.method",
    "PrepareContext": "workbench.method",
    "RowBlocks": "workbench.method",
    "MemoryNeed": "workbench.method",
    # simple methods as typed functions, and the seed the engine gives each tensor (API 1.1)
    "merge_function": "workbench.method",
    "PerModel": "workbench.method",
    "tensor_seed": "workbench.method",
    "model_seed": "workbench.method",
    # the other things a plugin can register
    "CheckpointFormat": "workbench.checkpoint.base",
    "CheckpointReader": "workbench.checkpoint.base",
    "Executor": "workbench.executor",
    "Evaluator": "workbench.evaluator",
    "EvaluatorOptions": "workbench.evaluator",
    # errors a plugin raises for bad input (the CLI prints the message, exits non-zero)
    "WorkbenchError": "workbench.errors",
    "RecipeError": "workbench.errors",
    "CheckpointError": "workbench.errors",
    "PluginError": "workbench.errors",
}

__all__ = ["API_VERSION", "__version__", "hookimpl", "run", *_LAZY]

if TYPE_CHECKING:
    from workbench.checkpoint.base import CheckpointFormat, CheckpointReader
    from workbench.engine.run import run_recipe
    from workbench.errors import CheckpointError, PluginError, RecipeError, WorkbenchError
    from workbench.evaluator import Evaluator, EvaluatorOptions
    from workbench.executor import Executor
    from workbench.method import (
        MemoryNeed,
        MergeMethod,
        MethodParameters,
        Param,
        ParameterSet,
        PerModel,
        PrepareContext,
        RowBlocks,
        TensorContext,
        merge_function,
        model_seed,
        tensor_seed,
    )
    from workbench.recipe.schema import load_recipe


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def run(recipe: Any, **options: Any) -> Any:
    """Run a recipe (a path or a loaded ``Recipe``); see :func:`workbench.engine.run.run_recipe`."""
    return __getattr__("run_recipe")(recipe, **options)
