"""The contract every merge method implements.

A method is a class registered through the ``register_methods`` hook. It declares a typed parameter
schema (pydantic) from which the CLI help, recipe validation and TUI forms are generated, an optional
``prepare`` pass over lazy handles to all inputs, and a per-tensor ``apply``. The engine owns reading,
scheduling and writing, so every method streams with bounded memory unless it says otherwise
(``whole_model = True``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from workbench.architecture import TensorPlace
from workbench.errors import RecipeError
from workbench.params import resolve

if TYPE_CHECKING:  # torch is imported only where tensors are touched
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench_kernels.blocks import Blocks

BaseRequirement = Literal["required", "optional", "unused"]


class MethodParameters(BaseModel):
    """Base class of parameter schemas: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def Param(
    default: Any = ...,
    *,
    description: str,
    per_layer: bool = True,
    **constraints: Any,
) -> Any:
    """Declare a method parameter.

    ``per_layer=True`` lets a recipe give a list (interpolated over layers, as in mergekit) or a
    list of ``{filter, value}`` entries matched against tensor names; otherwise only a single value
    is accepted.
    """
    return Field(default, description=description, json_schema_extra={"per_layer": per_layer}, **constraints)


def is_per_layer(schema: type[BaseModel], name: str) -> bool:
    extra = schema.model_fields[name].json_schema_extra
    return bool(isinstance(extra, dict) and extra.get("per_layer", False))


@dataclass(frozen=True)
class TensorContext:
    """Where the tensor being merged sits and how to compute it."""

    name: str
    layer_index: int | None
    layer_count: int
    module_kind: str
    shape: tuple[int, ...]
    device: str
    compute_dtype: "torch.dtype"
    #: The dtype the result is stored in; returning it directly saves the engine a conversion.
    out_dtype: "torch.dtype"
    seed: int
    #: Rows ``[start, stop)`` of the full tensor this call sees (elementwise and blockwise methods
    #: get row blocks).
    rows: tuple[int, int] | None = None
    state: Any = None
    #: What :meth:`MergeMethod.tensor_statistics` returned for this tensor (blockwise methods).
    statistics: Any = None

    @property
    def offset(self) -> int:
        """Flat index, in the whole tensor, of the first element this call sees."""
        return 0 if self.rows is None else self.rows[0] * math.prod(self.shape[1:])


@dataclass(frozen=True)
class RowBlocks:
    """One tensor's inputs as row blocks, read when asked for, for the statistics of a blockwise
    method (see :attr:`MergeMethod.blockwise`). The engine's inputs are memory-mapped, so reading a
    block again costs page faults, not a copy: a method may make as many passes as it needs."""

    shape: tuple[int, ...]
    #: Row ranges ``[start, stop)`` covering the tensor in order (``[None]``: one whole block).
    rows: Sequence[tuple[int, int] | None]
    #: rows -> (the models' blocks in recipe order, the base's block or None), on the merge device.
    read: Callable[[tuple[int, int] | None], tuple[list["torch.Tensor"], "torch.Tensor | None"]]

    @staticmethod
    def whole(tensors: Sequence["torch.Tensor"], base: "torch.Tensor | None") -> RowBlocks:
        return RowBlocks(tuple(tensors[0].shape), [None], lambda rows: (list(tensors), base))

    def flat(self) -> "Blocks":
        """The same blocks as the kernels take them: flat, with each block's flat start."""
        from workbench_kernels.blocks import Blocks

        row = math.prod(self.shape[1:])

        def load(i: int) -> tuple[list["torch.Tensor"], "torch.Tensor | None"]:
            xs, base = self.read(self.rows[i])
            return [x.reshape(-1) for x in xs], None if base is None else base.reshape(-1)

        return Blocks(math.prod(self.shape), [0 if r is None else r[0] * row for r in self.rows], load)


@dataclass
class PrepareContext:
    """Lazy handles to every input, for methods that need global statistics before merging."""

    models: Sequence["CheckpointReader"]
    base: "CheckpointReader | None"
    #: Global parameters as the recipe gives them (scalars, per-layer lists or filter lists).
    params: dict[str, Any]
    #: Each model's parameters as the recipe gives them (top-level defaults merged in), in model order.
    model_params: Sequence[dict[str, Any]]
    tensor_names: Sequence[str]
    device: str
    #: The recipe's seed (per-tensor seeds derive from it and the tensor name).
    seed: int = 0
    compute_dtype: "torch.dtype | None" = None
    #: Anything else the engine offers; ``registry`` is the registry the run uses.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryNeed:
    """What a whole-model method holds at its peak, stated before any work."""

    nbytes: int
    what: str  # e.g. "the base model and 4 task vectors in float32"


