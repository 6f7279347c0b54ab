"""Every hook a workbench plugin can implement.

Plugins are modules (or objects) with functions marked ``@workbench.hookimpl`` and are found through
the entry-point group ``workbench.plugins``. Each hook receives a ``register`` callback instead of
returning a list: the core owns the registry and its rules (unique names, valid schemas, provenance),
and a plugin only says what it offers. An object that fails validation is reported with the plugin's
package name and skipped; the rest of the plugin and every other plugin keep working.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("workbench")
hookimpl = pluggy.HookimplMarker("workbench")

Register = Callable[[Any], None]

# --------------------------------------------------------------------------------------------------
# Registration phase: called once when the registry loads, before any recipe is read.
# --------------------------------------------------------------------------------------------------


@hookspec
def register_methods(register: Register) -> None:
    """Register merge methods.

    Call ``register(cls)`` once per method, where ``cls`` subclasses
    :class:`workbench.method.MergeMethod` and sets ``name``, ``summary``, ``paper`` and a pydantic
    ``Parameters`` (and optionally ``ModelParameters``) schema. The CLI help, recipe validation and the
    TUI forms are generated from those schemas.
    """


@hookspec
def register_formats(register: Register) -> None:
    """Register checkpoint formats.

    Call ``register(fmt)`` with a :class:`workbench.checkpoint.CheckpointFormat`: an object that can
    tell whether a path holds its format (``detect``) and open it as a lazy
    :class:`workbench.checkpoint.CheckpointReader`, and optionally write merged output.
    """


@hookspec
def register_executors(register: Register) -> None:
    """Register executors, which decide where the engine's shard jobs run.

    Call ``register(executor_cls)`` with a subclass of :class:`workbench.executor.Executor`. The
    engine hands an executor a list of independent shard jobs and a function that runs one; the
    executor returns their results in order (threads locally, a cluster elsewhere). An executor
    that runs jobs in other processes sets ``remote = True`` and receives a picklable
    :class:`workbench.shard_task.ShardTask` per run instead of an in-process closure.
    """


# --------------------------------------------------------------------------------------------------
# Evaluation phase: scoring models and supplying data to data-driven methods.
# --------------------------------------------------------------------------------------------------


@hookspec
def register_evaluators(register: Register) -> None:
    """Register evaluators.

    Call ``register(cls)`` with a subclass of :class:`workbench.evaluator.Evaluator`: it scores a
    loaded model and returns named metrics (``workbench eval``, a recipe's ``evaluators``), and may
    provide batches of inputs to data-driven methods.
    """
