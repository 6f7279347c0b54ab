"""The contract of executors: where the engine's independent shard jobs run.

The engine splits a merge into shard jobs (each writes one output file and needs nothing from the
others) and passes the executor the jobs plus the function that runs one. The executor never imports
the engine, so executors are plain plugins: threads in this process by default, a cluster elsewhere.

An executor whose jobs run in other processes sets ``remote = True``. The engine then passes it a
picklable :class:`workbench.engine.shard_task.ShardTask` instead of a closure over open readers: the task
plans the recipe again in the worker, writes its one file under ``<out>.partial/`` on storage the
driver shares, and returns the file's checksum, which the driver verifies before recording it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence, TypeVar

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
    def run(self, jobs: Sequence[Job], run_job: Callable[[Job], Result], on_done: Callable[[Job, Result], None] | None = None) -> list[Result]:
        """Run every job and return the results in job order; re-raise the first failure.

        ``on_done(job, result)`` is called in the caller's thread as each job finishes (in finishing
        order), so the engine can record a finished file at once: a run stopped midway then resumes
        from every file that was done, not only from those of an earlier run."""
