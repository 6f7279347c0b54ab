"""LiNeS (Wang et al., ICLR 2025): scale a task vector by depth, little in the shallow blocks and
more in the deep ones, which keeps general features (less forgetting) and reduces interference.

For residual blocks ℓ = 0..L−1 (``ctx.layer_index`` of ``ctx.layer_count``) the merged task vector
of a block is scaled by λ(ℓ) = α + β ℓ / (L − 1) (the paper's α + β (ℓ−1)/(L−1) for ℓ = 1..L);
every tensor outside the blocks (embeddings, final norm, head) gets α, the smallest scale, as in
the official code (``src/eval/eval.py::LiNeS_scaling``). With L = 1 the single block gets α.

LiNeS is a *modifier*: ``merge`` names any registered task-vector method (default
``task_arithmetic``). Its merged task vector τ_MTL (its result minus the base, computed with its
``lambda`` forced to 1) is what gets scaled: θ = θ_base + λ(ℓ) τ_MTL. ``merge_parameters`` are the
inner method's global parameters and ``merge_model_parameters`` its per-model ones (per-model
``weight`` is given directly). Uses:

* single-task editing (one model): give α (the paper sweeps 1.0, 0.9 .. 0.0); β defaults to 1 − α,
  so the last block keeps the whole task vector;
* multi-task merging: ``alpha: auto`` (default) is α = (‖Σₜ τₜ‖₁ / ‖τ_MTL‖₁) / T with model-wide L1
  norms, so the bottom of the model gets the average task vector (exactly 1/T for task arithmetic).
  With per-model weights wₜ the average is weighted: α = ‖Σₜ wₜτₜ‖₁ / (Σₜ wₜ ‖τ_MTL‖₁). The paper
  tunes β on the inner method's λ grid; the default 1 − α gives the top block the full τ_MTL.

The model-wide norms are computed the first time a tensor is merged, by streaming over every
tensor (one at a time, never a whole model) through the inner method: there the tensor context
shows the recipe seed when it is the default 0, so a random inner method (DARE) draws the same masks
in that pass as in the merge (other, still reproducible, ones with another seed: methods are not
given the recipe seed). Per-layer weights make the average per tensor: α = Σₙ ‖Σₜ wₜτₜ / Σₜ wₜ‖₁ /
Σₙ ‖τ_MTL‖₁ over tensors n.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError, model_validator

from workbench import architecture
from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, ParameterSet, PrepareContext, TensorContext

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench.method import PluginLookup


class LinesParameters(MethodParameters):
    alpha: float | Literal["auto"] = Param(
        "auto",
        per_layer=False,
        description=(
            "Scale of the shallowest block and of every tensor outside the blocks; 'auto': "
            "(||sum_t tau_t||_1 / ||tau_MTL||_1) / T, the multi-task rule (1/T for task arithmetic)."
        ),
    )
    beta: float | None = Param(
        None,
        per_layer=False,
        description="Added scale at the deepest block: lambda(l) = alpha + beta * l / (L - 1); default 1 - alpha.",
    )
    merge: str = Param(
        "task_arithmetic",
        per_layer=False,
        description=(
            "The registered task-vector method whose merged task vector "
            "is scaled (task_arithmetic, ties, dare_ties, pcb, ...)."
        ),
    )
    merge_parameters: dict[str, Any] = Param(
        {},
        per_layer=False,
        description=(
            "Global parameters of the inner method (its lambda is "
            "fixed to 1); values may be per-layer lists or filters."
        ),
    )

    @model_validator(mode="after")
    def _inner_method_exists(self) -> "LinesParameters":
        """Checked while planning, so that ``workbench validate`` reports a bad inner method."""
        check_inner(inner_class(self.merge), self.merge_parameters)
        return self


class LinesModelParameters(MethodParameters):
    weight: float = Param(1.0, description="This model's weight, passed to the inner method's 'weight'.")
    merge_model_parameters: dict[str, Any] = Param(
        {},
        per_layer=False,
        description=(
            "Other per-model parameters of the inner method (e.g. "
            "density); values may be per-layer lists or filters."
        ),
    )


def lines_scale(alpha: float, beta: float, layer_index: int | None, layer_count: int) -> float:
    """λ(ℓ) = α + β ℓ / (L − 1) inside the blocks; α outside them."""
    if layer_index is None:
        return alpha
    t = min(layer_index / (layer_count - 1), 1.0) if layer_count > 1 else 0.0
    return alpha + beta * t


def inner_class(merge: str, registry: "PluginLookup | None" = None) -> type[MergeMethod]:
    """The registered method LiNeS wraps; it must take task vectors against a base."""
    from workbench.registry import get_registry

    try:
        cls = (registry or get_registry()).method(merge)
    except RecipeError as exc:
        raise RecipeError(f"lines: merge: {exc}") from None
    if cls.name == Lines.name:
        raise RecipeError("lines: merge cannot be 'lines' itself.")
    if cls.base_model == "unused":
        raise RecipeError(
            f"lines: method '{merge}' does not use a base model, so it has no task vector to scale."
        )
    return cls


def check_inner(cls: type[MergeMethod], raw: dict[str, Any]) -> None:
    from workbench.method import param_keys

    keys = param_keys(cls.Parameters)
    for key in raw:
        if key == "lambda":
            raise RecipeError(
                "lines: merge_parameters cannot set 'lambda': LiNeS replaces it (the inner method runs with lambda 1)."
            )
        if key not in keys:
            known = ", ".join(sorted(set(keys) - {"lambda"})) or "none"
            raise RecipeError(
                f"lines: merge_parameters has '{key}', which method '{cls.name}' does not take (known: {known})."
            )


class _State:
    """The inner method and what LiNeS learns about the whole model, shared by every tensor."""

    def __init__(
        self, inner: MergeMethod, inner_state: Any, inner_params: ParameterSet, ctx: PrepareContext
    ) -> None:
        self.inner, self.inner_state, self.inner_set = inner, inner_state, inner_params
        self.models: Sequence[CheckpointReader] = ctx.models
        self.base = ctx.base
        self.model_params = ctx.model_params
        self.names = list(ctx.tensor_names)
        self.alpha: float | None = None
        self.lock = threading.Lock()

    def inner_params(self, name: str) -> MethodParameters:
        try:
            return self.inner_set.at(name)
        except RecipeError as exc:
            raise RecipeError(f"lines: merge_parameters, for method '{self.inner.name}': {exc}") from None

    def inner_model_params(
        self, model_params: Sequence[LinesModelParameters], name: str, layer_count: int
    ) -> list[MethodParameters]:
        from workbench.method import resolve_params

        schema = type(self.inner).ModelParameters
        out = []
        for i, p in enumerate(model_params):
            raw = inner_model_raw(
                schema,
                {"weight": p.weight, "merge_model_parameters": p.merge_model_parameters},
                i,
                self.inner.name,
            )
            try:
                out.append(resolve_params(schema, raw, architecture.place(name), name, layer_count))
            except (ValidationError, LookupError, ValueError) as exc:
                raise RecipeError(
                    f"lines: models[{i}] parameters for tensor '{name}' "
                    f"are invalid for method '{self.inner.name}': {exc}"
                ) from None
        return out

    def lines_model_params(self, name: str) -> list[LinesModelParameters]:
        """This tensor's LiNeS per-model parameters."""
        return [p.at(name) for p in self.model_params]  # type: ignore[misc]

    def auto_alpha(self, ctx: TensorContext) -> float:
        with self.lock:
            if self.alpha is None:
                self.alpha = self._compute_alpha(ctx)
            return self.alpha

    def _compute_alpha(self, ctx: TensorContext) -> float:
        from workbench.params import varies

        weights = [p.raw.get("weight", 1.0) for p in self.model_params]
        if not any(varies(w) for w in weights):
            shortcut = alpha_shortcut(self.inner.name, self.inner_params(ctx.name), float(sum(weights)))
            if shortcut is not None:
                return shortcut
        return self._alpha_pass(ctx)

    def _alpha_pass(self, ctx: TensorContext) -> float:
        """‖Σₜ wₜτₜ / Σₜ wₜ‖₁ / ‖τ_MTL‖₁ over the whole model, one tensor at a time."""
        import torch

        from workbench.method import tensor_seed

        assert self.base is not None
        # The engine seeds tensor n with tensor_seed(recipe seed, n). The recipe seed is not passed
        # on, but when it is the default 0 this ctx shows it, and a random inner method draws the
        # same masks here as in the merge; otherwise it draws other (still reproducible) ones.
        recipe_seed = 0 if tensor_seed(0, ctx.name) == ctx.seed else ctx.seed
        averaged = merged_l1 = 0.0
        for name in self.names:
            info = self.base.info(name)
            if not info.is_float or info.numel == 0:
                continue
            model_params = self.lines_model_params(name)
            weights = [p.weight for p in model_params]
            if sum(weights) <= 0:
                raise RecipeError(
                    "lines: alpha 'auto' needs positive weights in total, but "
                    f"tensor '{name}' has {sum(weights)}; give alpha explicitly."
                )
            base = self.base.read(name).to(ctx.device)
            xs = [m.read(name).to(ctx.device) for m in self.models]
            place = architecture.place(name)
            tctx = dataclasses.replace(
                ctx,
                name=name,
                layer_index=place.layer_index,
                module_kind=place.module_kind,
                shape=tuple(info.shape),
                out_dtype=ctx.compute_dtype,
                seed=tensor_seed(recipe_seed, name),
                rows=None,
                state=self.inner_state,
            )
            merged = self.inner.apply(
                xs,
                base,
                self.inner_params(name),
                self.inner_model_params(model_params, name, ctx.layer_count),
                tctx,
            )
            b = base.to(ctx.compute_dtype)
            merged_l1 += float((merged.to(ctx.compute_dtype) - b).abs().sum(dtype=torch.float64))
            tv_sum = sum(
                (w * (x.to(ctx.compute_dtype) - b) for w, x in zip(weights, xs) if w != 0.0),
                torch.zeros_like(b),
            )
            averaged += float(tv_sum.abs().sum(dtype=torch.float64)) / sum(weights)
        return averaged / merged_l1 if merged_l1 > 0 else 1.0


