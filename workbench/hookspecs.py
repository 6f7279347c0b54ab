"""Every hook a workbench plugin can implement.

Plugins are modules (or objects) with functions marked ``@workbench.hookimpl`` and are found through
the entry-point group ``workbench.plugins``. Each hook receives a ``register`` callback instead of
returning a list: the core owns the registry and its rules (unique names, valid schemas, provenance),
and a plugin only says what it offers. An object that fails validation is reported with the plugin's
package name and skipped; the rest of the plugin and every other plugin keep working.

The hook reference in docs/plugins.md is generated from this module (``python -m workbench.tools.hook_docs
docs/plugins.md``, or ``make docs``): the docstrings below are what plugin authors read. Hooks are
grouped by the section comments ``# <Title> phase: <when the hooks run>``; every hookspec must come
after one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("workbench")
hookimpl = pluggy.HookimplMarker("workbench")

Register = Callable[[Any], None]

# --------------------------------------------------------------------------------------------------
# Registration phase: called once each time the registry loads (the CLI loads it once per process,
# on first use), before any recipe is read, in the order below.
# --------------------------------------------------------------------------------------------------


@hookspec
def register_methods(register: Register) -> None:
    """Register merge methods: call ``register(cls)`` once per method.

    **When:** once per registry load, before any recipe is read, plugin by plugin in load order.

    **What ``register`` accepts:** the class itself (not an instance), a subclass of
    :class:`workbench.method.MergeMethod`. The registry checks that:

    - ``name`` is a lowercase identifier (``[a-z][a-z0-9_]*``): the recipe's ``method:``;
    - ``summary`` is a non-empty string (one line for ``workbench methods``);
    - ``Parameters`` and ``ModelParameters`` subclass :class:`workbench.method.MethodParameters`,
      every field has a description (``Param(default, description=...)``), every default passes
      its own constraints (a recipe leaving the parameter out gets it) and no name is in both;
    - ``base_model`` is ``"required"``, ``"optional"`` or ``"unused"``;
    - ``apply`` is implemented.

    ``paper`` and ``when_to_use`` are not checked but make the method's page. The CLI help, recipe
    validation and the TUI forms are generated from the schemas.

    **On a problem:** a class that fails a check is skipped with one warning naming your plugin and its
    package (``Registry.problems``, printed by every command); ``register`` returns normally and the
    rest of your plugin keeps working. If the hook itself raises, that is one warning too: what was
    registered before the exception is kept, and the other hooks and plugins are unaffected.

    **Names already taken:** the built-in package ``merge-workbench`` loads first, then other
    distributions sorted by name (then entry-point name). The first registration of a name keeps it; a
    later one is skipped with a warning naming the plugin that has it. Methods, formats, executors and
    evaluators are separate namespaces.

    **Contract:** :class:`workbench.method.MergeMethod` (the method contract in docs/plugins.md).
    """


@hookspec
def register_formats(register: Register) -> None:
    """Register checkpoint formats: call ``register(fmt)`` once per format.

    **When:** once per registry load, after ``register_methods`` and before any recipe is read, plugin
    by plugin in load order.

    **What ``register`` accepts:** an instance (not the class) of
    :class:`workbench.checkpoint.CheckpointFormat`, whose ``name`` is a lowercase identifier
    (``[a-z][a-z0-9_]*``); nothing else is checked. It implements ``detect(path)`` (cheap: file names
    and headers) and ``open(path)``, returning a lazy :class:`workbench.checkpoint.CheckpointReader`;
    a format that can write also implements ``plan_output``, ``open_file`` and ``finish_output``.
    ``description`` is shown in listings and errors. A model path is opened by the first registered
    format whose ``detect`` accepts it, so the built-in formats are asked first.

    **On a problem:** an object that is not a ``CheckpointFormat`` instance or has a bad ``name`` is
    skipped with one warning naming your plugin and its package (``Registry.problems``, printed by
    every command); ``register`` returns normally and the rest of your plugin keeps working. If the
    hook itself raises, that is one warning too: what was registered before the exception is kept.

    **Names already taken:** the built-in package ``merge-workbench`` loads first, then other
    distributions sorted by name (then entry-point name). The first registration of a name keeps it; a
    later one is skipped with a warning naming the plugin that has it. Methods, formats, executors and
    evaluators are separate namespaces.

    **Contract:** :class:`workbench.checkpoint.CheckpointFormat` (``workbench/checkpoint/base.py``).
    """


@hookspec
def register_executors(register: Register) -> None:
    """Register executors, which decide where the engine's shard jobs run: call
    ``register(executor_cls)`` once per executor.

    **When:** once per registry load, after ``register_formats`` and before any recipe is read, plugin
    by plugin in load order.

    **What ``register`` accepts:** the class itself (not an instance), a subclass of
    :class:`workbench.executor.Executor`, whose ``name`` is a lowercase identifier
    (``[a-z][a-z0-9_]*``): the value of ``workbench run --executor``. Nothing else is checked at
    registration (set ``summary`` and implement ``run`` anyway). The engine hands an executor a list of
    independent shard jobs and a function that runs one; ``run`` returns their results in order
    (threads locally, a cluster elsewhere). An executor that runs jobs in other processes sets
    ``remote = True`` and receives a picklable :class:`workbench.engine.shard_task.ShardTask` per run instead
    of an in-process closure. Executor options are passed to the constructor.

    **On a problem:** a class that is not an ``Executor`` subclass or has a bad ``name`` is skipped
    with one warning naming your plugin and its package (``Registry.problems``, printed by every
    command); ``register`` returns normally and the rest of your plugin keeps working. If the hook
    itself raises, that is one warning too: what was registered before the exception is kept.

    **Names already taken:** the built-in package ``merge-workbench`` loads first, then other
    distributions sorted by name (then entry-point name). The first registration of a name keeps it; a
    later one is skipped with a warning naming the plugin that has it. Methods, formats, executors and
    evaluators are separate namespaces.

    **Contract:** :class:`workbench.executor.Executor`; ``plugins/executors/ray.py`` is a remote one.
    """


# --------------------------------------------------------------------------------------------------
# Evaluation phase: also called once per registry load, after the hooks above; what it registers
# scores models (workbench eval, a recipe's evaluators, sweeps) and feeds data-driven methods.
# --------------------------------------------------------------------------------------------------


@hookspec
def register_evaluators(register: Register) -> None:
    """Register evaluators: call ``register(cls)`` once per evaluator.

    **When:** once per registry load, after ``register_executors`` and before any recipe is read,
    plugin by plugin in load order.

    **What ``register`` accepts:** the class itself (not an instance), a subclass of
    :class:`workbench.evaluator.Evaluator`. The registry checks that ``name`` is a lowercase
    identifier (``[a-z][a-z0-9_]*``), ``summary`` is a non-empty string and ``Options`` subclasses
    :class:`workbench.evaluator.EvaluatorOptions` (the options a recipe or ``-o key=value`` gives).
    An evaluator scores a loaded model and returns named metrics (``evaluate``; ``workbench eval``, a
    recipe's ``evaluators``, sweeps), may refuse a model it cannot score (``check``), and may provide
    batches of inputs to data-driven methods (``batches``).

    **On a problem:** a class that fails a check is skipped with one warning naming your plugin and its
    package (``Registry.problems``, printed by every command); ``register`` returns normally and the
    rest of your plugin keeps working. If the hook itself raises, that is one warning too: what was
    registered before the exception is kept.

    **Names already taken:** the built-in package ``merge-workbench`` loads first, then other
    distributions sorted by name (then entry-point name). The first registration of a name keeps it; a
    later one is skipped with a warning naming the plugin that has it. Methods, formats, executors and
    evaluators are separate namespaces.

    **Contract:** :class:`workbench.evaluator.Evaluator` (see docs/evaluation.md).
    """
