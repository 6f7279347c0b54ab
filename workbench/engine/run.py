"""A run: plan -> prepare -> execute every output file -> finish the folder -> evaluate.

Output goes to ``<out>.partial/`` and is renamed into place only when complete; a failure removes it
(or keeps the finished files for ``--resume``), so nothing half-written is ever at the final path.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from workbench.checkpoint.dtypes import torch_name
from workbench.checkpoint.output_folder import (
    DISK_FULL,
    PARTIAL_MARKER,
    OutputInTheWay,
    check_free_space,
    output_lock,
    partial_folder,
    publish,
    start_partial,
)
from workbench.checkpoint.resolve import ensure_local
from workbench.checkpoint.sidecars import copy_config, copy_tokenizer
from workbench.engine.card import card_text
from workbench.engine.manifest import MANIFEST_FILE, Manifest, record_published, run_identity
from workbench.engine.plan import MergePlan, build_plan
from workbench.engine.progress import ProgressCallback
from workbench.errors import (
    CheckpointError,
    OutputError,
    RecipeError,
    RunInterrupted,
    Terminated,
    WorkbenchError,
)
from workbench.recipe.schema import Recipe, load_recipe
from workbench.registry import Registry, get_registry, require_plugins

if TYPE_CHECKING:
    pass

from workbench.engine.runner import RunProgress, TensorRunner, merge_runtime, prepare_state

RECIPE_FILE = "workbench_recipe.yaml"


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
        raise WorkbenchError(
            f"device '{device}' was requested but CUDA is not available here; use --device cpu or auto."
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise WorkbenchError(f"unknown device '{device}' (use cpu, cuda or auto).")
    return device


#: Row blocks of a blockwise method start at multiples of this many elements where the row length
#: allows it within twice ``CHUNK_ELEMENTS``, so that statistics summed per fixed block (L1 norms,
#: slerp's dot products) meet the same partial sums as over the whole tensor.
def _finish_folder(
    plan: MergePlan, partial: Path, recipe_yaml: str, title: str, warn: Callable[[str], None]
) -> None:
    """Sidecar files, the resolved recipe and the model card."""
    out_dtype = next((t.out_dtype for t in plan.tensors if t.merge), None)
    copy_config(
        plan.reference.path,
        partial,
        torch_name(out_dtype) if out_dtype else None,
        plan.reference.reader.config(),
    )
    if plan.tokenizer is not None:  # built (union, added tokens) or copied with a chat template
        plan.tokenizer.write(partial, warn)
    else:
        _copy_tokenizer(plan, partial, warn)
    (partial / RECIPE_FILE).write_text(recipe_yaml)
    (partial / "README.md").write_text(card_text(plan, recipe_yaml, title))


def _copy_tokenizer(plan: MergePlan, partial: Path, warn: Callable[[str], None]) -> None:
    """The tokenizer files of ``output.copy_tokenizer_from`` (or a GGUF input's embedded tokenizer)."""
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
            warn(
                f"{exc} The output has no tokenizer; name a folder with tokenizer files in output.copy_tokenizer_from."
            )


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


def _stopped(what: str, plan: MergePlan, manifest: Manifest, done: int) -> str:
    """The end of the message of a run that stopped with ``done`` finished files kept, and how to go on."""
    if not done:
        return f"{what}; nothing was written at {plan.out_dir}."
    return (
        f"{what}; nothing was written at {plan.out_dir}. {done} of {len(plan.files)} output files are finished"
        f" and kept in {manifest.directory}: run the same command with --resume to continue."
    )


def execute(
    plan: MergePlan,
    registry: Registry,
    *,
    device: str = "cpu",
    executor: str = "local",
    prefetch: int = 2,
    on_progress: ProgressCallback | None = None,
    resume: bool = False,
    executor_options: dict[str, Any] | None = None,
) -> RunResult:
    """Run a plan whose output path has been checked; with ``resume``, continue a stopped run.

    ``executor_options`` go to the executor's constructor (e.g. a Ray cluster's ``address``).
    """
    if plan.out_dir is None:
        raise OutputError("the recipe has no output.path; give one with --out DIR.")
    out_dir = plan.out_dir
    device = resolve_device(device)
    executor_impl = registry.executor(executor)(**(executor_options or {}))
    resolved = plan.recipe.model_copy(
        update={"output": plan.recipe.output.model_copy(update={"path": str(out_dir)})}
    )
    if executor_impl.remote:
        from workbench.engine.shard_task import check_remote

        check_remote(plan, executor)
    ensure_local(
        m.reader for m in plan.inputs
    )  # Hub inputs planned from headers: download them before starting
    # one run per output: a second one is refused at once, naming this one
    with output_lock(out_dir):
        manifest = _open_manifest(plan, device, resume)
        partial = manifest.directory
        todo = [f for f in plan.files if f.name not in manifest.files]
        progress = RunProgress(plan, on_progress, todo)
        start = time.perf_counter()
        try:
            method = plan.instance
            state = prepare_state(
                plan, registry, method, device, lambda text: progress.emit("note", note=text)
            )
            runner = TensorRunner(plan, method, state, device, prefetch, progress)
            progress.emit("start")
            if executor_impl.remote:  # the closure below cannot leave this process: send a picklable task
                from workbench.engine.shard_task import ShardTask, record_shard

                task = ShardTask(
                    resolved.to_yaml(), str(out_dir), str(partial), device, prefetch, os.getcwd()
                )
                executor_impl.run(
                    todo,
                    task,
                    lambda file, result: record_shard(plan, file, result, manifest, runner, progress),
                )
            else:
                with merge_runtime(device):
                    executor_impl.run(todo, lambda f: runner.write_file(partial, f, manifest))
            plan.output_format.finish_output(partial, plan.files)
            method.write_extras(state, partial)
            _finish_folder(
                plan,
                partial,
                resolved.to_yaml(),
                out_dir.name,
                lambda message: runner.warn("tokenizer", message),
            )
            for path in sorted(partial.rglob("*")):
                if (
                    path.is_file()
                    and path.name not in (PARTIAL_MARKER, MANIFEST_FILE)
                    and path.relative_to(partial).as_posix() not in manifest.files
                ):
                    manifest.record(path)
            manifest.complete = True
            manifest.save()
            publish(partial, out_dir, replace=plan.overwrite)
        except KeyboardInterrupt as exc:
            done = _discard_unless_resumable(plan, manifest)
            if isinstance(exc, Terminated):
                raise RunInterrupted(
                    _stopped("terminated (SIGTERM)", plan, manifest, done), exc.exit_code
                ) from None
            raise RunInterrupted(_stopped("interrupted", plan, manifest, done)) from None
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            done = _discard_unless_resumable(plan, manifest)
            raise OutputError(
                _stopped(
                    f"the disk ran out of space writing {exc.filename or partial} ({exc.strerror})",
                    plan,
                    manifest,
                    done,
                )
            ) from exc
        except OutputInTheWay:  # the finished result stays in <out>.partial
            raise
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


def _discard_unless_resumable(plan: MergePlan, manifest: Manifest) -> int:
    """Keep ``<out>.partial`` after an interruption only if it holds finished files to resume from;
    returns how many. Counted from the manifest on disk, which is what --resume reads (a full disk may
    have stopped the last save of the list in memory)."""
    try:
        kept = Manifest.read(manifest.directory).files
    except (FileNotFoundError, WorkbenchError):
        kept = {}
    done = sum(f.name in kept for f in plan.files)
    if not done:
        shutil.rmtree(manifest.directory, ignore_errors=True)
    return done


def run_recipe(
    recipe: Recipe | str | Path,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    executor: str = "local",
    prefetch: int = 2,
    on_progress: ProgressCallback | None = None,
    registry: Registry | None = None,
    resume: bool = False,
    executor_options: dict[str, Any] | None = None,
) -> RunResult:
    """Load (if needed), plan and run a recipe; the Python API behind ``workbench run``."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    registry = registry or get_registry()
    require_plugins(registry)
    plan = build_plan(recipe, registry, out=out, overwrite=overwrite)
    return run_plan(
        plan,
        registry,
        device=device,
        executor=executor,
        prefetch=prefetch,
        on_progress=on_progress,
        resume=resume,
        executor_options=executor_options,
    )


class RunOptions(TypedDict, total=False):
    """How a plan runs: the keyword arguments of :func:`execute`, which :func:`run_plan` passes on."""

    device: str
    executor: str
    prefetch: int
    on_progress: ProgressCallback | None
    resume: bool
    executor_options: dict[str, Any] | None


def run_plan(plan: MergePlan, registry: Registry, **options: Unpack[RunOptions]) -> RunResult:
    """Execute a plan, close it, and score the output with the recipe's evaluators: the one sequence
    behind :func:`run_recipe`, ``workbench run`` and the TUI's Run screen (which plan first, to show
    the plan's warnings) and sweeps (through ``run_recipe``)."""
    try:
        result = execute(plan, registry, **options)
    finally:
        plan.close()
    if plan.recipe.evaluators:
        from workbench.evaluation.running import RESULTS_FILE, evaluate_output

        result.evaluations = evaluate_output(plan.recipe.evaluators, result.out_dir, registry)
        record_published(result.out_dir, result.out_dir / RESULTS_FILE)  # verify vouches for the scores too
    return result