def inner_model_raw(
    schema: type[MethodParameters], raw: dict[str, Any], index: int, inner: str
) -> dict[str, Any]:
    """The inner method's per-model parameters (recipe form) from LiNeS's: ``merge_model_parameters``
    plus ``weight`` where the inner method takes one."""
    from workbench.method import param_keys

    keys = param_keys(schema)
    out = dict(raw.get("merge_model_parameters") or {})
    unknown = sorted(set(out) - set(keys)) + (["weight"] if "weight" in out else [])
    if unknown:
        known = ", ".join(sorted(set(keys) - {"weight"})) or "none"
        raise RecipeError(
            f"lines: models[{index}] merge_model_parameters has '{unknown[0]}', which is "
            f"not a per-model parameter of '{inner}' other than weight (known: {known})."
        )
    if "weight" in raw:
        if "weight" in keys:
            out["weight"] = raw["weight"]
        elif raw["weight"] != 1.0:
            raise RecipeError(
                f"lines: method '{inner}' has no per-model weight, but models[{index}] has weight {raw['weight']}."
            )
    return out


def alpha_shortcut(inner: str, inner_params: MethodParameters, total_weight: float) -> float | None:
    """The auto α without a pass where it is known in closed form: for task arithmetic τ_MTL = Σ wₜτₜ
    (or that divided by Σ wₜ with ``normalize``), so α = 1/Σ wₜ (or 1)."""
    if inner == "task_arithmetic":
        return 1.0 if getattr(inner_params, "normalize", False) else 1.0 / total_weight
    return None


