"""The contract every merge method implements.

A method is a class registered through the ``register_methods`` hook, or a typed function made
into one by :func:`merge_function`. It declares a typed parameter schema (pydantic) from which the
CLI help, recipe validation and TUI forms are generated, an execution :data:`Mode` (how much of a
tensor one ``apply`` call must see), an optional ``prepare`` pass over lazy handles to all inputs,
and a per-tensor ``apply``. The engine owns reading, scheduling and writing, so every method streams
with bounded memory unless it says otherwise (``memory_needed``).
"""

from __future__ import annotations

import hashlib
import inspect
import keyword
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import create_model
from pydantic.fields import FieldInfo

from workbench import architecture
from workbench.errors import RecipeError

# The parameter schema's names, re-exported: a plugin imports its whole contract from here.
from workbench.params import (
    MethodParameters as MethodParameters,
    Param as Param,
    ParameterSet as ParameterSet,
    is_per_layer as is_per_layer,
    param_keys as param_keys,
    resolve_params as resolve_params,
)

if TYPE_CHECKING:  # torch is imported only where tensors are touched
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench_kernels.blocks import Blocks

BaseRequirement = Literal["required", "optional", "unused"]
#: How much of a tensor one call of ``apply`` must see (see :attr:`MergeMethod.mode`).
Mode = Literal["elementwise", "rowwise", "blockwise", "whole"]
MODES: tuple[Mode, ...] = ("elementwise", "rowwise", "blockwise", "whole")


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

    @classmethod
    def for_tensor(
        cls,
        name: str,
        shape: Sequence[int],
        *,
        layer_count: int = 0,
        recipe_seed: int = 0,
        compute_dtype: "torch.dtype | None" = None,
        out_dtype: "torch.dtype | None" = None,
        device: str = "cpu",
        rows: tuple[int, int] | None = None,
        state: Any = None,
        statistics: Any = None,
    ) -> TensorContext:
        """The context the engine would give tensor ``name`` (layer and module kind from the name, the
        seed from ``recipe_seed`` and the name), for calling ``apply`` in a unit test; dtypes default
        to float32."""
        import torch

        place = architecture.place(name)
        return cls(
            name=name,
            layer_index=place.layer_index,
            layer_count=layer_count,
            module_kind=place.module_kind,
            shape=tuple(shape),
            device=device,
            compute_dtype=compute_dtype or torch.float32,
            out_dtype=out_dtype or compute_dtype or torch.float32,
            seed=tensor_seed(recipe_seed, name),
            rows=rows,
            state=state,
            statistics=statistics,
        )


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


class PluginLookup(Protocol):
    """What ``prepare`` may ask of the registry (the contract does not import the registry itself)."""

    def method(self, name: str) -> type[MergeMethod]: ...

    def make_evaluator(self, name: str, options: dict[str, Any]) -> Any: ...  # an Evaluator


@runtime_checkable
class LayerSwapLayout(Protocol):
    """What a method whose output takes each decoder layer from one of two models, or blends them
    (``layer_swap``), offers the TUI's layer map: the layout a recipe's raw values give, and raw values
    rewritten for an edited layout. The TUI shows and edits the map of any method class with both."""

    @classmethod
    def layer_layout(
        cls, params: dict[str, Any], model_params: Sequence[dict[str, Any]], layers: int
    ) -> tuple[list[float], int, int]:
        """(the second model's weight per layer, index of the first model, index of the second)."""
        ...

    @classmethod
    def with_layout(cls, params: dict[str, Any], weights: Sequence[float]) -> dict[str, Any]:
        """``params`` rewritten to give ``weights`` per layer, in the method's own format."""
        ...


