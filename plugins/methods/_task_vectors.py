"""Shared machinery of the sparsified task-vector methods (TIES, DARE, Model Breadcrumbs).

These are mergekit's "generalized task arithmetic" family: per tensor, each task vector
``tau_i = theta_i - base`` is sparsified (by magnitude or at random), optionally rescaled, weighted,
then either summed (``*_linear`` / ``breadcrumbs``) or merged with TIES sign consensus, and the
result is ``base + lambda * merged``. Parameter names and defaults are mergekit's; where its
behaviour is arbitrary or unsafe the deviation is documented in docs/methods.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import model_validator

from workbench.architecture import fused_experts
from workbench.errors import RecipeError
from workbench.method import (
    MergeMethod,
    MethodParameters,
    Param,
    PrepareContext,
    RowBlocks,
    TensorContext,
    model_seed,
)
from workbench.params import varies
from workbench_plugins.methods._weights import normalized

if TYPE_CHECKING:
    import torch

    from workbench_kernels.blocks import Blocks
    from workbench_kernels.sparsify import MagnitudeBand, Sparsification, TaskVector
    from workbench_kernels.task_vector_merge import FusedMerge


LAMBDA = "lambda: scale of the merged task vector (result = base + lambda * merged)."
NORMALIZE_SUM = "Divide the sum of the task vectors by the sum of the weights."
NORMALIZE_CONSENSUS = (
    "Divide each element by the summed weights of the models "
    "agreeing with its elected sign (TIES's disjoint mean)."
)
RESCALE = "Rescale each sparsified task vector to make up for what was dropped (see rescale_mode)."
_RESCALE_MODE = (
    "How rescale restores a sparsified task vector: 'l1' (mergekit) scales it so that its L1 norm"
    " matches the original's; 'inverse_density' (DARE paper) multiplies it by 1/density."
)
_SCOPE = (
    "Where the magnitude top-k is taken: 'tensor' (mergekit: each tensor keeps its own top density) or"
    " 'model' (the TIES paper: one exact threshold per task vector over the whole model, found by a"
    " streaming pass over the inputs before the merge)."
)
INT8_MASK = (
    "Accepted for mergekit recipes; changes nothing here: masks are always 1-byte booleans (the"
    " memory saving int8_mask buys in mergekit), and results never depended on it."
)


class TaskVectorParameters(MethodParameters):
    """Global parameters of the family; subclasses change the defaults of normalize and rescale."""

    scale: float = Param(1.0, alias="lambda", description=LAMBDA)
    normalize: bool = Param(False, description=NORMALIZE_SUM, per_layer=False)
    rescale: bool = Param(False, description=RESCALE, per_layer=False)
    rescale_mode: Literal["l1", "inverse_density"] = Param("l1", description=_RESCALE_MODE, per_layer=False)
    int8_mask: bool = Param(False, description=INT8_MASK, per_layer=False)
    scope: Literal["tensor", "model"] = Param("tensor", description=_SCOPE, per_layer=False)

    @model_validator(mode="after")
    def _mode_needs_rescale(self) -> TaskVectorParameters:
        if "rescale_mode" in self.model_fields_set and not self.rescale:
            raise ValueError("rescale_mode has no effect unless rescale is true")
        return self


class LinearParameters(TaskVectorParameters):
    """Sum of the sparsified task vectors (dare_linear, breadcrumbs)."""


class ConsensusParameters(TaskVectorParameters):
    """TIES sign consensus (ties, dare_ties, breadcrumbs_ties)."""

    normalize: bool = Param(False, description=NORMALIZE_CONSENSUS, per_layer=False)


class DensityModelParameters(MethodParameters):
    weight: float = Param(1.0, description="Weight of this model's task vector (0 removes the model).")
    density: float = Param(
        1.0, description="Fraction of this task vector's entries kept (1 keeps all).", ge=0.0, le=1.0
    )


@dataclass(frozen=True)
class Thresholds:
    """Magnitude bands computed before the merge (e.g. one per task vector over the whole model,
    by a ``prepare`` pass), by model index. When ``ctx.state`` is a ``Thresholds``, a model listed
    in it uses that band instead of its per-tensor top-k."""

    bands: Mapping[int, MagnitudeBand]


@dataclass(frozen=True)
class TensorMerge:
    """How one tensor is merged, decided over the whole tensor before any row block is (exactly one
    field is set): task arithmetic's coefficients of (base, models...) when nothing is dropped; the
    fused kernel with every keep rule resolved; or the result itself, computed on whole tensors
    where no fused kernel applies (another compute dtype, breadcrumbs' two-sided bands, the
    reference path)."""

    coefficients: tuple[float, ...] | None = None
    fused: FusedMerge | None = None
    whole: torch.Tensor | None = None


class TaskVectorMethod(MergeMethod):
    """Base of the sparsified task-vector methods: subclasses set the class attributes only."""

    base_model = "required"
    #: Top-k thresholds, L1 norms and random masks are defined over the whole tensor; given those,
    #: each element merges on its own.
    mode = "blockwise"
    sparsification: ClassVar[Sparsification]
    consensus: ClassVar[bool]

    def prepare(self, ctx: PrepareContext) -> Thresholds | None:
        """With ``scope: model``, one magnitude band per task vector over the whole model."""
        if ctx.params.values.scope != "model":
            return None
        if self.sparsification != "magnitude":
            raise RecipeError(
                f"{self.name}: 'scope' applies to magnitude trimming; this method drops entries at random."
            )
        import torch

        from workbench_kernels.sparsify import model_band

        assert ctx.base is not None
        base = ctx.base
        names = [n for n in ctx.tensor_names if base.info(n).is_float]
        bands = {}
        for i, given in enumerate(ctx.model_params):
            varying = [k for k in ("density", "gamma") if varies(given.raw.get(k))]
            if varying:
                raise RecipeError(
                    f"{self.name}: scope 'model' needs one {varying[0]} per model, not a list, a filter or a file."
                )
            options = given.values
            reader = ctx.models[i]

            def stream(reader: Any = reader) -> Any:
                return (reader.read(n).to(torch.float32) - base.read(n).to(torch.float32) for n in names)

            bands[i] = model_band(stream, options.density, float(getattr(options, "gamma", 0.0)))
        return Thresholds(bands)

    def precomputed_band(self, model_index: int, ctx: TensorContext) -> MagnitudeBand | None:
        """A threshold given through ``ctx.state`` (see :class:`Thresholds`); None: per tensor."""
        if self.sparsification == "magnitude" and isinstance(ctx.state, Thresholds):
            return ctx.state.bands.get(model_index)
        return None

    def specs(
        self, params: TaskVectorParameters, model_params: list[DensityModelParameters], ctx: TensorContext
    ) -> list[TaskVector]:
        from workbench_kernels.sparsify import TaskVector

        return [
            TaskVector(
                weight=mp.weight,
                density=mp.density,
                sparsify=self.sparsification,
                gamma=float(getattr(mp, "gamma", 0.0)),
                rescale=params.rescale_mode if params.rescale else None,
                seed=model_seed(ctx.seed, i),
                band=self.precomputed_band(i, ctx),
            )
            for i, mp in enumerate(model_params)
        ]

    def tensor_statistics(
        self,
        blocks: RowBlocks,
        params: TaskVectorParameters,
        model_params: list[DensityModelParameters],
        ctx: TensorContext,
    ) -> TensorMerge | ExpertMerges:  # type: ignore[override]
        """How this tensor is merged: thresholds and rescale factors gathered block by block for the
        fused kernel, or, on paths without one, the whole result. A fused expert tensor is merged
        expert by expert, as the per-expert matrices of the older layout are."""
        experts = fused_experts(ctx.name, tuple(blocks.shape))
        if experts is None:
            return self._tensor_merge(blocks.flat(), lambda: blocks.read(None), params, model_params, ctx)
        size = math.prod(blocks.shape[1:])
        return ExpertMerges(
            tuple(
                self._tensor_merge(
                    _expert_blocks(blocks, e, size),
                    lambda e=e: _expert(blocks, e),  # type: ignore[misc]
                    params,
                    model_params,
                    ctx,
                )
                for e in range(experts)
            ),
            size,
        )

    def _tensor_merge(
        self,
        blocks: Blocks,
        whole: Callable[[], tuple[list[torch.Tensor], torch.Tensor | None]],
        params: TaskVectorParameters,
        model_params: list[DensityModelParameters],
        ctx: TensorContext,
    ) -> TensorMerge:
        """The merge of one matrix (a tensor, or one expert of a fused expert tensor) given as flat
        ``blocks``; ``whole()`` reads it at once for the paths without a fused kernel."""
        from workbench_kernels.task_vector_merge import merge_task_vectors, plan_fused

        specs = self.specs(params, model_params, ctx)
        normalize = params.normalize
        if not self.consensus and all(s.density >= 1.0 and s.band is None for s in specs):
            # Nothing is dropped: this is task arithmetic, computed exactly as that method does.
            weights = [s.weight for s in specs]
            coefficients = [
                params.scale * w for w in (normalized(weights, self.name, ctx.name) if normalize else weights)
            ]
            return TensorMerge(coefficients=(1.0 - sum(coefficients), *coefficients))
        try:
            fused = plan_fused(
                blocks,
                specs,
                consensus=self.consensus,
                normalize=normalize,
                scale=params.scale,
                compute_dtype=ctx.compute_dtype,
            )
            if fused is not None:
                return TensorMerge(fused=fused)
            tensors, base = whole()
            assert base is not None
            return TensorMerge(
                whole=merge_task_vectors(
                    base,
                    tensors,
                    specs,
                    consensus=self.consensus,
                    normalize=normalize,
                    scale=params.scale,
                    compute_dtype=ctx.compute_dtype,
                    out_dtype=ctx.out_dtype,
                )
            )
        except ValueError as exc:
            raise RecipeError(f"{self.name}: tensor '{ctx.name}': {exc}.") from None

    def apply(
        self,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: TaskVectorParameters,
        model_params: list[DensityModelParameters],
        ctx: TensorContext,
    ) -> torch.Tensor:  # type: ignore[override]
        import torch

        assert base is not None
        merge: TensorMerge | ExpertMerges = self.statistics(tensors, base, params, model_params, ctx)
        if isinstance(merge, TensorMerge):
            rows = None if ctx.rows is None else (ctx.rows[0], ctx.rows[1])
            return _merged(merge, tensors, base, ctx, ctx.offset, rows)
        first = 0 if ctx.rows is None else ctx.rows[0]
        return torch.cat(
            [
                _merged(
                    merge.experts[first + i],
                    [x[i : i + 1] for x in tensors],
                    base[i : i + 1],
                    ctx,
                    (first + i) * merge.size,
                    None,
                )
                for i in range(base.shape[0])
            ]
        )


@dataclass(frozen=True)
class ExpertMerges:
    """The merge of a fused expert tensor: one :class:`TensorMerge` per expert (``size`` elements each)."""

    experts: tuple[TensorMerge, ...]
    size: int


def _expert(blocks: RowBlocks, e: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Expert ``e``'s slice of every input (its row of dimension 0)."""
    if blocks.rows == [None]:  # one block: read whole, sliced here
        xs, base = blocks.read(None)
        return [x[e : e + 1] for x in xs], None if base is None else base[e : e + 1]
    return blocks.read((e, e + 1))


def _expert_blocks(blocks: RowBlocks, e: int, size: int) -> Blocks:
    """Expert ``e`` as flat blocks for the kernels: one block, starting at its flat index in the tensor
    (random masks are drawn by flat index, so each expert draws its own)."""
    from workbench_kernels.blocks import Blocks

    def load(i: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        xs, base = _expert(blocks, e)
        return [x.reshape(-1) for x in xs], None if base is None else base.reshape(-1)

    return Blocks(size, [e * size], load)


def _merged(
    merge: TensorMerge,
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    offset: int,
    rows: tuple[int, int] | None,
) -> torch.Tensor:
    """One block of a planned merge; ``offset``: its first element's flat index in the tensor, ``rows``:
    where it sits in a result computed whole."""
    from workbench_kernels.weighted_sum import weighted_sum

    if merge.coefficients is not None:
        return weighted_sum([base, *tensors], list(merge.coefficients), ctx.compute_dtype, ctx.out_dtype)
    if merge.fused is not None:
        return merge.fused(base, tensors, ctx.out_dtype, offset)
    assert merge.whole is not None
    return merge.whole if rows is None else merge.whole[rows[0] : rows[1]]
