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
    """The user stopped a run (Ctrl-C, or SIGTERM); the message says what was kept."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, a container stopping), raised where Ctrl-C would be, so a
    run stops the same way: it says what is kept and exits non-zero (143, as 128 + SIGTERM)."""

    exit_code = 143


# Text from files and other programs in messages: a name read from a damaged header can be megabytes
# of binary. Both helpers are applied where such text enters a message and where a message is shown.

#: The most characters of one message that are shown (its start and end, with the cut said).
MESSAGE_LIMIT = 900


def shown(text: object, limit: int = 120) -> str:
    """An untrusted string (a key or tensor name read from a file) fit for a message: quoted and
    escaped as Python's ``repr`` does, at most ``limit`` characters of it."""
    value = str(text)
    if len(value) > limit:
        return repr(value[:limit]) + f" (+{len(value) - limit} characters)"
    return repr(value)


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """``message`` with control characters escaped and, past ``limit`` characters, its middle cut."""
    text = "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in message)
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 4
    return f"{text[:head]} [... {len(text) - head - tail} characters cut ...] {text[-tail:]}"
