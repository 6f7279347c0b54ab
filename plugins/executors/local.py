"""The default executor: shard jobs run one after another in this process.

Each job already overlaps reading, computing and writing on threads inside the engine, so running
shards concurrently on a two-core machine would only compete for the same cores and memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from workbench.executor import Executor
from workbench.hookspecs import hookimpl

Job = TypeVar("Job")
Result = TypeVar("Result")


class LocalExecutor(Executor):
    name = "local"
    summary = "Run shard jobs in this process, in order (default)."

    def run(
        self,
        jobs: Sequence[Job],
        run_job: Callable[[Job], Result],
        on_done: Callable[[Job, Result], None] | None = None,
    ) -> list[Result]:
        results = []
        for job in jobs:
            results.append(run_job(job))
            if on_done is not None:
                on_done(job, results[-1])
        return results


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_executors(register: Callable[[type[Executor]], None]) -> None:
    register(LocalExecutor)
