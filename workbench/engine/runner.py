"""The streaming merge engine: plan -> read -> method -> write, one tensor (or row block) at a time.

A blockwise method (``MergeMethod.blockwise``) first gathers statistics of each large tensor from
its row blocks, read again in the compute thread (inputs are mapped: a pass costs page faults),
and is then fed the row blocks like an elementwise method.

Reading, computing and writing overlap: a reader thread prefetches the inputs of the next work
units into a bounded window, the calling thread runs the method, and a writer thread streams results
into the output file (torch and file I/O release the GIL). Peak memory is therefore bounded by the
work units in flight, never by the model size. Output goes to ``<out>.partial/`` and is renamed into
place only when complete; a failure removes it, so nothing half-written is ever at the final path.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from workbench.checkpoint.dtypes import to_torch, torch_name
from workbench.checkpoint.resolve import ensure_local
from workbench.checkpoint.sidecars import copy_config, copy_tokenizer
from workbench.errors import CheckpointError, OutputError, RecipeError, RunInterrupted, WorkbenchError
from workbench.hub.card import card_text
from workbench.method import MergeMethod, PrepareContext, RowBlocks, TensorContext
from workbench.engine.manifest import MANIFEST_FILE, Manifest, run_identity
from workbench.checkpoint.output_folder import DISK_FULL, PARTIAL_MARKER, check_free_space, partial_folder, publish, start_partial
from workbench.engine.plan import CHUNK_ELEMENTS, MergePlan, PlannedTensor, build_plan
from workbench.engine.progress import ProgressCallback, ProgressEvent
from workbench.recipe.schema import Recipe, load_recipe
from workbench.registry import Registry, get_registry, require_plugins

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint import OutputFile

RECIPE_FILE = "workbench_recipe.yaml"
#: Results waiting for the writer thread: absorbs bursts of slow page-cache writes.
WRITE_QUEUE = 4


@dataclass
class RunResult:
    out_dir: Path
    files: list[Path]
    tensors: int
    bytes_read: int
    bytes_written: int
    #: Seconds from the first read to the final rename (planning and start-up excluded).
    seconds: float
    warnings: list[str] = field(default_factory=list)
    #: Scores of the recipe's evaluators on the output, by evaluator name.
    evaluations: dict[str, dict[str, float | str]] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"device '{device}' was requested but CUDA is not available here; use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise WorkbenchError(f"unknown device '{device}' (use cpu, cuda or auto).")
    return device


#: Row blocks of a blockwise method start at multiples of this many elements where the row length
#: allows it within twice ``CHUNK_ELEMENTS``, so that statistics summed per fixed block (L1 norms,
#: slerp's dot products) meet the same partial sums as over the whole tensor.
ALIGN_ELEMENTS = 1 << 18


def _row_blocks(tensor: PlannedTensor, by_rows: bool, align: int = 1) -> list[tuple[int, int] | None]:
    shape = tensor.shape
    numel = math.prod(shape)
    if not by_rows or not shape or numel <= CHUNK_ELEMENTS or shape[0] < 2:
        return [None]
    row = numel // shape[0]
    step = max(1, CHUNK_ELEMENTS // max(row, 1))
    aligned = align // math.gcd(row, align)  # rows per aligned start
    if aligned * row <= 2 * CHUNK_ELEMENTS:
        step = max(aligned, step // aligned * aligned)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


class _Progress:
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

    def emit(self, kind: str, tensor: str | None = None, nbytes: int = 0, finished: bool = False, note: str | None = None) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.done += int(finished)
            event = ProgressEvent(kind, self.done, self.total, self.bytes_read, self.total_bytes, tensor, note)  # type: ignore[arg-type]
        if self.callback is not None:
            self.callback(event)


class _TensorRunner:
    """Runs the method over the tensors of one output file at a time."""

    def __init__(self, plan: MergePlan, method: MergeMethod, state: Any, device: str, prefetch: int, progress: _Progress) -> None:
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
        return _row_blocks(tensor, self.method.row_blocks and tensor.merge, ALIGN_ELEMENTS if self.method.blockwise else 1)

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

    def _gathered(self, tensor: PlannedTensor, rows: tuple[int, int] | None, models: list["torch.Tensor"], base: "torch.Tensor | None", last: bool, ctx: TensorContext) -> Any:
        """The blockwise method's statistics of this tensor: gathered at its first row block (which
        is already read), kept until its last."""
        if tensor.name not in self._statistics:
            def read(block: tuple[int, int] | None) -> tuple[list["torch.Tensor"], "torch.Tensor | None"]:
                return (models, base) if block == rows else self._split(self._read(tensor, block))

            blocks = RowBlocks(tensor.shape, self._blocks(tensor), read)
            self._statistics[tensor.name] = self.method.tensor_statistics(blocks, tensor.params, tensor.model_params, ctx)  # type: ignore[arg-type]
        return self._statistics.pop(tensor.name) if last else self._statistics[tensor.name]

    def _compute(self, tensor: PlannedTensor, rows: tuple[int, int] | None, inputs: list["torch.Tensor"], last: bool = True) -> "torch.Tensor":
        if not tensor.merge:
            return inputs[0]
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
        statistics = self._gathered(tensor, rows, models, base, last, ctx) if self.method.blockwise else None
        ctx = dataclasses.replace(ctx, rows=rows, statistics=statistics)
        out = self.method.apply(models, base, tensor.params, tensor.model_params, ctx)  # type: ignore[arg-type]
        expected = tuple(inputs[0].shape)
        if tuple(out.shape) != expected:
            raise RuntimeError(
                f"method '{self.method.name}' returned shape {list(out.shape)} for tensor '{tensor.name}', expected {list(expected)}"
            )
        out = out.to(ctx.out_dtype)
        if out.device.type != "cpu":
            out = out.cpu()
        from workbench_kernels.finite import all_finite

        if not all_finite(out):
            culprits = [str(m) for m, x in zip(self.plan.inputs, inputs) if not all_finite(x)]
            cause = f"input {', '.join(culprits)} hold(s) NaN/Inf values" if culprits else "the method produced them"
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
def _merge_runtime(device: str) -> Iterator[None]:
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


def _finish_folder(plan: MergePlan, partial: Path, recipe_yaml: str, title: str, warn: Callable[[str], None]) -> None:
    """Sidecar files, the resolved recipe and the model card."""
    out_dtype = next((t.out_dtype for t in plan.tensors if t.merge), None)
    copy_config(plan.reference.path, partial, torch_name(out_dtype) if out_dtype else None, plan.reference.reader.config())
    source = plan.recipe.output.copy_tokenizer_from
    model = None  # the input the tokenizer comes from, if it is one
    if source is None or source == "base":
        model = plan.reference
    elif isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        index = int(source)
        if not 0 <= index < len(plan.models):
            raise RecipeError(f"output.copy_tokenizer_from = {source}: there is no models[{index}].")
        model = plan.models[index]
    tokenizer_from = model.path if model is not None else Path(str(source))
    if not tokenizer_from.exists():
        raise RecipeError(f"output.copy_tokenizer_from: {source} does not exist.")
    if not copy_tokenizer(tokenizer_from, partial) and model is not None:
        try:
            model.reader.embedded_tokenizer(partial)
        except CheckpointError as exc:  # the weights are the result: keep them, say what is missing
            warn(f"{exc} The output has no tokenizer; name a folder with tokenizer files in output.copy_tokenizer_from.")
    (partial / RECIPE_FILE).write_text(recipe_yaml)
    (partial / "README.md").write_text(card_text(plan, recipe_yaml, title))


def _open_manifest(plan: MergePlan, device: str, resume: bool) -> Manifest:
    """The manifest of ``<out>.partial/``: a fresh one, or with ``resume`` the one a stopped run of
    the same recipe over the same inputs left, keeping only files whose bytes are still intact."""
    assert plan.out_dir is not None
    identity = run_identity(plan, device)
    partial = partial_folder(plan.out_dir)
    if resume and (partial / PARTIAL_MARKER).exists() and (partial / MANIFEST_FILE).exists():
        manifest = Manifest.read(partial)
        changed = manifest.changes(identity)
        if changed:
            raise OutputError(
                f"cannot resume {plan.out_dir}: the unfinished output in {partial} was started with a different"
                f" {', '.join(changed)}. Run without --resume to start over."
            )
        manifest.files = {f.name: manifest.files[f.name] for f in plan.files if manifest.intact(f.name)}
        manifest.save()
        check_free_space(plan.out_dir, sum(f.nbytes for f in plan.files if f.name not in manifest.files))
        return manifest
    check_free_space(plan.out_dir, plan.output_bytes)
    manifest = Manifest(start_partial(plan.out_dir), identity)
    manifest.save()
    return manifest


def _stopped(what: str, plan: MergePlan, manifest: Manifest) -> str:
    """The end of the message of a run that stopped: what is kept, and how to go on."""
    done = sum(f.name in manifest.files for f in plan.files)
    if not done:
        return f"{what}; nothing was written at {plan.out_dir}."
    return (
        f"{what}; nothing was written at {plan.out_dir}. {done} of {len(plan.files)} output files are finished"
        f" and kept in {manifest.directory}: run the same command with --resume to continue."
    )


def prepare_state(plan: MergePlan, registry: Registry, method: MergeMethod, device: str, note: Callable[[str], None]) -> Any:
    """The method's global state (``prepare``): shared by the driver and remote shard tasks, which
    must both derive it from the same plan."""
    return method.prepare(
        PrepareContext(models=[m.reader for m in plan.models], base=plan.base.reader if plan.base else None,
                       params=plan.params, model_params=[m.parameters for m in plan.models],
                       tensor_names=[t.name for t in plan.tensors], device=device, seed=plan.recipe.seed,
                       compute_dtype=to_torch(plan.compute_dtype),
                       extra={"registry": registry, "note": note,
                              "model_refs": [m.ref for m in plan.models], "base_ref": plan.base.ref if plan.base else None})
    )


def execute(plan: MergePlan, registry: Registry, *, device: str = "cpu", executor: str = "local", prefetch: int = 2, on_progress: ProgressCallback | None = None, resume: bool = False, executor_options: dict[str, Any] | None = None) -> RunResult:
    """Run a plan whose output path has been checked; with ``resume``, continue a stopped run.

    ``executor_options`` go to the executor's constructor (e.g. a Ray cluster's ``address``).
    """
    if plan.out_dir is None:
        raise OutputError("the recipe has no output.path; give one with --out DIR.")
    out_dir = plan.out_dir
    device = resolve_device(device)
    executor_impl = registry.executor(executor)(**(executor_options or {}))
    resolved = plan.recipe.model_copy(update={"output": plan.recipe.output.model_copy(update={"path": str(out_dir)})})
    if executor_impl.remote:
        from workbench.engine.shard_task import check_remote

        check_remote(plan, executor)
    ensure_local(m.reader for m in plan.inputs)  # Hub inputs planned from headers: download them before starting
    manifest = _open_manifest(plan, device, resume)
    partial = manifest.directory
    todo = [f for f in plan.files if f.name not in manifest.files]
    progress = _Progress(plan, on_progress, todo)
    start = time.perf_counter()
    try:
        method = plan.method()
        state = prepare_state(plan, registry, method, device, lambda text: progress.emit("note", note=text))
        runner = _TensorRunner(plan, method, state, device, prefetch, progress)
        progress.emit("start")
        if executor_impl.remote:  # the closure below cannot leave this process: send a picklable task
            from workbench.engine.shard_task import ShardTask, record_shard

            task = ShardTask(resolved.to_yaml(), str(out_dir), str(partial), device, prefetch, os.getcwd())
            executor_impl.run(todo, task, lambda file, result: record_shard(plan, file, result, manifest, runner, progress))
        else:
            with _merge_runtime(device):
                executor_impl.run(todo, lambda f: runner.write_file(partial, f, manifest))
        plan.output_format.finish_output(partial, plan.files)
        method.write_extras(state, partial)
        _finish_folder(plan, partial, resolved.to_yaml(), out_dir.name, lambda message: runner.warn("tokenizer", message))
        for path in sorted(partial.rglob("*")):
            if path.is_file() and path.name not in (PARTIAL_MARKER, MANIFEST_FILE) and path.relative_to(partial).as_posix() not in manifest.files:
                manifest.record(path)
        manifest.complete = True
        manifest.save()
        publish(partial, out_dir)
    except KeyboardInterrupt:
        _discard_unless_resumable(plan, manifest)
        raise RunInterrupted(_stopped("interrupted", plan, manifest)) from None
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _discard_unless_resumable(plan, manifest)
        raise OutputError(_stopped(f"the disk ran out of space writing {exc.filename or partial} ({exc.strerror})", plan, manifest)) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        progress.emit("finish")
    seconds = time.perf_counter() - start
    return RunResult(
        out_dir=out_dir,
        files=[out_dir / name for name in manifest.files] + [out_dir / MANIFEST_FILE],
        tensors=len(plan.tensors),
        bytes_read=progress.bytes_read,
        bytes_written=plan.output_bytes,
        seconds=seconds,
        warnings=plan.warnings + runner.warnings,
    )


def _discard_unless_resumable(plan: MergePlan, manifest: Manifest) -> None:
    """Keep ``<out>.partial`` after an interruption only if it holds finished files to resume from."""
    if not any(f.name in manifest.files for f in plan.files):
        shutil.rmtree(manifest.directory, ignore_errors=True)


def run_recipe(recipe: Recipe | str | Path, *, out: str | Path | None = None, overwrite: bool = False, device: str = "cpu", executor: str = "local", prefetch: int = 2, on_progress: ProgressCallback | None = None, registry: Registry | None = None, resume: bool = False, executor_options: dict[str, Any] | None = None) -> RunResult:
    """Load (if needed), plan and run a recipe; the Python API behind ``workbench run``."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    registry = registry or get_registry()
    require_plugins(registry)
    plan = build_plan(recipe, registry, out=out, overwrite=overwrite)
    try:
        result = execute(plan, registry, device=device, executor=executor, prefetch=prefetch, on_progress=on_progress, resume=resume, executor_options=executor_options)
    finally:
        plan.close()
    if recipe.evaluators:
        from workbench.evaluation.running import evaluate_output

        result.evaluations = evaluate_output(recipe.evaluators, result.out_dir, registry)
    return result