@dataclass
class PrepareContext:
    """Lazy handles to every input, for methods that need global statistics before merging."""

    models: Sequence["CheckpointReader"]
    base: "CheckpointReader | None"
    #: The method's parameters, validated (``params.values`` run-wide, ``params.at(name)`` per tensor).
    params: ParameterSet
    #: Each model's parameters, validated (top-level defaults merged in), in model order.
    model_params: Sequence[ParameterSet]
    tensor_names: Sequence[str]
    device: str
    #: The recipe's seed (per-tensor seeds derive from it and the tensor name).
    seed: int = 0
    compute_dtype: "torch.dtype | None" = None
    #: The models' decoder layers, as the planner counted them (0 when none are recognised).
    layer_count: int = 0
    #: The inputs as the recipe names them (a path, a Hub id, ``BASE+ADAPTER``), in model order.
    model_refs: Sequence[str] = ()
    #: The base as the recipe names it.
    base_ref: str | None = None
    #: The registry the run uses: ``registry.method(name)`` (a method wrapping another) and
    #: ``registry.make_evaluator(name, options)`` (a method that learns from an evaluator's data).
    registry: "PluginLookup | None" = None
    #: Shows a line of progress on a terminal (``atlas`` reports its learning steps with it).
    note: Callable[[str], None] = field(default=lambda text: None)


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
    #: How much of each tensor one ``apply`` call sees; the engine streams accordingly.
    #:
    #: - ``"elementwise"``: each output element depends only on the inputs at that element; large
    #:   tensors arrive as row blocks (``ctx.rows``), 1-D ones as element ranges.
    #: - ``"rowwise"``: each output row depends only on the inputs' same row, a row being the last
    #:   dimension (a 2-D weight's row, a 3-D tensor's ``[i, j, :]``); blocks always hold whole rows,
    #:   and 1-D tensors (one row) arrive whole.
    #: - ``"blockwise"``: elementwise given statistics of the whole tensor (a top-k threshold, a
    #:   norm): the engine hands the tensor's row blocks to :meth:`tensor_statistics` first, then feeds
    #:   row blocks to :meth:`apply` with the result in ``ctx.statistics``. Registration refuses a
    #:   blockwise method without ``tensor_statistics``.
    #: - ``"whole"`` (the default): whole tensors.
    #:
    #: A method may set ``self.mode`` in :meth:`prepare` when its parameters decide it (the engine
    #: reads it after ``prepare``). ``elementwise = True`` / ``blockwise = True``, the flags of API 1.0,
    #: still declare the first and third modes.
    mode: Mode = "whole"
    #: API 1.0's spelling of ``mode = "elementwise"`` (kept in step with ``mode``).
    elementwise: ClassVar[bool] = False
    #: Every input must have the reference model's shape for every tensor; a method that maps
    #: inputs of other widths into the reference's (e.g. ``ot_fusion``) sets this False.
    equal_shapes: ClassVar[bool] = True
    #: API 1.0's spelling of ``mode = "blockwise"`` (kept in step with ``mode``).
    blockwise: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Keep ``mode`` and API 1.0's flags in step: a class that declares ``mode`` gets the flags,
        one that declares only the flags gets the mode."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "mode" not in own and ("elementwise" in own or "blockwise" in own):
            cls.mode = (
                "blockwise" if own.get("blockwise") else "elementwise" if own.get("elementwise") else "whole"
            )
        cls.elementwise = cls.mode == "elementwise"
        cls.blockwise = cls.mode == "blockwise"

    @property
    def row_blocks(self) -> bool:
        """Whether the engine may feed row blocks of large tensors to :meth:`apply`."""
        return self.mode != "whole"

    def write_extras(self, state: Any, folder: "Path") -> list["Path"]:
        """Files to keep beside the merged weights (e.g. the transport maps of ``ot_fusion``), written
        into ``folder`` after every tensor; ``state`` is what :meth:`prepare` returned. Default: none."""
        return []

    def check_plan(
        self, params: ParameterSet, model_params: Sequence[ParameterSet], layer_count: int
    ) -> None:
        """Reject parameters that cannot work with these models (e.g. more layers than they have).

        Called while planning, before any tensor is read, once every tensor's parameters have passed
        the schemas (``params.values`` run-wide, ``params.at(name)`` one tensor's); a RecipeError
        raised here is shown with the recipe's file and line. The default accepts everything.
        """

    def memory_needed(
        self,
        params: ParameterSet,
        model_params: Sequence[ParameterSet],
        tensors: Sequence[tuple[str, tuple[int, ...]]],
    ) -> MemoryNeed | None:
        """What :meth:`prepare` holds beyond the streaming merge (whole-model methods), from the
        validated parameters and the (name, shape) of every float tensor; the planner refuses a
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


# The engine derives seeds with these; a plugin or its tests may call them too.


def tensor_seed(seed: int, name: str) -> int:
    """The ``ctx.seed`` of tensor ``name`` under the recipe's ``seed``: it depends only on the two (not on
    scheduling or device), so a test can reproduce a random method's draws."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def model_seed(tensor_seed: int, model_index: int) -> int:
    """The seed of model ``model_index``'s random stream for a tensor whose ``ctx.seed`` is ``tensor_seed``:
    independent across models, fixed by (recipe seed, tensor, model) — DARE's masks use it."""
    digest = hashlib.sha256(f"{tensor_seed}:{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# A simple method as a typed function.

_PER_MODEL = object()


class PerModel:
    """``weight: PerModel[float] = Param(1.0, ...)`` in a :func:`merge_function` signature: a parameter
    each model sets for itself (under ``models[i].parameters``); the function gets one value per model,
    as a list in model order."""

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[item, _PER_MODEL]


def _annotation(function: Callable[..., Any], parameter: inspect.Parameter) -> Any:
    """A parameter's annotation, evaluated alone (under ``from __future__ import annotations`` the
    tensors' may name torch, imported only for type checkers)."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return Any
    if isinstance(annotation, str):
        try:  # the plugin's own annotation text, in its module's namespace
            return eval(annotation, {"PerModel": PerModel, **function.__globals__})
        except Exception as exc:
            raise TypeError(
                f"parameter '{parameter.name}': cannot evaluate its annotation {annotation!r}: {exc}"
            ) from None
    return annotation


def merge_function(
    name: str,
    *,
    summary: str,
    mode: Mode = "whole",
    paper: str | None = None,
    when_to_use: str = "",
    min_models: int = 1,
    max_models: int | None = None,
    check_plan: Callable[[ParameterSet, Sequence[ParameterSet], int], None] | None = None,
) -> Callable[[Callable[..., Any]], type[MergeMethod]]:
    """Make a :class:`MergeMethod` of a typed function, for methods without ``prepare``, statistics or
    extra files. The signature says everything else:

    - the first parameter receives the models' tensors (a list, recipe order);
    - ``base``: the base model's tensor; without a default the method needs a base model
      (``base_model = "required"``), with ``= None`` it may take one, and without ``base`` it takes none;
    - ``ctx``: the :class:`TensorContext`;
    - every other parameter is a recipe parameter, its default a :func:`Param` (description, bounds,
      ``per_layer``); annotated ``PerModel[T]`` it is set per model and arrives as a list. Python keywords
      get a trailing underscore (``lambda_``), and the recipe key drops it (``lambda``).

    ``check_plan(params, model_params, layer_count)``, if given, is the method's
    :meth:`MergeMethod.check_plan`. The result is the method class (register it as it is); the function
    stays callable as ``__wrapped__``.
    """

    def make(function: Callable[..., Any]) -> type[MergeMethod]:
        signature = inspect.signature(function)
        rest = list(signature.parameters)[1:]  # the first receives the tensors
        global_fields: dict[str, Any] = {}
        model_fields: dict[str, Any] = {}
        base_model: BaseRequirement = "unused"
        for parameter in (signature.parameters[p] for p in rest):
            if parameter.name == "ctx":
                continue
            if parameter.name == "base":
                base_model = "required" if parameter.default is inspect.Parameter.empty else "optional"
                continue
            if not isinstance(parameter.default, FieldInfo):
                raise TypeError(
                    f"merge_function '{name}': parameter '{parameter.name}' needs a Param(...) default "
                    "(its description, default and bounds)"
                )
            annotation = _annotation(function, parameter)
            per_model = typing.get_origin(annotation) is Annotated and _PER_MODEL in annotation.__metadata__
            info = parameter.default
            if keyword.iskeyword(parameter.name.removesuffix("_")) and info.alias is None:
                key = parameter.name.removesuffix("_")
                info = FieldInfo.merge_field_infos(
                    info, alias=key, validation_alias=key, serialization_alias=key
                )
            field = (typing.get_args(annotation)[0] if per_model else annotation, info)
            (model_fields if per_model else global_fields)[parameter.name] = field
        takes = set(signature.parameters)

        def apply(
            self: MergeMethod,
            tensors: list["torch.Tensor"],
            base: "torch.Tensor | None",
            params: MethodParameters,
            model_params: list[MethodParameters],
            ctx: TensorContext,
        ) -> "torch.Tensor":
            values = {key: getattr(params, key) for key in global_fields}
            values |= {key: [getattr(p, key) for p in model_params] for key in model_fields}
            if "base" in takes:
                values["base"] = base
            if "ctx" in takes:
                values["ctx"] = ctx
            return function(tensors, **values)

        title = name.title().replace("_", "")
        attributes: dict[str, Any] = {
            "__doc__": function.__doc__,
            "__module__": function.__module__,
            "__wrapped__": staticmethod(function),
            "name": name,
            "summary": summary,
            "paper": paper,
            "when_to_use": when_to_use,
            "mode": mode,
            "base_model": base_model,
            "min_models": min_models,
            "max_models": max_models,
            "Parameters": create_model(f"{title}Parameters", __base__=MethodParameters, **global_fields),
            "ModelParameters": create_model(
                f"{title}ModelParameters", __base__=MethodParameters, **model_fields
            ),
            "apply": apply,
        }
        if check_plan is not None:
            attributes["check_plan"] = staticmethod(check_plan)  # called on the instance, without self
        return type(function.__name__, (MergeMethod,), attributes)

    return make
