"""The contract of executors: where the engine's independent shard jobs run.

The engine splits a merge into shard jobs (each writes one output file and needs nothing from the
others) and passes the executor the jobs plus the function that runs one. The executor never imports
the engine, so executors are plain plugins: threads in this process by default, a cluster elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


class Executor(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abstractmethod
    def run(self, jobs: Sequence[Job], run_job: Callable[[Job], Result]) -> list[Result]:
        """Run every job and return the results in job order; re-raise the first failure."""
