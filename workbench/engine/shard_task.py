"""One output file of a merge as a picklable task, for executors that run jobs in other processes.

The engine's in-process job is a closure over open readers and the method's prepared state, which
cannot be sent to another machine. A :class:`ShardTask` instead carries the resolved recipe: the
worker plans it again from the checkpoint headers (reading inputs from shared storage or its Hub
cache), runs the method's ``prepare`` itself, writes its one file into ``<out>.partial/`` and returns
the file's checksum. The driver then checks each file against that checksum on its own view of the
storage (:func:`record_shard`), so an output folder that is not shared fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from workbench.engine.manifest import Manifest, sha256_file
from workbench.errors import OutputError, WorkbenchError
from workbench.method import MergeMethod

if TYPE_CHECKING:
    from workbench.checkpoint import OutputFile
    from workbench.engine.plan import MergePlan
    from workbench.engine.runner import RunProgress, TensorRunner


class ShardResult(NamedTuple):
    """What a worker reports about the file it wrote."""

    name: str
    sha256: str
    size: int
    warnings: list[str]


def check_remote(plan: MergePlan, executor: str) -> None:
    """Refuse, before anything is written, a method whose prepared state is the product of the run.

    Methods that write extras (atlas, ot_fusion, lora_experts: trained coefficients, fusion maps,
    routers) or that declare the memory their ``prepare`` holds compute heavy whole-model state; every
    worker would compute it again, or it would have to be shipped. They run locally instead.
    """
    method = plan.method
    if method.write_extras is not MergeMethod.write_extras or plan.prepare_memory is not None:
        raise WorkbenchError(
            f"method '{method.name}' computes whole-model state before merging, which the '{executor}' executor"
            f" would have to repeat on every worker; run it with --executor local."
        )


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """Relative model paths in a recipe mean the driver's working directory (one task at a time
    runs in a worker process, so changing it for the task is safe)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass(frozen=True)
class ShardTask:
    """Writes one planned output file in whatever process calls it; see the module docstring."""

    recipe_yaml: str
    out_dir: str
    partial: str
    device: str
    prefetch: int
    cwd: str

    def __call__(self, file: OutputFile) -> ShardResult:
        from workbench.engine.plan import build_plan
        from workbench.engine.runner import (
            RunProgress,
            TensorRunner,
            merge_runtime,
            prepare_state,
        )
        from workbench.recipe.schema import parse_recipe
        from workbench.registry import get_registry

        registry = get_registry()
        with _working_directory(self.cwd):
            plan = build_plan(
                parse_recipe(self.recipe_yaml, "<shard task>"), registry, out=self.out_dir, check_output=False
            )
        try:
            planned = next((f for f in plan.files if f.name == file.name), None)
            if planned is None or planned.tensors != file.tensors:
                raise OutputError(
                    f"the worker planned {file.name} differently from the driver: do the inputs and plugins on the"
                    " workers match the driver's?"
                )
            method = plan.instance
            state = prepare_state(plan, registry, method, self.device, lambda text: None)
            runner = TensorRunner(
                plan, method, state, self.device, self.prefetch, RunProgress(plan, None, [planned])
            )
            with merge_runtime(self.device):
                path = runner.write_file(Path(self.partial), planned)
        finally:
            plan.close()
        return ShardResult(file.name, sha256_file(path), path.stat().st_size, runner.warnings)


def record_shard(
    plan: MergePlan,
    file: OutputFile,
    result: ShardResult,
    manifest: Manifest,
    runner: TensorRunner,
    progress: RunProgress,
) -> None:
    """Check a file a worker wrote against its reported size and checksum, as this machine reads
    it, then list it in the manifest (so that ``--resume`` keeps it)."""
    by_name = {t.name: t for t in plan.tensors}
    path = manifest.directory / file.name
    try:
        size, sha256 = path.stat().st_size, sha256_file(path)
    except FileNotFoundError:
        raise OutputError(
            f"a worker wrote {file.name} but it is not in {manifest.directory} here: the output folder must be on"
            " storage shared by the driver and every worker."
        ) from None
    if result.name != file.name or (size, sha256) != (result.size, result.sha256):
        raise OutputError(
            f"{path} ({size} bytes, sha256 {sha256[:12]}) is not the file the worker wrote ({result.size} bytes,"
            f" sha256 {result.sha256[:12]}): is the output folder on storage shared by every worker?"
        )
    manifest.record(path, sha256)
    for message in result.warnings:
        runner.warn(message, message)
    for spec in file.tensors:
        progress.emit("tensor", spec.name, by_name[spec.name].input_bytes, finished=True)
