"""Where fine-tuning changed a model: statistics of Δ = θ_model − θ_base per layer and module.

Layer swapping (Bandarkar et al. 2024, "Layer Swapping for Zero-Shot Cross-Lingual Transfer")
decides which layers of a language expert replace those of a task expert from where each expert
moved away from their common base: in the paper the math expert changed most in the middle layers
and the language expert in the bottom and top layers. This module measures that, for any number of
models against one base, and turns two experts' profiles into a ``layer_swap`` recipe.

Statistics, per model and per cell (layer index × module, e.g. layer 3 × ``q_proj``; the weight and
bias of a module share a cell), with Δ computed in float32 and summed in float64:

- ``mean_abs``: mean |Δ| over the cell's entries.
- ``relative``: ‖Δ‖₂ / ‖W_base‖₂ (Frobenius norms over the cell's entries), comparable across
  modules of different size and scale.
- ``top_share``: the share of the model's most-changed entries that lie in the cell. The most-changed
  entries are those with |Δ| >= t, where t is the exact k-th largest |Δ| over every entry of the
  model's layer tensors, k = max(1, floor(top_fraction · n)). Ties at t all count, so the set may be
  a little larger than k; unchanged entries (Δ = 0) never count, so a model identical to its base
  has a share of 0 everywhere.

Tensors outside the layers (embeddings, final norm, head) get ``mean_abs`` and ``relative`` per
tensor and take no part in the top set. Only float tensors are compared.

Memory stays bounded whatever the model size: tensors are read in row blocks of at most
``BLOCK_ELEMENTS`` entries, one block per model at a time, and what is kept is a few sums per cell
and the two 65536-bin histograms per model of the exact radix select
(``workbench_kernels.order_stats.RadixSelect``). That costs three passes over the layer tensors: (1)
the sums and the coarse histogram, (2) the fine histogram, which gives t, (3) the count per cell.

Swap suggestion (:func:`suggest_swap`), from the per-layer totals: for each expert e, r_e(ℓ) is the
relative change of layer ℓ (all its tensors together) and p_e(ℓ) = r_e(ℓ) / Σ r_e its share of the
expert's change (p sums to 1 over layers). With d(ℓ) = p_lang(ℓ) − p_task(ℓ), ``bottom`` is the
number of consecutive layers from layer 0 upward with d > 0 and ``top`` the same from the last layer
downward, capped so that bottom + top <= L − 1 (a middle layer always stays with the task expert;
since d sums to 0 the cap only guards against rounding). The rule reads magnitudes of change, not
their importance, and one layer with d <= 0 ends a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workbench import architecture
from workbench.architecture import TensorPlace
from workbench.checkpoint.resolve import open_reference
from workbench.engine.progress import ProgressCallback, ProgressEvent, ProgressKind
from workbench.errors import CheckpointError, WorkbenchError

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench.registry import Registry

#: The statistics a heatmap can show.
STATS = ("relative", "mean_abs", "top_share")
#: Largest row block read at once, per model: bounds memory for any tensor size.
BLOCK_ELEMENTS = 1 << 22
#: The last part of a tensor name that names the parameter, not the module.
PARAMETER_SUFFIXES = ("weight", "bias")
#: Groups dropped from column labels (Llama-style ``self_attn.q_proj`` is shown as ``q_proj``).
GROUP_PREFIXES = ("self_attn", "mlp")
#: Columns in this order when present (a Llama layer read from input to output); others follow.
COLUMN_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


def module_label(module: str) -> str:
    """Short column label of a module inside a layer: its path without the parameter suffix."""
    parts = module.split(".")
    if len(parts) > 1 and parts[-1] in PARAMETER_SUFFIXES:
        parts = parts[:-1]
    if len(parts) > 1 and parts[0] in GROUP_PREFIXES:
        parts = parts[1:]
    return ".".join(parts)


@dataclass
class ChangeStats:
    """Float64 sums over a set of entries of Δ; every statistic is a ratio of them."""

    count: int = 0
    sum_abs: float = 0.0
    delta_sq: float = 0.0
    base_sq: float = 0.0
    top_count: int = 0

    def add(self, other: ChangeStats) -> None:
        self.count += other.count
        self.sum_abs += other.sum_abs
        self.delta_sq += other.delta_sq
        self.base_sq += other.base_sq
        self.top_count += other.top_count

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else 0.0

    @property
    def relative(self) -> float:
        """‖Δ‖ / ‖W_base‖; 0 when nothing changed, infinite when an all-zero base changed."""
        if self.base_sq > 0:
            return math.sqrt(self.delta_sq) / math.sqrt(self.base_sq)
        return 0.0 if self.delta_sq == 0 else math.inf

    def top_share(self, top_total: int) -> float:
        return self.top_count / top_total if top_total else 0.0

    def value(self, stat: str, top_total: int) -> float:
        if stat == "top_share":
            return self.top_share(top_total)
        if stat in STATS:
            return float(getattr(self, stat))
        raise WorkbenchError(f"unknown statistic '{stat}'; choose one of {', '.join(STATS)}.")


@dataclass
class ModelChange:
    """The change of one model from the base."""

    ref: str  # as given by the user
    path: Path
    cells: dict[tuple[int, str], ChangeStats] = field(default_factory=dict)  # (layer, module label)
    non_layer: dict[str, ChangeStats] = field(default_factory=dict)  # tensor name
    layer_entries: int = 0  # n: entries of the layer tensors, among which the top set is chosen
    top_threshold: float = 0.0  # t
    top_total: int = 0  # entries with |Δ| >= t (and Δ != 0)

    def layer_totals(self, layer_count: int) -> list[ChangeStats]:
        """All modules of each layer together."""
        totals = [ChangeStats() for _ in range(layer_count)]
        for (layer, _), stats in self.cells.items():
            totals[layer].add(stats)
        return totals


@dataclass
class Analysis:
    base: str
    layer_count: int
    modules: list[str]  # column labels, in display order
    top_fraction: float
    models: list[ModelChange]

    def value(self, model: ModelChange, layer: int, module: str, stat: str) -> float | None:
        """One heatmap cell; None where the layer has no such module."""
        stats = model.cells.get((layer, module))
        return None if stats is None else stats.value(stat, model.top_total)


# --------------------------------------------------------------------------------------------------
# Opening and checking the inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    place: TensorPlace
    cell: tuple[int, str] | None  # None outside the layers
    nbytes: int  # over the base and every model


def _open(registry: Registry, ref: str, label: str) -> tuple[Path, CheckpointReader]:
    try:
        return open_reference(registry, ref)
    except CheckpointError as exc:
        raise CheckpointError(f"{label}: {exc}") from None


def _float_names(reader: CheckpointReader) -> list[str]:
    return [n for n in reader.tensor_names() if reader.info(n).is_float]


def _plan_tensors(base: CheckpointReader, models: list[tuple[str, CheckpointReader]]) -> list[_Tensor]:
    """The float tensors of the base, after checking every model has exactly them, in the same shapes."""
    names = _float_names(base)
    for ref, reader in models:
        theirs = set(_float_names(reader))
        missing = [n for n in names if n not in theirs]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{ref} ({reader.path}): tensor '{missing[0]}' of the base ({base.path}) is missing{more}."
            )
        extra = sorted(theirs - set(names))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"{ref} ({reader.path}): tensor '{extra[0]}' is not in the base ({base.path}){more}."
            )
        for name in names:
            mine, ours = reader.info(name), base.info(name)
            if mine.shape != ours.shape:
                raise CheckpointError(
                    f"{mine.file}: tensor '{name}' has shape {list(mine.shape)}, but in the base "
                    f"({ours.file}) it has {list(ours.shape)}."
                )
    tensors = []
    for name in names:
        where = architecture.place(name)
        cell = None if where.layer_index is None else (where.layer_index, module_label(where.module))
        nbytes = base.info(name).nbytes + sum(reader.info(name).nbytes for _, reader in models)
        tensors.append(_Tensor(name, base.info(name).shape, where, cell, nbytes))
    if not any(t.cell for t in tensors):
        raise WorkbenchError(
            f"{base.path}: no tensor belongs to a numbered layer (model.layers.N...), so there is nothing to chart."
        )
    return tensors


def _column_order(tensors: list[_Tensor]) -> list[str]:
    seen = list(dict.fromkeys(t.cell[1] for t in tensors if t.cell))
    return [m for m in COLUMN_ORDER if m in seen] + [m for m in seen if m not in COLUMN_ORDER]


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """Row ranges of at most ``BLOCK_ELEMENTS`` entries (None: the whole tensor)."""
    numel = math.prod(shape)
    if len(shape) == 0 or numel <= BLOCK_ELEMENTS:
        return [None]
    step = max(1, BLOCK_ELEMENTS // max(numel // shape[0], 1))
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def _sum_sq(x: torch.Tensor) -> float:
    flat = x.reshape(-1).double()
    return float(flat @ flat)


class _Streamer:
    """Reads the base once per block and every model's block after it, one block at a time."""

    def __init__(
        self,
        base: CheckpointReader,
        models: list[CheckpointReader],
        tensors: list[_Tensor],
        on_progress: ProgressCallback | None,
    ) -> None:
        self.base = base
        self.models = models
        self.tensors = tensors
        self.on_progress = on_progress
        layer_tensors = [t for t in tensors if t.cell]
        self.total = len(tensors) + 2 * len(layer_tensors)
        self.total_bytes = sum(t.nbytes for t in tensors) + 2 * sum(t.nbytes for t in layer_tensors)
        self.done = 0
        self.bytes_read = 0

    def emit(self, kind: ProgressKind, tensor: str | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(
                ProgressEvent(kind, self.done, self.total, self.bytes_read, self.total_bytes, tensor)
            )

    def deltas(self, layers_only: bool) -> Iterator[tuple[_Tensor, torch.Tensor, int, torch.Tensor]]:
        """(tensor, base block, model index, Δ block) in float32, for every block of every tensor."""
        for tensor in self.tensors:
            if layers_only and tensor.cell is None:
                continue
            for rows in _row_blocks(tensor.shape):
                base = self.base.read(tensor.name, rows).float()
                for index, reader in enumerate(self.models):
                    yield tensor, base, index, reader.read(tensor.name, rows).float() - base
            self.done += 1
            self.bytes_read += tensor.nbytes
            self.emit("tensor", tensor.name)


def analyze(
    base: str,
    models: Sequence[str],
    *,
    top_fraction: float = 0.01,
    registry: Registry | None = None,
    on_progress: ProgressCallback | None = None,
) -> Analysis:
    """Statistics of each model's change from ``base`` (model references: folders, files or Hub ids)."""
    from workbench.registry import get_registry

    if not models:
        raise WorkbenchError("give at least one model to compare with the base.")
    if not 0 < top_fraction <= 1:
        raise WorkbenchError(f"top fraction {top_fraction} must be in (0, 1].")
    registry = registry or get_registry()
    readers: list[CheckpointReader] = []
    try:
        _, base_reader = _open(registry, base, "base")
        readers.append(base_reader)
        changes = []
        for position, ref in enumerate(models, 1):
            path, reader = _open(registry, ref, f"model {position}")
            readers.append(reader)
            changes.append(ModelChange(ref=ref, path=path))
        tensors = _plan_tensors(base_reader, list(zip(models, readers[1:])))
        streamer = _Streamer(base_reader, readers[1:], tensors, on_progress)
        streamer.emit("start")
        try:
            _measure(streamer, changes, top_fraction)
        finally:
            streamer.emit("finish")  # also stops a progress bar on failure
    finally:
        for reader in readers:
            reader.close()
    layer_count = 1 + max(t.cell[0] for t in tensors if t.cell)
    return Analysis(
        base=base,
        layer_count=layer_count,
        modules=_column_order(tensors),
        top_fraction=top_fraction,
        models=changes,
    )


def _measure(streamer: _Streamer, changes: list[ModelChange], top_fraction: float) -> None:
    """The three passes: sums and coarse histograms; fine histograms (the thresholds); top counts."""
    from workbench_kernels.order_stats import RadixSelect
    from workbench_kernels.sparsify import keep_count

    selects = [RadixSelect([]) for _ in changes]
    base_sq = 0.0
    for tensor, base, index, delta in streamer.deltas(layers_only=False):
        change = changes[index]
        if index == 0:
            base_sq = _sum_sq(base)
        if tensor.cell is None:
            stats = change.non_layer.setdefault(tensor.name, ChangeStats())
        else:
            stats = change.cells.setdefault(tensor.cell, ChangeStats())
        magnitude = delta.abs_().reshape(-1)
        wide = magnitude.double()
        stats.count += magnitude.numel()
        stats.sum_abs += float(wide.sum())
        stats.delta_sq += float(wide @ wide)
        stats.base_sq += base_sq
        if tensor.cell is not None:
            selects[index].coarse(magnitude)

    for change, select in zip(changes, selects):
        n = select.count
        change.layer_entries = n
        select.ranks = [n - max(1, keep_count(top_fraction, n))]
        select.start_fine()
    for _, _, index, delta in streamer.deltas(layers_only=True):
        selects[index].fine(delta.abs_())

    is_top: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for change, select in zip(changes, selects):
        change.top_threshold = select.values()[0]
        is_top.append(_top_test(change.top_threshold))
    for tensor, _, index, delta in streamer.deltas(layers_only=True):
        assert tensor.cell is not None
        changes[index].cells[tensor.cell].top_count += int(is_top[index](delta.abs_()).sum())
    for change in changes:
        change.top_total = sum(stats.top_count for stats in change.cells.values())


def _top_test(threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """|Δ| >= t, except that unchanged entries never count (t is 0 when few entries changed)."""
    if threshold > 0:
        return lambda magnitude: magnitude >= threshold
    return lambda magnitude: magnitude > 0


# --------------------------------------------------------------------------------------------------
# Swap suggestion
# --------------------------------------------------------------------------------------------------


def model_position(refs: Sequence[str], key: str) -> int:
    """Index into ``refs`` of the model that ``key`` names: a reference as given, else a 1-based position."""
    for index, ref in enumerate(refs):
        if key == ref or Path(key).expanduser() == Path(ref).expanduser():
            return index
    if key.isdigit() and 1 <= int(key) <= len(refs):
        return int(key) - 1
    listed = ", ".join(f"{i} = {ref}" for i, ref in enumerate(refs, 1))
    raise WorkbenchError(
        f"--suggest-swap: '{key}' names none of the analysed models; give one of them as written, or its "
        f"position ({listed})."
    )


@dataclass(frozen=True)
class LayerProfile:
    """One layer as the swap rule sees it."""

    layer: int
    task_relative: float  # r_task(ℓ)
    language_relative: float  # r_lang(ℓ)
    task_share: float  # p_task(ℓ)
    language_share: float  # p_lang(ℓ)

    @property
    def difference(self) -> float:  # d(ℓ)
        return self.language_share - self.task_share


@dataclass(frozen=True)
class SwapSuggestion:
    task: str
    language: str
    profile: list[LayerProfile]
    bottom: int  # layers taken from the language expert, from layer 0 up
    top: int  # from the last layer down

    def source(self, layer: int) -> str:
        """Which expert layer ``layer`` of the swapped model comes from."""
        outer = layer < self.bottom or layer >= len(self.profile) - self.top
        return "language" if outer else "task"

    def recipe(self) -> str:
        """A native ``layer_swap`` recipe; model paths as given, so run it from the same folder."""
        import yaml

        recipe = {
            "method": "layer_swap",
            "models": [
                {"model": self.task, "parameters": {"role": "task"}},
                {"model": self.language, "parameters": {"role": "language"}},
            ],
            "parameters": {
                "bottom": self.bottom,
                "top": self.top,
                "transition_bottom": 0,
                "transition_top": 0,
            },
        }
        return yaml.safe_dump(recipe, sort_keys=False)


def _run_length(differences: Sequence[float]) -> int:
    """Leading entries with d > 0."""
    length = 0
    for d in differences:
        if d <= 0:
            break
        length += 1
    return length


def suggest_swap(analysis: Analysis, task: str, language: str) -> SwapSuggestion:
    """``bottom``/``top`` for swapping ``language``'s outer layers into ``task`` (rule: module docstring)."""
    refs = [m.ref for m in analysis.models]
    task_model, language_model = (analysis.models[model_position(refs, key)] for key in (task, language))
    if task_model is language_model:
        raise WorkbenchError(
            f"--suggest-swap: the task and the language expert are the same model ({task_model.ref})."
        )
    relatives = []
    for model in (task_model, language_model):
        per_layer = [stats.relative for stats in model.layer_totals(analysis.layer_count)]
        if not sum(per_layer) > 0:
            raise WorkbenchError(
                f"--suggest-swap: {model.ref} does not differ from the base in any layer, so it has no "
                "profile to compare."
            )
        relatives.append(per_layer)
    task_total, language_total = sum(relatives[0]), sum(relatives[1])
    profile = [
        LayerProfile(layer, r_task, r_lang, r_task / task_total, r_lang / language_total)
        for layer, (r_task, r_lang) in enumerate(zip(*relatives))
    ]
    differences = [p.difference for p in profile]
    bottom = min(_run_length(differences), analysis.layer_count - 1)
    top = min(_run_length(differences[::-1]), analysis.layer_count - 1 - bottom)
    return SwapSuggestion(task_model.ref, language_model.ref, profile, bottom, top)
