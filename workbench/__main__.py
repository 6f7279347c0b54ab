"""The ``workbench`` command and ``python -m workbench``: the command line, then a quick exit.

A finished command ends the process with :func:`exit_now` instead of the interpreter's own
shutdown: with torch and Numba loaded, tearing down their modules and C++ state took 0.6-1 s after
every command on the 2-core development machine (measured: ``python -c "import torch"`` and a
command that ran one kernel, each with and without it), time a user waits for nothing.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def run() -> NoReturn:
    from workbench.cli.main import main

    try:
        main(prog_name="workbench")
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    exit_now(code)


def exit_now(code: object) -> NoReturn:
    """End the process as ``sys.exit(code)`` would, without finalizing the interpreter: other
    threads are waited for and the ``atexit`` handlers run, as in a normal exit, and the standard
    streams are flushed; only the teardown of modules and objects is skipped."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    shutdown = getattr(threading, "_shutdown", None)  # CPython's: what a normal exit runs first
    if shutdown is None:  # another interpreter: its ordinary exit
        sys.exit(code)  # type: ignore[arg-type]
    shutdown()  # joins the threads that are not daemons
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(status)


if __name__ == "__main__":
    run()
