"""An example Merge Workbench plugin: registers the ``trimmed_mean`` merge method.

The workbench finds this module through the entry point in pyproject.toml::

    [project.entry-points."workbench.plugins"]
    example = "workbench_example"

and calls the ``@hookimpl`` functions below once per registry load.
"""

from __future__ import annotations

from collections.abc import Callable

from workbench import hookimpl
from workbench.method import MergeMethod
from workbench_example.trimmed_mean import trimmed_mean

__all__ = ["WORKBENCH_API", "register_methods", "trimmed_mean"]

#: The plugin API this package is written for: it loads into any workbench whose plugin API is 2.x, and
#: one with another major API version refuses it with a warning instead of failing later.
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(trimmed_mean)