class MergeMethod:
    """Subclass, set the class attributes, implement :meth:`apply`, and register the class."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str | None] = None
    #: A paragraph for the method's documentation page (``workbench methods --docs``): when to
    #: reach for this method rather than another, and what to watch out for.
    when_to_use: ClassVar[str] = ""
    Parameters: ClassVar[type[MethodParameters]] = MethodParameters
    ModelParameters: ClassVar[type[MethodParameters]] = MethodParameters
    base_model: ClassVar[BaseRequirement] = "optional"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    #: The output at each element depends only on the inputs at that element, so the engine may feed
    #: row blocks of large tensors (less memory, better cache use).
    elementwise: ClassVar[bool] = False
    #: Every input must have the reference model's shape for every tensor; a method that maps
    #: inputs of other widths into the reference's (e.g. ``ot_fusion``) sets this False.
    equal_shapes: ClassVar[bool] = True
    #: The output at each element depends on the inputs at that element and on statistics of the
    #: whole tensor (a top-k threshold, an L1 norm, a norm): the engine hands the tensor's row blocks
    #: to :meth:`tensor_statistics` first, then feeds row blocks to :meth:`apply` with the result in
    #: ``ctx.statistics``, so no whole large tensor is ever held.
    blockwise: ClassVar[bool] = False
    #: ``prepare`` holds whole models in memory (the engine warns about the memory this takes).
    whole_model: ClassVar[bool] = False

    @property
    def row_blocks(self) -> bool:
        """Whether the engine may feed row blocks of large tensors to :meth:`apply`."""
        return self.elementwise or self.blockwise

    def write_extras(self, state: Any, folder: "Path") -> list["Path"]:
        """Files to keep beside the merged weights (e.g. the transport maps of ``ot_fusion``), written
        into ``folder`` after every tensor; ``state`` is what :meth:`prepare` returned. Default: none."""
        return []

    def check_plan(
        self, params: dict[str, Any], model_params: Sequence[dict[str, Any]], layer_count: int
    ) -> None:
        """Reject parameters that cannot work with these models (e.g. more layers than they have).

        Called while planning, before any tensor is read, with the recipe's raw values (top-level
        defaults merged into each model's); the default accepts everything.
        """

    def memory_needed(
        self,
        params: dict[str, Any],
        model_params: Sequence[dict[str, Any]],
        tensors: Sequence[tuple[str, tuple[int, ...]]],
    ) -> MemoryNeed | None:
        """What :meth:`prepare` holds beyond the streaming merge (whole-model methods), from the
        recipe's raw values and the (name, shape) of every float tensor; the planner refuses a
        recipe that needs more than the memory limit, before any tensor is read. Default: nothing."""
        return None

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """Reject a model count or base-model use this method cannot work with."""
        where = f"method '{self.name}'"
        if self.base_model == "required" and not has_base:
            raise RecipeError(f"{where} needs a base model: add 'base: <path>' to the recipe.")
        if self.base_model == "unused" and has_base:
            raise RecipeError(f"{where} does not use a base model: remove 'base' from the recipe.")
        if n_models < self.min_models:
            raise RecipeError(
                f"{where} needs at least {self.min_models} model(s) in 'models', got {n_models}."
            )
        if self.max_models is not None and n_models > self.max_models:
            raise RecipeError(
                f"{where} takes at most {self.max_models} model(s) in 'models', got {n_models}."
            )

    def prepare(self, ctx: PrepareContext) -> Any:
        """Compute global state before any tensor is merged; the result is passed as ``ctx.state``."""
        return None

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: MethodParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> Any:
        """What a blockwise method needs to know about the whole tensor before merging any block of
        it, gathered from ``blocks`` (``ctx`` describes the whole tensor, ``rows`` None)."""
        raise NotImplementedError(f"method '{self.name}' is blockwise but has no tensor_statistics")

    def statistics(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: MethodParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> Any:
        """``ctx.statistics`` as the engine gathered them, or, when :meth:`apply` is called directly on
        whole tensors (another method wrapping this one, a test), gathered from those tensors."""
        if ctx.statistics is not None:
            return ctx.statistics
        if ctx.rows is not None:
            raise RuntimeError(
                f"method '{self.name}' got a row block of '{ctx.name}' without its tensor statistics"
            )
        return self.tensor_statistics(RowBlocks.whole(tensors, base), params, model_params, ctx)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: MethodParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":
        """Merge one tensor (or one row block of it).

        ``tensors`` are the models' tensors in recipe order, on ``ctx.device`` and in their stored
        dtype; compute in ``ctx.compute_dtype``. ``params`` and ``model_params`` are already resolved
        for this tensor (gradients interpolated, filters applied). The engine converts the result to
        ``ctx.out_dtype`` if it is not in that dtype already.
        """
        raise NotImplementedError


# The engine resolves parameters and seeds with these; a plugin or its tests may call them too.

_NO_VALUE = object()


def param_keys(schema: type[MethodParameters]) -> dict[str, str]:
    """Recipe key -> field name (a field may use an alias such as 'lambda')."""
    return {(f.alias or name): name for name, f in schema.model_fields.items()}


def resolve_params(
    schema: type[MethodParameters], raw: dict[str, Any], place: TensorPlace, name: str, layers: int
) -> MethodParameters:
    """The parameters of one tensor: gradients interpolated, filters applied, schema validated."""
    values: dict[str, Any] = {}
    for key, fname in param_keys(schema).items():
        if key not in raw:
            continue
        if not is_per_layer(schema, fname):
            values[key] = raw[key]
            continue
        value = resolve(raw[key], name, place.layer_index, layers, _NO_VALUE)
        if value is _NO_VALUE:
            if schema.model_fields[fname].is_required():
                raise RecipeError(
                    f"no filter of parameter '{key}' matches tensor '{name}', and '{key}' has no default."
                )
            continue
        values[key] = value
    return schema.model_validate(values)


def tensor_seed(seed: int, name: str) -> int:
    """The ``ctx.seed`` of tensor ``name`` under the recipe's ``seed``: it depends only on the two (not on
    scheduling or device), so a test can reproduce a random method's draws."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