class Lines(MergeMethod):
    name = "lines"
    summary = (
        "LiNeS: scale a (merged) task vector by depth, alpha + beta * l / (L - 1), "
        "alpha outside the blocks; wraps any task-vector method."
    )
    paper = "https://arxiv.org/abs/2410.17146"
    when_to_use = (
        "On top of any task-vector merge (merge: ties, dare_ties, ...): shallow layers hold general "
        "features that fine-tuning should barely change, so scaling the merged task vector up with depth "
        "keeps more of the base's general ability while keeping the tasks. Alone (one fine-tune) it "
        "reduces forgetting. Tune beta; alpha defaults to the paper's rule. "
        "Exact semantics: [methods.md](../methods.md#lines)."
    )
    Parameters = LinesParameters
    ModelParameters = LinesModelParameters
    base_model = "required"
    # Whole tensors unless the inner method is elementwise (prepare() then sets it on the instance).
    mode = "whole"

    def prepare(self, ctx: PrepareContext) -> _State:
        from workbench.method import param_keys

        options: LinesParameters = ctx.params.values
        inner_cls = inner_class(options.merge, ctx.registry)
        inner = inner_cls()
        inner.check_inputs(len(ctx.models), ctx.base is not None)
        inner_raw = dict(options.merge_parameters or {})
        check_inner(inner_cls, inner_raw)
        if "lambda" in param_keys(inner_cls.Parameters):
            inner_raw["lambda"] = 1.0
        if options.alpha == "auto" and len(ctx.models) < 2:
            raise RecipeError(
                "lines: with one model (single-task editing) give alpha explicitly, "
                "e.g. 0.1..0.9; 'auto' would leave the fine-tune unchanged."
            )
        # the inner method's parameters in recipe form, from LiNeS's own recipe text
        inner_params = ParameterSet(inner_cls.Parameters, inner_raw, ctx.layer_count)
        inner_model = [
            ParameterSet(
                inner_cls.ModelParameters,
                inner_model_raw(inner_cls.ModelParameters, p.raw, i, inner_cls.name),
                ctx.layer_count,
            )
            for i, p in enumerate(ctx.model_params)
        ]
        inner_state = inner.prepare(dataclasses.replace(ctx, params=inner_params, model_params=inner_model))
        self.mode = "elementwise" if inner.mode == "elementwise" else "whole"
        return _State(inner, inner_state, inner_params, ctx)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: LinesParameters,
        model_params: list[LinesModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        assert base is not None
        state = ctx.state
        if not isinstance(state, _State):
            raise RuntimeError("lines needs its prepare() state")
        alpha = state.auto_alpha(ctx) if params.alpha == "auto" else float(params.alpha)
        beta = 1.0 - alpha if params.beta is None else params.beta
        scale = lines_scale(alpha, beta, ctx.layer_index, ctx.layer_count)
        b = base.to(ctx.compute_dtype)
        if scale == 0.0:
            return b
        inner_ctx = dataclasses.replace(ctx, out_dtype=ctx.compute_dtype, state=state.inner_state)
        inner_params = state.inner_params(ctx.name)
        inner_model_params = state.inner_model_params(model_params, ctx.name, ctx.layer_count)
        merged = state.inner.apply(tensors, base, inner_params, inner_model_params, inner_ctx).to(
            ctx.compute_dtype
        )
        if scale == 1.0:  # the inner method's result itself, bit for bit
            return merged
        return b + scale * (merged - b)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Lines)
