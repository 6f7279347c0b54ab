"""The contract of executors: where the engine's independent shard jobs run.

The engine splits a merge into shard jobs (each writes one output file and needs nothing from the
others) and passes the executor the jobs plus the function that runs one. The executor never imports
the engine, so executors are plain plugins: threads in this process by default, a cluster elsewhere.

An executor whose jobs run in other processes sets ``remote = True``. The engine then passes it a
picklable :class:`workbench.engine.shard_task.ShardTask` instead of a closure over open readers: the task
plans the recipe again in the worker, writes its one file under ``<out>.partial/`` on storage the
driver shares, and returns the file's checksum, which the driver verifies before recording it.

The Ray session helpers at the end (:func:`ray_session`, :func:`task_cause`, :data:`MAX_RETRIES`) are
shared by the ``ray`` executor plugin and the sweep's Ray backend (:mod:`workbench.sweep.backends`),
so the core never imports a plugin. Ray is optional: it is imported only when a helper is called.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from workbench.errors import WorkbenchError

Job = TypeVar("Job")
Result = TypeVar("Result")


class Executor(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    #: Whether jobs run outside this process (``run_job`` must then be picklable, see the module doc).
    remote: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        """``options`` come from the caller (``workbench run --address``, ``executor_options``)."""
        self.options = options

    @abstractmethod
    def run(
        self,
        jobs: Sequence[Job],
        run_job: Callable[[Job], Result],
        on_done: Callable[[Job, Result], None] | None = None,
    ) -> list[Result]:
        """Run every job and return the results in job order; re-raise the first failure.

        ``on_done(job, result)`` is called in the caller's thread as each job finishes (in finishing
        order), so the engine can record a finished file at once: a run stopped midway then resumes
        from every file that was done, not only from those of an earlier run."""


# --------------------------------------------------------------------------------------------------
# Ray sessions (for the ray executor and sweeps on Ray)
# --------------------------------------------------------------------------------------------------

#: Retries of a task whose worker died; Ray's own default for tasks.
MAX_RETRIES = 3
#: The object store of a local instance: tasks exchange only small results, so keep it small.
OBJECT_STORE_BYTES = 256 * 1024 * 1024


def import_ray() -> Any:
    """The ``ray`` module, or an error naming the extra to install (checked before any work starts)."""
    try:
        import ray
    except ImportError as exc:
        raise WorkbenchError(
            f"the 'ray' executor needs Ray, which is not installed ({exc}); install merge-workbench[ray]."
        ) from None
    return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module, initialised for the block and shared by merges and sweeps.

    An already initialised Ray (a caller's ``ray.init``) is used as it is and left running; else
    this connects to ``address`` or starts a small local instance, and shuts it down afterwards.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # 2.60 turns on token auth by default
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=int(num_cpus or os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            log_to_driver=False,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def task_cause(ray: Any, exc: BaseException) -> BaseException:
    """The exception a task raised, out of Ray's ``RayTaskError`` wrapper (other errors as they are)."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return cause
    return exc
