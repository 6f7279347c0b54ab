"""The ``ray`` executor: each output file of a merge is a Ray task, on a cluster or a local instance.

Ray is an optional extra (``merge-workbench[ray]``): it is imported only when this executor runs.
A task whose worker process dies (killed, out of memory, node lost) is retried by Ray up to
``max_retries`` times; an error raised by the merge itself is not retried, since it would only
fail again, and reaches the user as the original message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from workbench import hookimpl
from workbench.errors import WorkbenchError
from workbench.executor import Executor

Job = TypeVar("Job")
Result = TypeVar("Result")

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
        ray.init(num_cpus=int(num_cpus or os.cpu_count() or 1), include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False)
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


class RayExecutor(Executor):
    """Options: ``address`` (a running cluster; default: start a local instance), ``num_cpus`` (of a
    local instance; default: the CPU count), ``max_retries``, ``runtime_env`` (for the tasks)."""

    name = "ray"
    summary = "Run each output file as a Ray task (a cluster with --address, else a local instance)."
    remote = True

    def run(self, jobs: Sequence[Job], run_job: Callable[[Job], Result], on_done: Callable[[Job, Result], None] | None = None) -> list[Result]:
        if not jobs:
            return []
        num_cpus = self.options.get("num_cpus")
        with ray_session(self.options.get("address"), int(num_cpus) if num_cpus else None) as ray:
            task = ray.remote(max_retries=int(self.options.get("max_retries", MAX_RETRIES)), retry_exceptions=False)(_call)
            options = {"runtime_env": self.options["runtime_env"]} if self.options.get("runtime_env") else {}
            job_fn = ray.put(run_job)
            refs = [task.options(**options).remote(job_fn, job) for job in jobs]
            return self._gather(ray, refs, list(jobs), on_done)

    @staticmethod
    def _gather(ray: Any, refs: list[Any], jobs: list[Any], on_done: Callable[[Any, Any], None] | None) -> list[Any]:
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
WORKBENCH_API = "1.0"


@hookimpl
def register_executors(register: Callable[[type[Executor]], None]) -> None:
    register(RayExecutor)
