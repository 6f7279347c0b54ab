"""Errors a user can act on.

Every failure caused by input (a recipe, a checkpoint, a parameter) is raised as a ``WorkbenchError``
whose message is one paragraph naming the cause: the file, the tensor, the field, the line. The CLI
prints the message and exits non-zero; no traceback is shown for these.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class RecipeError(WorkbenchError):
    """The recipe is malformed or names something that does not exist."""


class CheckpointError(WorkbenchError):
    """A checkpoint cannot be read, or its tensors disagree with the other inputs."""


class PluginError(WorkbenchError):
    """A plugin cannot be loaded or registered something invalid."""


class OutputError(WorkbenchError):
    """The output location is unusable (exists, inside an input, not writable)."""


class RunInterrupted(WorkbenchError):
    """The user stopped a run (Ctrl-C); the message says what was kept."""

    exit_code = 130
