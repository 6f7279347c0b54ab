"""From a recipe to a merge plan: every input opened lazily, every output tensor known in advance.

Planning reads headers only (names, shapes, dtypes), so ``workbench validate`` and ``workbench plan``
can check a recipe end to end without touching tensor data. Every problem is reported with the
file, tensor, field or line it concerns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import architecture
from workbench.architecture import TensorPlace
from workbench.checkpoint import CheckpointFormat, CheckpointReader, OutputFile, TensorSpec
from workbench.checkpoint.dtypes import ITEMSIZE, code_from_name
from workbench.checkpoint.output_folder import check_real_file_system
from workbench.checkpoint.resolve import open_reference
from workbench.checkpoint.stacked import LayerRange, StackedReader
from workbench.checkpoint.tokenizer_plan import TokenizerPlan, plan_tokenizer
from workbench.engine.parameter_checks import ParameterChecker
from workbench.errors import CheckpointError, OutputError, RecipeError
from workbench.method import (
    LayerSwapLayout,
    MemoryNeed,
    MergeMethod,
    MethodParameters,
    ParameterSet,
    param_keys,
    tensor_seed,
)
from workbench.recipe.schema import Recipe
from workbench.registry import Registry

#: Elementwise methods see large tensors in row blocks of about this many elements.
CHUNK_ELEMENTS = 1 << 22
#: Resident memory of a process that has imported torch, for the peak-memory estimate.
BASELINE_BYTES = 300 * 2**20
_MISSING = object()


@dataclass
class InputModel:
    """One input checkpoint, opened lazily."""

    ref: str
    label: str  # 'models[1]' or 'base'
    path: Path
    reader: CheckpointReader
    parameters: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.label} ({self.ref})"


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    place: TensorPlace
    merge: bool  # False: copied unchanged from the reference model (integer buffers)
    seed: int
    input_bytes: int
    params: MethodParameters | None = None
    model_params: list[MethodParameters] = field(default_factory=list)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.out_dtype, self.shape)


@dataclass
class MergePlan:
    recipe: Recipe
    method: type[MergeMethod]
    #: The method, built once per run (in each process): planning's checks, prepare and apply all use it.
    instance: MergeMethod
    #: The method's parameters and each model's (in model order), validated for every tensor.
    params: ParameterSet
    model_params: list[ParameterSet]
    models: list[InputModel]
    base: InputModel | None
    tensors: list[PlannedTensor]
    layer_count: int
    output_format: CheckpointFormat
    files: list[OutputFile]
    compute_dtype: str
    out_dir: Path | None
    warnings: list[str] = field(default_factory=list)
    #: Whether the run may replace a folder at ``out_dir`` (``--overwrite``); checked again at publish.
    overwrite: bool = False
    #: What the method's prepare holds (whole-model methods), checked against the memory limit.
    prepare_memory: MemoryNeed | None = None
    #: The output's tokenizer when the recipe or the inputs need more than a copy (rows aligned by token).
    tokenizer: TokenizerPlan | None = None

    @property
    def reference(self) -> InputModel:
        return self.base or self.models[0]

    @property
    def inputs(self) -> list[InputModel]:
        return ([self.base] if self.base else []) + self.models

    @property
    def input_bytes(self) -> int:
        return sum(t.input_bytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def estimate_peak_bytes(self, prefetch: int = 2) -> int:
        """Peak resident memory: inputs and outputs of the work units in flight, not the model size."""
        per_element_in = (
            sum(ITEMSIZE[m.reader.info(self.tensors[0].name).dtype] for m in self.inputs)
            if self.tensors
            else 0
        )
        compute = ITEMSIZE[self.compute_dtype]
        # ``MergeMethod.row_blocks`` is a property of instances; ``self.method`` is the class
        row_blocks = self.method.mode != "whole"
        largest = 0
        for t in self.tensors:
            numel = t.input_bytes // max(per_element_in, 1)
            largest = max(
                largest,
                min(numel, CHUNK_ELEMENTS * (2 if self.method.mode == "blockwise" else 1))
                if row_blocks
                else numel,
            )
        out_item = max((ITEMSIZE[t.out_dtype] for t in self.tensors), default=4)
        in_flight = (prefetch + 1) * largest * per_element_in
        working = largest * compute * (3 if row_blocks else len(self.inputs) + 2)
        streaming = in_flight + working + 3 * largest * out_item
        return BASELINE_BYTES + max(streaming, self.prepare_memory.nbytes if self.prepare_memory else 0)

    def close(self) -> None:
        for model in self.inputs:
            model.reader.close()


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _unused_config_problems(model: InputModel, reference: InputModel) -> list[str]:
    """What is wrong with the config of an input whose config the output does not take (the
    reference's is checked strictly): said as a warning that names it."""
    try:
        config = model.reader.config()
    except CheckpointError as exc:
        return [f"{exc} It is not used: the output's config comes from {reference}."]
    shapes = {name: model.reader.info(name).shape for name in model.reader.tensor_names()}
    problem = None if config is None else architecture.config_problem(config, shapes)
    if problem is None:
        return []
    return [
        f"the config of {model} does not describe its weights: {problem}; it is not used (the output's "
        f"config comes from {reference})."
    ]


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------


#: Opens a model reference: (local path, lazy reader). The default is ``open_reference``; callers
#: that merge something other than checkpoints (``workbench lora merge``: adapters' ΔW) pass theirs.
Opener = Callable[[str], tuple[Path, CheckpointReader]]


def _open(opener: Opener, ref: str, label: str, parameters: dict[str, Any]) -> InputModel:
    try:
        path, reader = opener(ref)
    except CheckpointError as exc:
        raise CheckpointError(f"{label}: {exc}") from None
    return InputModel(ref=ref, label=label, path=path, reader=reader, parameters=parameters)


def _open_stacked(
    opener: Opener, recipe: Recipe, j: int | None, model_defaults: dict[str, Any], sources: list[InputModel]
) -> InputModel:
    """Input model ``j`` of a recipe with slices: model source ``j`` of every slice, stacked in order
    (``j`` None: the base's source of every slice).

    Each distinct model is opened once per input model; ``sources`` collects them (for the output
    path checks), and the stacked reader closes them.
    """
    readers: dict[str, CheckpointReader] = {}
    parts: list[LayerRange] = []
    paths: list[Path] = []
    pieces = recipe.slices or []
    chosen = [recipe.slice_base(i) if j is None else recipe.slice_models(i)[j] for i in range(len(pieces))]
    try:
        for i, (piece, source) in enumerate(zip(pieces, chosen)):
            assert source is not None  # the schema gives every slice a source of the base
            label = f"slices[{i}].sources[{piece.sources.index(source)}]"
            if source.model not in readers:
                opened = _open(opener, source.model, label, {})
                readers[source.model] = opened.reader
                if architecture.encoder_decoder(opened.reader.tensor_names()):
                    raise RecipeError(
                        f"{opened}: an encoder-decoder model (its encoder and decoder layers share their "
                        "numbers) cannot be stacked from layer ranges: slices would mix the two stacks. "
                        "Merge it without slices."
                    )
                sources.append(opened)
                paths.append(opened.path)
            parts.append(
                LayerRange(
                    readers[source.model],
                    source.layer_range[0],
                    source.layer_range[1],
                    f"{label} ({source.model})",
                )
            )
        reader = StackedReader(parts)
    except BaseException:
        for opened_reader in readers.values():
            opened_reader.close()
        raise
    first = chosen[0]
    assert first is not None
    return InputModel(
        ref=first.model,
        label="slices[*] (base)" if j is None else f"slices[*].sources[{j}]",
        path=paths[0],
        reader=reader,
        parameters={} if j is None else {**model_defaults, **first.parameters},
    )


def check_output_path(out_dir: Path, inputs: list[InputModel], overwrite: bool) -> None:
    out = out_dir.resolve()
    for model in inputs:
        folder = (model.path if model.path.is_dir() else model.path.parent).resolve()
        if out == folder or folder in out.parents:
            raise OutputError(
                f"output {out_dir} is inside input {model}; choose a folder outside every input."
            )
        if out in folder.parents:
            raise OutputError(
                f"input {model} lies inside the output folder {out_dir}; choose another output folder."
            )
        # The engine writes into <out>.partial first (and replaces an unfinished one it left there).
        scratch = out.with_name(out.name + ".partial")
        if folder == scratch or scratch in folder.parents:
            raise OutputError(
                f"input {model} lies in {scratch}, where output {out_dir} is written first; choose another "
                "output folder."
            )
    check_real_file_system(out_dir)
    if out.exists() and not overwrite:
        raise OutputError(f"output {out_dir} already exists; pass --overwrite to replace it.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a folder.")


def available_memory() -> int | None:
    """Memory the system can give a new process now (Linux MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(method: str, need: MemoryNeed, limit: int | None) -> None:
    """Refuse a whole-model method that would hold more than the limit (default: what is available)."""
    budget, source = (
        (limit, "memory_limit") if limit is not None else (available_memory(), "the memory available now")
    )
    if budget is not None and need.nbytes > budget:
        raise RecipeError(
            f"method '{method}' would hold about {need.nbytes / 1e9:.2f} GB ({need.what}), more than {source}"
            f" ({budget / 1e9:.2f} GB); hold less (see the method's parameters) or raise memory_limit / --memory-limit."
        )


def build_plan(
    recipe: Recipe,
    registry: Registry,
    out: str | Path | None = None,
    overwrite: bool = False,
    check_output: bool = True,
    opener: Opener | None = None,
) -> MergePlan:
    """Open every input, check that they agree, and plan every output tensor and file."""
    opener = opener or (lambda ref: open_reference(registry, ref))
    method_cls = registry.method(recipe.method)
    method = method_cls()
    method.check_inputs(recipe.model_count, recipe.base is not None)
    checker = ParameterChecker(recipe)
    model_keys = set(param_keys(method_cls.ModelParameters))
    # A per-model parameter given at the top level is the default for every model (as in mergekit).
    global_raw = {k: v for k, v in recipe.parameters.items() if k not in model_keys}
    model_defaults = {k: v for k, v in recipe.parameters.items() if k in model_keys}
    checker.check(recipe.parameters, method_cls.Parameters, ("parameters",), method_cls.name, model_keys)
    for i, entry in enumerate(recipe.models):
        checker.check(
            entry.parameters,
            method_cls.ModelParameters,
            ("models", i, "parameters"),
            method_cls.name,
            set(),
            model_defaults,
        )
    for i, piece in enumerate(recipe.slices or []):
        for j, source in enumerate(recipe.slice_models(i)):
            at = ("slices", i, "sources", piece.sources.index(source), "parameters")
            checker.check(
                source.parameters, method_cls.ModelParameters, at, method_cls.name, set(), model_defaults
            )
            if source.parameters != recipe.slice_models(0)[j].parameters:
                raise RecipeError(
                    f"{checker.where(at)}: model source {j} has other parameters than in slice 0; model "
                    "source j of every slice is one input model, with one set of parameters (use per-layer "
                    "values to vary them)."
                )

    from workbench.evaluation.running import make_evaluators

    make_evaluators(recipe.evaluators, registry)  # unknown names and bad options fail before any work
    output_format = registry.format(recipe.output.format)
    if not output_format.can_write:
        raise RecipeError(f"output format '{output_format.name}' cannot write checkpoints.")
    out_dir = Path(out) if out is not None else (Path(recipe.output.path) if recipe.output.path else None)

    opened: list[InputModel] = []
    try:
        sources: list[InputModel] = []
        base = None
        if recipe.base and recipe.slices:  # each slice's own range of the base, stacked
            base = _open_stacked(opener, recipe, None, model_defaults, sources)
        elif recipe.base:
            base = _open(opener, recipe.base, "base", {})
        if base:
            opened.append(base)
        models = []
        for i, entry in enumerate(recipe.models):
            models.append(_open(opener, entry.model, f"models[{i}]", {**model_defaults, **entry.parameters}))
            opened.append(models[-1])
        for j in range(recipe.model_count if recipe.slices else 0):
            models.append(_open_stacked(opener, recipe, j, model_defaults, sources))
            opened.append(models[-1])
        if check_output and out_dir is not None:
            check_output_path(out_dir, opened + sources, overwrite)
        # rows indexed by token follow the output's tokenizer: wraps the readers whose rows move
        tokenizer = plan_tokenizer(recipe.tokenizer_request(), base, models, checker.where)
        # a method's own checks name the recipe line as schema errors do
        where = checker.where(("parameters",) if recipe.parameters else ("method",))
        plan = _plan_tensors(recipe, method, global_raw, models, base, output_format, out_dir, where)
        plan.overwrite = overwrite
        plan.tokenizer = tokenizer
        plan.warnings.extend(tokenizer.warnings if tokenizer else [])
    except BaseException:
        for model in opened:
            model.reader.close()
        raise
    return plan


def _plan_tensors(
    recipe: Recipe,
    method: MergeMethod,
    global_raw: dict[str, Any],
    models: list[InputModel],
    base: InputModel | None,
    output_format: CheckpointFormat,
    out_dir: Path | None,
    where: str,
) -> MergePlan:
    reference = base or models[0]
    inputs = ([base] if base else []) + models
    names = reference.reader.tensor_names()
    if not names:
        raise CheckpointError(f"{reference} holds no tensors.")
    warnings: list[str] = list(recipe.translation_notes)
    for model in inputs:
        if model is reference:
            continue
        missing = [n for n in names if n not in model.reader]
        if missing:
            raise CheckpointError(
                f"tensor '{missing[0]}' is missing from {model} but present in {reference}"
                f" ({len(missing)} tensor(s) missing in all); the models must have the same architecture."
            )
        known = set(names)
        extra = [n for n in model.reader.tensor_names() if n not in known]
        if extra:
            warnings.append(
                f"{model} has {len(extra)} tensor(s) that {reference} lacks (first: '{extra[0]}'); they are "
                "not in the output."
            )

    if architecture.encoder_decoder(names) and isinstance(type(method), LayerSwapLayout):
        raise RecipeError(
            f"{where}: method '{method.name}' takes whole layers from one model or the other, but "
            f"{reference} is an encoder-decoder model: its encoder and decoder layers share their numbers, "
            "so a layer index does not say which is meant. Use a method that merges tensor by tensor."
        )
    config = reference.reader.config()
    if config is not None:
        problem = architecture.config_problem(config, {n: reference.reader.info(n).shape for n in names})
        if problem:
            raise CheckpointError(
                f"the config of {reference} does not describe its weights: {problem}; the output's config "
                "would be copied from it. Fix or remove config.json."
            )
    for model in inputs:
        if model is not reference:
            warnings.extend(_unused_config_problems(model, reference))
    layers = architecture.layer_count(names, config)
    method_cls = type(method)
    merged = [n for n in names if reference.reader.info(n).is_float]
    params = ParameterSet(method_cls.Parameters, global_raw, layers, merged)
    model_params = [ParameterSet(method_cls.ModelParameters, m.parameters, layers, merged) for m in models]
    out_code = code_from_name(recipe.output.dtype) if recipe.output.dtype else None
    tensors: list[PlannedTensor] = []
    converted: dict[str, tuple[str, str, int]] = {}
    placed_any = False
    for name in names:
        ref_info = reference.reader.info(name)
        place = architecture.place(name)
        placed_any |= place.layer_index is not None
        input_bytes = 0
        for model in inputs:
            info = model.reader.info(name)
            if info.is_float != ref_info.is_float:  # a float kernel must never see an integer or bool tensor
                raise CheckpointError(
                    f"tensor '{name}' is stored as {info.dtype} in {model} but as {ref_info.dtype} in "
                    f"{reference}; an integer or bool tensor cannot be merged with a floating-point one (is "
                    "a file damaged or mislabelled?)."
                )
            if info.shape != ref_info.shape and method_cls.equal_shapes:
                raise CheckpointError(
                    f"tensor '{name}' has shape {list(info.shape)} in {model} but {list(ref_info.shape)} in "
                    f"{reference}; the models must have the same architecture."
                )
            if info.dtype != ref_info.dtype:
                count = converted.get(model.label, (info.dtype, ref_info.dtype, 0))[2] + 1
                converted[model.label] = (info.dtype, ref_info.dtype, count)
            input_bytes += info.nbytes
        merge = ref_info.is_float
        planned = PlannedTensor(
            name=name,
            shape=ref_info.shape,
            out_dtype=(out_code if (merge and out_code) else ref_info.dtype),
            place=place,
            merge=merge,
            seed=tensor_seed(recipe.seed, name),
            input_bytes=input_bytes if merge else ref_info.nbytes,
        )
        if merge:
            planned.params = params.at(name)
            planned.model_params = [p.at(name) for p in model_params]
        tensors.append(planned)
    for label, (have, want, count) in converted.items():
        warnings.append(
            f"{label} stores {count} tensor(s) as {have} where the reference has {want}; they are converted "
            "for the merge."
        )
    if not placed_any:
        warnings.append(
            f"no tensor of {reference} matches a known layer layout (model.layers.N., transformer.h.N., ...);"
            " it still merges, but per-layer parameter lists apply their first value everywhere."
        )
    try:  # every tensor's parameters are valid by now; a method's own checks name the recipe line
        method.check_plan(params, model_params, layers)
        prepare_memory = method.memory_needed(
            params, model_params, [(t.name, t.shape) for t in tensors if t.merge]
        )
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    if prepare_memory is not None:
        check_memory(method_cls.name, prepare_memory, recipe.memory_limit_bytes)
    shard_size = recipe.output.shard_bytes
    files = output_format.plan_output([t.spec for t in tensors], shard_size)
    return MergePlan(
        recipe=recipe,
        method=method_cls,
        instance=method,
        params=params,
        model_params=model_params,
        models=models,
        base=base,
        tensors=tensors,
        layer_count=layers,
        output_format=output_format,
        files=files,
        compute_dtype=code_from_name(recipe.dtype),
        out_dir=out_dir,
        warnings=warnings,
        prepare_memory=prepare_memory,
    )
