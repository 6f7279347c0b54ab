"""Where a sweep's candidates run (this process, spawned processes, Ray tasks), and the CMA-ES
search, which proposes candidates generation by generation instead of as one list.

Kept apart from :mod:`workbench.sweep.search` (which builds candidates and keeps the results table) so each
backend only has to turn picklable :class:`~workbench.sweep.candidates.CandidateTask` objects into
:class:`~workbench.sweep.candidates.CandidateResult` rows. Every backend yields rows as candidates finish and
never raises for one candidate: a failure is a ``failed`` row, and the sweep goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import numpy as np

from workbench.errors import RecipeError
from workbench.executor import MAX_RETRIES, import_ray, ray_session, task_cause
from workbench.sweep.candidates import CandidateResult, CandidateTask, Setting, run_one

#: Where candidates can run (``--executor``).
EXECUTORS = ("local", "ray")


def check_executor(executor: str, address: str | None) -> None:
    """Refuse an unknown executor, an ``address`` without Ray, or Ray not installed, before any
    candidate runs (so a sweep folder is not started for nothing)."""
    if executor not in EXECUTORS:
        raise RecipeError(f"--executor must be one of {', '.join(EXECUTORS)}, got '{executor}'.")
    if address and executor != "ray":
        raise RecipeError(
            f"--address names a Ray cluster, so it needs --executor ray (the executor is '{executor}')."
        )
    if executor == "ray":
        import_ray()


def _run_in_worker(task: CandidateTask, metric: str | None) -> CandidateResult:
    """Entry point of a worker process or Ray task (top level, so it pickles); loads its own registry."""
    return run_one(task, None, metric)


def _worker_failed(task: CandidateTask, exc: BaseException) -> CandidateResult:
    """The row of a candidate whose worker, rather than the candidate itself, failed."""
    return CandidateResult(
        task.id, task.settings, "failed", error=f"worker process failed ({type(exc).__name__}: {exc})"
    )


def run_candidates(
    tasks: list[CandidateTask],
    run: Callable[[CandidateTask], CandidateResult],
    jobs: int,
    metric: str | None = None,
    *,
    executor: str = "local",
    address: str | None = None,
) -> Iterator[CandidateResult]:
    """Yield each candidate's result as it finishes.

    ``local``: in order here with ``jobs == 1`` (using ``run``, which shares the caller's registry),
    otherwise in ``jobs`` spawned processes (a fresh interpreter each: torch and forked threads do
    not mix). ``ray``: one Ray task per candidate; see :func:`run_on_ray`.
    """
    check_executor(executor, address)
    if executor == "ray":
        yield from run_on_ray(tasks, metric, address)
        return
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield run(task)
        return
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_in_worker, task, metric): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # the worker died (out of memory, killed)
                yield _worker_failed(futures[future], exc)


def run_on_ray(
    tasks: list[CandidateTask], metric: str | None, address: str | None = None, max_retries: int | None = None
) -> Iterator[CandidateResult]:
    """One Ray task per candidate, on ``address`` or a local instance (or a Ray the caller started).

    A task whose worker dies is retried ``max_retries`` times (the ``ray`` executor's default); a
    candidate's own errors are already failed rows (``run_one`` catches them), so they are not retried.
    Workers load the plugin registry themselves: they need the same plugins installed.
    """
    if not tasks:
        return
    with ray_session(address) as ray:
        remote = ray.remote(
            max_retries=MAX_RETRIES if max_retries is None else max_retries, retry_exceptions=False
        )(_run_in_worker)
        pending: dict[Any, CandidateTask] = {remote.remote(task, metric): task for task in tasks}
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # retries used up, or the task could not run at all
                    result = _worker_failed(task, task_cause(ray, exc))
                yield result
        finally:  # stopped early (Ctrl-C, the caller gave up): leave no task running
            for ref in pending:
                ray.cancel(ref)


def check_cma(settings: list[Setting], budget: int | None) -> None:
    """Refuse a cma search that cannot run (no budget, a list of values, no ``cma``) before anything runs."""
    if budget is None:
        raise RecipeError("--search cma needs --budget N: how many candidates to merge and score.")
    listed = [s.label for s in settings if s.bounds is None]
    if listed:
        raise RecipeError(
            f"--search cma needs a range LO:HI for every --set (e.g. {listed[0]}=0.1:1.5), not a list of "
            f"values: {', '.join(listed)}."
        )
    try:
        import cma  # noqa: F401
    except ImportError as exc:
        raise RecipeError(
            f"--search cma needs the 'cma' package, which is not installed ({exc}); install merge-workbench[sweep]."
        ) from None


def cma_search(
    settings: list[Setting],
    budget: int,
    seed: int,
    evaluate: Callable[[list[dict[str, Any]]], list[float | None]],
) -> None:
    """Maximise ``evaluate`` (None: a failed candidate) over the settings' ranges with CMA-ES, for
    ``budget`` candidates at most, one generation per ``evaluate`` call.

    The ranges are scaled to [0, 1] so one step size suits all of them; values are rounded to 6
    decimals so a candidate's id is stable. The search is deterministic for a seed and the same
    scores, which is what makes a rerun resume: it proposes the same candidates and finds them scored.
    """
    import cma

    lows = np.array([s.bounds[0] for s in settings if s.bounds])
    spans = np.array([s.bounds[1] - s.bounds[0] for s in settings if s.bounds])
    options = {
        "bounds": [0.0, 1.0],
        "seed": seed % 2**31 + 1,  # cma takes seed 0 to mean "from the clock"
        "maxfevals": budget,
        "verbose": -9,
        "maxstd_boundrange": float("inf"),  # cma 4.5 fails on one variable with the default std limit
    }
    search = cma.CMAEvolutionStrategy([0.5] * len(settings), 0.3, options)
    left = budget
    while left > 0 and not search.stop():
        points = search.ask()
        values = [np.round(lows + spans * np.clip(x, 0.0, 1.0), 6) for x in points[:left]]
        scores = evaluate([{s.label: float(v) for s, v in zip(settings, value)} for value in values])
        left -= len(values)
        if len(values) < len(points):  # the budget ends inside a generation: nothing to learn from
            return
        worst = min((v for v in scores if v is not None), default=0.0) - 1.0
        search.tell(points, [-(worst if v is None else v) for v in scores])
