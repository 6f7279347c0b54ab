"""What every command of the ``workbench`` command line shares: the console, markup escaping, warnings,
the registry with its load problems shown, and turning a ``WorkbenchError`` into a message and an exit status."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from workbench.errors import RunInterrupted, Terminated, WorkbenchError, bounded


def terminal(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def escape(text: object) -> str:
    """Messages hold paths and tensor names, which may contain '[...]': never read them as markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def warn(messages: list[str]) -> None:
    err = terminal(stderr=True)
    for message in messages:
        err.print(f"[yellow]warning:[/] {escape(message)}", markup=True)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ``WorkbenchError`` into a one-paragraph message and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # SIGTERM stops a command the way Ctrl-C does (a run says what it kept), not silently
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return func(*args, **kwargs)
        except RunInterrupted as exc:
            terminal(stderr=True).print(f"[bold yellow]stopped:[/] {escape(bounded(str(exc)))}", markup=True)
            sys.exit(exc.exit_code)
        except WorkbenchError as exc:
            terminal(stderr=True).print(f"[bold red]error:[/] {escape(bounded(str(exc)))}", markup=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            terminal(stderr=True).print(
                f"[bold red]{what}:[/] nothing was written at the output path.", markup=True
            )
            sys.exit(exc.exit_code if isinstance(exc, Terminated) else 130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def load_registry() -> Any:
    from workbench.registry import get_registry

    registry = get_registry()
    warn(registry.problems)
    return registry
