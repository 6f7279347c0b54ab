"""The runner: read -> method -> write for the tensors of one output file, one tensor (or row block) at a time.

A blockwise method (``MergeMethod.mode``) first gathers statistics of each large tensor from
its row blocks, read again in the compute thread (inputs are mapped: a pass costs page faults),
and is then fed the row blocks like an elementwise method.

Reading, computing and writing overlap: a reader thread prefetches the inputs of the next work
units into a bounded window, the calling thread runs the method, and a writer thread streams results
into the output file (torch and file I/O release the GIL). Peak memory is therefore bounded by the
work units in flight, never by the model size.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.dtypes import to_torch
from workbench.checkpoint.output_folder import DISK_FULL
from workbench.engine.manifest import Manifest
from workbench.engine.plan import CHUNK_ELEMENTS, MergePlan, PlannedTensor
from workbench.engine.progress import ProgressCallback, ProgressEvent, ProgressKind
from workbench.method import MergeMethod, PrepareContext, RowBlocks, TensorContext
from workbench.registry import Registry

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint import OutputFile

#: Results waiting for the writer thread: absorbs bursts of slow page-cache writes.
WRITE_QUEUE = 4


ALIGN_ELEMENTS = 1 << 18


def row_blocks(
    tensor: PlannedTensor, by_rows: bool, align: int = 1, whole_rows: bool = False
) -> list[tuple[int, int] | None]:
    """Row ranges ``[start, stop)`` of dimension 0 that split a large tensor into work units (``[None]``:
    the whole tensor). Each block holds whole rows of the last dimension; with ``whole_rows`` (a rowwise
    method) a 1-D tensor, a single row, stays whole."""
    shape = tensor.shape
    numel = math.prod(shape)
    if not by_rows or not shape or numel <= CHUNK_ELEMENTS or shape[0] < 2 or (whole_rows and len(shape) < 2):
        return [None]
    row = numel // shape[0]
    step = max(1, CHUNK_ELEMENTS // max(row, 1))
    aligned = align // math.gcd(row, align)  # rows per aligned start
    if aligned * row <= 2 * CHUNK_ELEMENTS:
        step = max(aligned, step // aligned * aligned)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


class RunProgress:
    """Counts finished tensors across output files (which an executor may run concurrently)."""

    def __init__(self, plan: MergePlan, callback: ProgressCallback | None, todo: list["OutputFile"]) -> None:
        """Counts the work of the files in ``todo`` (a resumed run skips the finished ones)."""
        names = {spec.name for file in todo for spec in file.tensors}
        self.callback = callback
        self.total = len(names)
        self.total_bytes = sum(t.input_bytes for t in plan.tensors if t.name in names)
        self.done = 0
        self.bytes_read = 0
        self._lock = threading.Lock()

    def emit(
        self,
        kind: ProgressKind,
        tensor: str | None = None,
        nbytes: int = 0,
        finished: bool = False,
        note: str | None = None,
    ) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.done += int(finished)
            event = ProgressEvent(
                kind, self.done, self.total, self.bytes_read, self.total_bytes, tensor, note
            )
        if self.callback is not None:
            self.callback(event)


class TensorRunner:
    """Runs the method over the tensors of one output file at a time."""

    def __init__(
        self,
        plan: MergePlan,
        method: MergeMethod,
        state: Any,
        device: str,
        prefetch: int,
        progress: RunProgress,
    ) -> None:
        self.plan = plan
        self.method = method
        self.state = state
        self.device = device
        self.prefetch = max(1, prefetch)
        self.progress = progress
        self.compute_dtype = to_torch(plan.compute_dtype)
        self.by_name = {t.name: t for t in plan.tensors}
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        #: A blockwise method's statistics, by tensor, from its first row block to its last.
        self._statistics: dict[str, Any] = {}

    def _blocks(self, tensor: PlannedTensor) -> list[tuple[int, int] | None]:
        return row_blocks(
            tensor,
            self.method.row_blocks and tensor.merge,
            ALIGN_ELEMENTS if self.method.mode == "blockwise" else 1,
            whole_rows=self.method.mode == "rowwise",
        )

    def _units(self, file: "OutputFile") -> Iterator[tuple[PlannedTensor, tuple[int, int] | None, bool]]:
        for spec in file.tensors:
            tensor = self.by_name[spec.name]
            blocks = self._blocks(tensor)
            for i, rows in enumerate(blocks):
                yield tensor, rows, i == len(blocks) - 1

    def _read(self, tensor: PlannedTensor, rows: tuple[int, int] | None) -> list["torch.Tensor"]:
        sources = self.plan.inputs if tensor.merge else [self.plan.reference]
        return [model.reader.read(tensor.name, rows) for model in sources]

    def warn(self, key: str, message: str) -> None:
        with self._lock:
            if key not in self._warned:
                self._warned.add(key)
                self.warnings.append(message)

    def _split(self, inputs: list["torch.Tensor"]) -> tuple[list["torch.Tensor"], "torch.Tensor | None"]:
        """(models, base) on the merge device."""
        moved = [x.to(self.device, non_blocking=True) for x in inputs] if self.device != "cpu" else inputs
        return (moved[1:], moved[0]) if self.plan.base is not None else (moved, None)

    def _gathered(
        self,
        tensor: PlannedTensor,
        rows: tuple[int, int] | None,
        models: list["torch.Tensor"],
        base: "torch.Tensor | None",
        last: bool,
        ctx: TensorContext,
    ) -> Any:
        """The blockwise method's statistics of this tensor: gathered at its first row block (which
        is already read), kept until its last."""
        if tensor.name not in self._statistics:

            def read(block: tuple[int, int] | None) -> tuple[list["torch.Tensor"], "torch.Tensor | None"]:
                return (models, base) if block == rows else self._split(self._read(tensor, block))

            blocks = RowBlocks(tensor.shape, self._blocks(tensor), read)
            assert tensor.params is not None  # the planner gives every merged tensor its parameters
            self._statistics[tensor.name] = self.method.tensor_statistics(
                blocks, tensor.params, tensor.model_params, ctx
            )
        return self._statistics.pop(tensor.name) if last else self._statistics[tensor.name]

    def _compute(
        self,
        tensor: PlannedTensor,
        rows: tuple[int, int] | None,
        inputs: list["torch.Tensor"],
        last: bool = True,
    ) -> "torch.Tensor":
        if not tensor.merge:
            return inputs[0]
        assert tensor.params is not None  # the planner gives every merged tensor its parameters
        models, base = self._split(inputs)
        ctx = TensorContext(
            name=tensor.name,
            layer_index=tensor.place.layer_index,
            layer_count=self.plan.layer_count,
            module_kind=tensor.place.module_kind,
            shape=tensor.shape,
            device=self.device,
            compute_dtype=self.compute_dtype,
            out_dtype=to_torch(tensor.out_dtype),
            seed=tensor.seed,
            state=self.state,
        )
        statistics = (
            self._gathered(tensor, rows, models, base, last, ctx) if self.method.mode == "blockwise" else None
        )
        ctx = dataclasses.replace(ctx, rows=rows, statistics=statistics)
        out = self.method.apply(models, base, tensor.params, tensor.model_params, ctx)
        expected = tuple(inputs[0].shape)
        if tuple(out.shape) != expected:
            raise RuntimeError(
                f"method '{self.method.name}' returned shape {list(out.shape)} for tensor '{tensor.name}', "
                f"expected {list(expected)}"
            )
        out = out.to(ctx.out_dtype)
        if out.device.type != "cpu":
            out = out.cpu()
        from workbench_kernels.finite import all_finite

        if not all_finite(out):
            culprits = [str(m) for m, x in zip(self.plan.inputs, inputs) if not all_finite(x)]
            cause = (
                f"input {', '.join(culprits)} hold(s) NaN/Inf values"
                if culprits
                else "the method produced them"
            )
            self.warn(tensor.name, f"tensor '{tensor.name}': the merged tensor has NaN/Inf values; {cause}.")
        return out

    def write_file(self, directory: Path, file: "OutputFile", manifest: Manifest | None = None) -> Path:
        """Write one output file; once it is whole, list it in ``manifest``. A file cut short by a
        failure is removed (it would only mislead; a resumed run writes it again)."""
        path = directory / file.name
        try:
            sha256 = self._write_file(path, file)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
        if manifest is not None:
            manifest.record(path, sha256)
        return path

    def _write_file(self, path: Path, file: "OutputFile") -> str | None:
        writer = self.plan.output_format.open_file(path, file.tensors)
        readers = ThreadPoolExecutor(1, thread_name_prefix="workbench-read")
        writers = ThreadPoolExecutor(1, thread_name_prefix="workbench-write")
        pending_reads: deque[tuple[PlannedTensor, Any, bool, Future[list["torch.Tensor"]]]] = deque()
        pending_writes: deque[Future[None]] = deque()
        units = self._units(file)

        def submit_next() -> None:
            unit = next(units, None)
            if unit is not None:
                tensor, rows, last = unit
                pending_reads.append((tensor, rows, last, readers.submit(self._read, tensor, rows)))

        try:
            for _ in range(self.prefetch):
                submit_next()
            while pending_reads:
                tensor, rows, last, future = pending_reads.popleft()
                inputs = future.result()
                submit_next()
                out = self._compute(tensor, rows, inputs, last)
                nbytes = sum(x.numel() * x.element_size() for x in inputs)
                del inputs
                while len(pending_writes) >= WRITE_QUEUE:
                    pending_writes.popleft().result()
                pending_writes.append(writers.submit(writer.write, tensor.name, out))
                del out
                self.progress.emit("tensor", tensor.name, nbytes, finished=last)
            while pending_writes:
                pending_writes.popleft().result()
            if not writer.complete:
                raise RuntimeError(f"{file.name} was not completely written")
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            writers.shutdown(wait=True, cancel_futures=True)
            writer.close()
        return writer.sha256


@contextmanager
def merge_runtime(device: str) -> Iterator[None]:
    """Leave a core to the reader and writer threads, and keep the cyclic GC out of the hot loop.

    On a 2-core machine, two torch threads competing with the I/O threads measured slower and far
    noisier than one; the GC's full passes over torch's objects cost ~7% of a merge.
    """
    import torch

    threads = torch.get_num_threads()
    gc_enabled = gc.isenabled()
    if device == "cpu":
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    gc.disable()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if gc_enabled:
            gc.enable()


def prepare_state(
    plan: MergePlan, registry: Registry, method: MergeMethod, device: str, note: Callable[[str], None]
) -> Any:
    """The method's global state (``prepare``): shared by the driver and remote shard tasks, which
    must both derive it from the same plan."""
    return method.prepare(
        PrepareContext(
            models=[m.reader for m in plan.models],
            base=plan.base.reader if plan.base else None,
            params=plan.params,
            model_params=plan.model_params,
            tensor_names=[t.name for t in plan.tensors],
            device=device,
            seed=plan.recipe.seed,
            compute_dtype=to_torch(plan.compute_dtype),
            layer_count=plan.layer_count,
            model_refs=[m.ref for m in plan.models],
            base_ref=plan.base.ref if plan.base else None,
            registry=registry,
            note=note,
        )
    )
