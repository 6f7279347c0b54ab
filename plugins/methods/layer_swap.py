"""Layer swapping (Bandarkar et al., 2024): the outer layers of a language expert around the middle
layers of a task expert, both fine-tuned from one base.

Every tensor of decoder layer ℓ gets the language expert's weight w(ℓ) ∈ [0, 1]:
``w·θ_language + (1 − w)·θ_task``, and w = 0 or 1 copies the expert's tensor bit for bit. A layer
moves as a unit, its own norms included, because w depends only on the layer index (matched
between delimiters, so ``.1.`` never matches inside ``.11.``). The map w(ℓ) comes from ``bottom``,
``top`` and the transition zones (Algorithm 1 of the paper) or, in the general form, from an
explicit ``layer_map``. Tensors outside the layers (embeddings, final norm, head) follow
``non_layer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError, model_validator

from workbench.architecture import layer_count
from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, ParameterSet, PrepareContext, TensorContext

if TYPE_CHECKING:
    import torch

Role = Literal["task", "language"]


class LayerSwapParameters(MethodParameters):
    bottom: int = Param(
        0,
        ge=0,
        per_layer=False,
        description="Number of bottom layers (from layer 0) taken from the language expert.",
    )
    top: int = Param(
        0,
        ge=0,
        per_layer=False,
        description="Number of top layers (ending at the last layer) taken from the language expert.",
    )
    transition_bottom: int = Param(
        0, ge=0, per_layer=False, description="Blended layers just above the bottom block."
    )
    transition_top: int = Param(
        0, ge=0, per_layer=False, description="Blended layers just below the top block."
    )
    transition_weight: float | list[float] = Param(
        0.5,
        per_layer=False,
        description=(
            "Weight of the language expert in the transition layers (the task expert gets 1 - weight); "
            "a list gives one weight per transition layer, bottom zone first, in layer order."
        ),
    )
    non_layer: Literal["task", "language", "average"] = Param(
        "task",
        per_layer=False,
        description="Source of the tensors outside the layers (embeddings, final norm, head).",
    )
    layer_map: list[Role | float] | None = Param(
        None,
        per_layer=False,
        description=(
            "General form, instead of bottom/top/transitions: one entry per "
            "layer, 'task', 'language' or the language expert's weight in [0, 1]."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> "LayerSwapParameters":
        weights = (
            self.transition_weight if isinstance(self.transition_weight, list) else [self.transition_weight]
        )
        if any(not 0.0 <= w <= 1.0 for w in weights):
            raise ValueError(f"transition_weight must lie in [0, 1], got {self.transition_weight}")
        if (
            isinstance(self.transition_weight, list)
            and len(weights) != self.transition_bottom + self.transition_top
        ):
            raise ValueError(
                f"transition_weight lists {len(weights)} weight(s) but "
                f"there are {self.transition_bottom + self.transition_top}"
                " transition layer(s) (transition_bottom + transition_top)"
            )
        if self.layer_map is not None:
            if self.bottom or self.top or self.transition_bottom or self.transition_top:
                raise ValueError(
                    "give either layer_map or bottom/top/transition_bottom/transition_top, not both"
                )
            bad = [w for w in self.layer_map if isinstance(w, float) and not 0.0 <= w <= 1.0]
            if bad:
                raise ValueError(f"layer_map weights must lie in [0, 1], got {bad[0]}")
        return self


class LayerSwapModelParameters(MethodParameters):
    role: Role | None = Param(
        None,
        per_layer=False,
        description="'task' or 'language'; by default models[0] is the task expert and models[1] the language expert.",
    )


def language_weights(params: LayerSwapParameters, layers: int) -> list[float]:
    """w(ℓ) for every layer: Algorithm 1's bottom / transition / middle / transition / top zones."""
    if params.layer_map is not None:
        if len(params.layer_map) != layers:
            raise RecipeError(
                f"layer_swap: layer_map has {len(params.layer_map)} entries but the models have {layers} layers."
            )
        return [1.0 if w == "language" else 0.0 if w == "task" else float(w) for w in params.layer_map]
    used = params.bottom + params.transition_bottom + params.transition_top + params.top
    if used > layers:
        raise RecipeError(
            "layer_swap: bottom + transition_bottom + transition_top "
            f"+ top = {params.bottom} + {params.transition_bottom}"
            f" + {params.transition_top} + {params.top} = {used}, more than the models' {layers} layers."
        )
    blend = (
        params.transition_weight
        if isinstance(params.transition_weight, list)
        else [params.transition_weight] * (params.transition_bottom + params.transition_top)
    )
    middle = layers - used
    return (
        [1.0] * params.bottom
        + [float(w) for w in blend[: params.transition_bottom]]
        + [0.0] * middle
        + [float(w) for w in blend[params.transition_bottom :]]
        + [1.0] * params.top
    )


