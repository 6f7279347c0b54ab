"""The ``ray`` executor: each output file of a merge is a Ray task, on a cluster or a local instance.

Ray is an optional extra (``merge-workbench[ray]``): it is imported only when this executor runs.
A task whose worker process dies (killed, out of memory, node lost) is retried by Ray up to
``max_retries`` times; an error raised by the merge itself is not retried, since it would only
fail again, and reaches the user as the original message. The Ray session itself (start, stop,
retries, unwrapping a task's error) is :mod:`workbench.executor`'s, shared with sweeps on Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from workbench.executor import MAX_RETRIES, Executor, ray_session, task_cause
from workbench.hookspecs import hookimpl

Job = TypeVar("Job")
Result = TypeVar("Result")


class RayExecutor(Executor):
    """Options: ``address`` (a running cluster; default: start a local instance), ``num_cpus`` (of a
    local instance; default: the CPU count), ``max_retries``, ``runtime_env`` (for the tasks)."""

    name = "ray"
    summary = "Run each output file as a Ray task (a cluster with --address, else a local instance)."
    remote = True

    def run(
        self,
        jobs: Sequence[Job],
        run_job: Callable[[Job], Result],
        on_done: Callable[[Job, Result], None] | None = None,
    ) -> list[Result]:
        if not jobs:
            return []
        num_cpus = self.options.get("num_cpus")
        with ray_session(self.options.get("address"), int(num_cpus) if num_cpus else None) as ray:
            task = ray.remote(
                max_retries=int(self.options.get("max_retries", MAX_RETRIES)), retry_exceptions=False
            )(_call)
            options = {"runtime_env": self.options["runtime_env"]} if self.options.get("runtime_env") else {}
            job_fn = ray.put(run_job)
            refs = [task.options(**options).remote(job_fn, job) for job in jobs]
            return self._gather(ray, refs, list(jobs), on_done)

    @staticmethod
    def _gather(
        ray: Any, refs: list[Any], jobs: list[Any], on_done: Callable[[Any, Any], None] | None
    ) -> list[Any]:
        """Results in job order, each handed to ``on_done`` as it arrives. On the first failure,
        cancel the other tasks and wait for them, so nothing writes into the output folder after the
        engine removes it, then raise the cause."""
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = index[done[0]]
                results[i] = ray.get(done[0])
                if on_done is not None:
                    on_done(jobs[i], results[i])
            return results
        except BaseException as exc:
            for ref in refs:
                ray.cancel(ref)
            ray.wait(refs, num_returns=len(refs), timeout=60)
            cause = task_cause(ray, exc)
            if cause is not exc:
                raise cause from None
            raise


def _call(run_job: Callable[[Any], Any], job: Any) -> Any:
    """The Ray task: one job in a worker process."""
    return run_job(job)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_executors(register: Callable[[type[Executor]], None]) -> None:
    register(RayExecutor)