def swap_parameters(params: dict[str, Any], weights: Sequence[float]) -> dict[str, Any]:
    """``params`` rewritten to give ``weights`` (the language weight per layer): bottom/top when the
    map is the paper's plain shape (language outside, task inside), else an explicit layer_map.
    Options that are not about the layer map (``non_layer``) are kept."""
    layout_keys = ("bottom", "top", "transition_bottom", "transition_top", "transition_weight", "layer_map")
    kept = {k: v for k, v in params.items() if k not in layout_keys}
    bottom = next((i for i, w in enumerate(weights) if w != 1.0), len(weights))
    top = next((i for i, w in enumerate(reversed(weights[bottom:])) if w != 1.0), len(weights) - bottom)
    if all(w == 0.0 for w in weights[bottom : len(weights) - top]):
        return {**kept, "bottom": bottom, "top": top}
    entries: list[Role | float] = [
        "language" if w == 1.0 else "task" if w == 0.0 else float(w) for w in weights
    ]
    return {**kept, "layer_map": entries}


def roles(model_params: Sequence[LayerSwapModelParameters]) -> tuple[int, int]:
    """(index of the task expert, index of the language expert) among the two models."""
    given = [p.role for p in model_params]
    if given == [None, None]:
        return 0, 1
    if sorted(str(r) for r in given) != ["language", "task"]:
        raise RecipeError(
            f"layer_swap: give one model role 'task' and the other role 'language' (or neither), got {given}."
        )
    return given.index("task"), given.index("language")


class LayerSwap(MergeMethod):
    name = "layer_swap"
    summary = (
        "Layer swapping: a language expert's bottom and top layers around a "
        "task expert's middle layers, with optional blended transition layers."
    )
    paper = "https://arxiv.org/abs/2410.01335"
    when_to_use = (
        "Two experts fine-tuned from one base, one on a task (math) in a high-resource language and "
        "one on generic data in a target language, when no task data exists in the target language: "
        "the language expert's changes sit mostly in the outer layers and the task expert's in the "
        "middle ones, so the outer layers can be swapped in. Check that pattern first with "
        "`workbench analyze BASE TASK LANG --suggest-swap TASK LANG`, which also proposes bottom/top. "
        "Exact semantics: [methods.md](../methods.md#layer_swap)."
    )
    Parameters = LayerSwapParameters
    ModelParameters = LayerSwapModelParameters
    base_model = "unused"
    min_models = 2
    max_models = 2
    mode = "elementwise"

    def check_plan(
        self, params: ParameterSet, model_params: Sequence[ParameterSet], layer_count: int
    ) -> None:
        self._layout(params.values, [p.values for p in model_params], layer_count)

    def prepare(self, ctx: PrepareContext) -> tuple[list[float], int, int]:
        return self._layout(
            ctx.params.values,
            [p.values for p in ctx.model_params],
            ctx.layer_count or layer_count(ctx.tensor_names, ctx.models[0].config()),
        )

    @staticmethod
    def _layout(
        params: LayerSwapParameters, model_params: Sequence[LayerSwapModelParameters], layers: int
    ) -> tuple[list[float], int, int]:
        """(language weight per layer, task model index, language model index)."""
        if layers == 0:
            raise RecipeError(
                "layer_swap: the models have no recognisable decoder layers (model.layers.N., transformer.h.N., ...)."
            )
        task, language = roles(model_params)
        return language_weights(params, layers), task, language

    @classmethod
    def layer_layout(
        cls, params: dict[str, Any], model_params: Sequence[dict[str, Any]], layers: int
    ) -> tuple[list[float], int, int]:
        """The layout the merge will use, from a recipe's raw values (the TUI's layer map, so that it
        never re-derives it)."""
        try:
            checked = LayerSwapParameters.model_validate(params)
            checked_models = [LayerSwapModelParameters.model_validate(p) for p in model_params]
        except ValidationError as exc:
            raise RecipeError(
                f"layer_swap: {exc.errors()[0]['msg'].removeprefix('Value error, ')}."
            ) from None
        return cls._layout(checked, checked_models, layers)

    @classmethod
    def with_layout(cls, params: dict[str, Any], weights: Sequence[float]) -> dict[str, Any]:
        """``params`` rewritten to give ``weights`` (an edited layer map), in this method's own format."""
        return swap_parameters(params, weights)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: LayerSwapParameters,
        model_params: list[LayerSwapModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        weights, task, language = ctx.state
        if ctx.layer_index is None:
            weight = {"task": 0.0, "language": 1.0, "average": 0.5}[params.non_layer]
        elif ctx.layer_index < len(weights):
            weight = weights[ctx.layer_index]
        else:
            raise RecipeError(
                f"layer_swap: tensor '{ctx.name}' is in layer {ctx.layer_index}, "
                f"but the models' config says {len(weights)} layers."
            )
        if weight == 0.0:
            return tensors[task].to(ctx.out_dtype)
        if weight == 1.0:
            return tensors[language].to(ctx.out_dtype)
        mixed = tensors[task].to(ctx.compute_dtype) * (1.0 - weight)
        return mixed.add_(tensors[language].to(ctx.compute_dtype), alpha=weight).to(ctx.out_dtype)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(LayerSwap)
