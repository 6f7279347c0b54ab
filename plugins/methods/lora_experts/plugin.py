"""``lora_experts``: a layer-wise mixture of LoRA experts (MoLA, Gao et al. 2024) built from adapters.

Each model of the recipe is one LoRA adapter on the recipe's base (``BASE+ADAPTER`` or an adapter
folder). Layer l gets E_l expert slots (an allocation pattern such as ``2-4-6-8``, a list, all
adapters, or by change magnitude); with fewer slots than adapters the adapters that change the
layer most keep their own slot and the others are dropped (``overflow: pick``) or summed into the
last slot (``merge``: ΔW added, refactored by SVD at the sum of their ranks, so nothing is lost).
Each targeted linear layer gets its own router (MoLA: routers per module), initialised from the
inputs that each adapter's task prompts produce there (``prompts``), randomly as in MoLA's
training (``random``), or from prompts then trained with the experts frozen (``trained``).

The output is the base weights plus ``mola/`` (experts, routers, config), which
``workbench.modeling.mola`` runs and ``workbench eval`` loads; ``collapse: true`` instead writes a
dense model, W₀ + Σ_e ḡ_e ΔW_e with ḡ_e the expert's mean routing weight on the prompts (1/E
without data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, MethodParameters, Param, ParameterSet, PrepareContext, TensorContext

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint.lora_adapter import LoraAdapter
    from workbench.modeling.mola import ExpertSet


class LoraExpertsParameters(MethodParameters):
    allocation: str | list[int] = Param(
        "uniform",
        per_layer=False,
        description=(
            "Experts per layer: a pattern over equal groups of layers ('2-4-6-8', '8-6-4-2', "
            "'5-5-5-5'), one count per layer, 'uniform' (every adapter in every layer) or "
            "'magnitude' (the adapters that change the layer at least magnitude_share of "
            "their most-changed layer). Counts above the number of adapters are capped at it."
        ),
    )
    top_k: int = Param(
        2,
        ge=1,
        per_layer=False,
        description=(
            "Experts each token uses per module (capped at the layer's "
            "expert count); their weights are renormalised to sum 1."
        ),
    )
    overflow: Literal["pick", "merge"] = Param(
        "pick",
        per_layer=False,
        description=(
            "With fewer slots than adapters: 'pick' keeps the adapters that change the layer most; "
            "'merge' keeps all but the last slot that way and sums the rest's ΔW into the last."
        ),
    )
    router: Literal["prompts", "random", "trained"] = Param(
        "prompts",
        per_layer=False,
        description=(
            "Router initialisation: from each adapter's task prompts (each model's 'data'), random (kaiming "
            "uniform, as MoLA trains from), or from prompts and then trained with the experts frozen."
        ),
    )
    router_scale: float = Param(
        4.0,
        gt=0.0,
        per_layer=False,
        description=(
            "Prompt-initialised routers: the logit of a token "
            "one standard deviation along an expert's direction."
        ),
    )
    router_steps: int = Param(
        50, ge=1, per_layer=False, description="Optimizer steps of router training ('trained')."
    )
    router_lr: float = Param(0.01, gt=0.0, per_layer=False, description="Learning rate of router training.")
    samples: int = Param(64, ge=1, per_layer=False, description="Sequences per adapter read from its data.")
    magnitude_share: float = Param(
        0.5,
        gt=0.0,
        le=1.0,
        per_layer=False,
        description=(
            "allocation 'magnitude': the share of an adapter's largest "
            "per-layer change a layer needs for the adapter to get a slot there."
        ),
    )
    collapse: bool = Param(
        False,
        per_layer=False,
        description="Write a dense model (W + Σ mean gate · ΔW) instead of experts and routers.",
    )


class LoraExpertsModelParameters(MethodParameters):
    data: dict[str, Any] | None = Param(
        None,
        per_layer=False,
        description=(
            "This adapter's task prompts, for routers from prompts: "
            "{evaluator: NAME, options: {...}} or {text: FILE, seq_len: N}."
        ),
    )


@dataclass
class ExpertsState:
    experts: dict[str, "ExpertSet"]  # weight name -> experts of that module
    groups: dict[int, list[list[int]]]  # layer -> adapter indices behind each expert
    mean_gates: dict[str, "torch.Tensor"] = field(default_factory=dict)  # weight name -> [E]
    config: dict[str, Any] = field(default_factory=dict)
    collapse: bool = False


def _adapters(ctx: PrepareContext) -> list["LoraAdapter"]:
    from workbench.checkpoint.adapted import AdaptedReader

    found = []
    for i, model in enumerate(ctx.models):
        if not isinstance(model, AdaptedReader) or len(model.adapters) != 1:
            raise RecipeError(
                f"lora_experts: models[{i}] ({model.path}) is not one "
                "LoRA adapter; give BASE+ADAPTER or an adapter folder."
            )
        found.append(model.adapters[0])
    return found


def _norm(adapter: "LoraAdapter", name: str) -> float:
    """‖s · B A‖_F without forming B A: ‖BA‖_F² = tr((BᵀB)(AAᵀ))."""
    factors = adapter.factors.get(name)
    if factors is None:
        return 0.0
    a, b = factors.a.double(), factors.b.double()
    return abs(factors.scale) * math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def _counts(params: LoraExpertsParameters, layers: int, change: list[list[float]]) -> list[int]:
    from workbench.modeling.allocation import per_layer

    n = len(change)
    if params.allocation == "uniform":
        return [n] * layers
    if params.allocation == "magnitude":
        return [
            max(1, sum(change[i][layer] >= params.magnitude_share * max(change[i]) > 0 for i in range(n)))
            for layer in range(layers)
        ]
    return [min(count, n) for count in per_layer(params.allocation, layers)]


def _groups(count: int, change: list[float], overflow: str) -> list[list[int]]:
    """The adapters behind each of a layer's ``count`` experts (most-changing first)."""
    ranked = sorted(range(len(change)), key=lambda i: (-change[i], i))
    if count >= len(ranked):
        return [[i] for i in sorted(ranked)]
    if overflow == "pick":
        return [[i] for i in sorted(ranked[:count])]
    return [[i] for i in sorted(ranked[: count - 1])] + [sorted(ranked[count - 1 :])]


def _expert(
    adapters: list["LoraAdapter"], group: list[int], name: str, shape: tuple[int, ...]
) -> tuple["torch.Tensor", "torch.Tensor", float]:
    """(A, B, scale) of one expert: an adapter's own factors, or a group's summed ΔW refactored."""
    import torch

    from workbench.modeling.lowrank import lowrank

    present = [adapters[i].factors[name] for i in group if name in adapters[i].factors]
    if not present:  # no adapter of the group changes this module: an expert that adds nothing
        return torch.zeros(1, shape[1]), torch.zeros(shape[0], 1), 1.0
    if len(present) == 1:
        return present[0].a.float(), present[0].b.float(), present[0].scale
    a, b, _ = lowrank(sum(f.delta() for f in present), sum(f.rank for f in present))
    return a, b, 1.0


class LoraExperts(MergeMethod):
    name = "lora_experts"
    summary = (
        "Layer-wise mixture of LoRA experts (MoLA) from N adapters: "
        "per-layer expert counts, top-k routers per module."
    )
    paper = "https://arxiv.org/abs/2402.08562"
    when_to_use = (
        "Several LoRA adapters of one base, each good at its own task, where one merged adapter loses too much: "
        "every token picks its top-k experts per module instead of all adapters being averaged. MoLA found more "
        "experts in higher layers (2-4-6-8) better than the same number spread evenly. The output needs the "
        "runtime (workbench.modeling.mola; `workbench eval` loads it); `collapse: true` gives a plain dense model. "
        "To train experts and routers together from scratch, use `workbench lora mola-train`. "
        "Details: [lora.md](../lora.md#lora_experts)."
    )
    Parameters = LoraExpertsParameters
    ModelParameters = LoraExpertsModelParameters
    base_model = "required"
    min_models = 1

    def check_plan(
        self, params: ParameterSet, model_params: Sequence[ParameterSet], layer_count: int
    ) -> None:
        from workbench.modeling.allocation import per_layer

        options: LoraExpertsParameters = params.values
        if options.allocation not in ("uniform", "magnitude"):
            per_layer(options.allocation, layer_count, "lora_experts: allocation")
        if options.router == "trained" and options.top_k < 2:
            raise RecipeError(
                "lora_experts: router 'trained' needs top_k >= 2: with one expert per "
                "token its renormalised gate is always 1 and gives the router no gradient."
            )
        if options.router in ("prompts", "trained"):
            missing = [i for i, p in enumerate(model_params) if not p.values.data]
            if missing:
                raise RecipeError(
                    f"lora_experts: router '{options.router}' needs each "
                    f"adapter's task prompts; models[{missing[0]}] has no 'data' "
                    "({evaluator: NAME} or {text: FILE, seq_len: N}); or use router: random."
                )

    def prepare(self, ctx: PrepareContext) -> ExpertsState:
        import torch

        from workbench import architecture
        from workbench.method import tensor_seed
        from workbench.modeling.mola import stack, wrap

        params: LoraExpertsParameters = ctx.params.values
        adapters = _adapters(ctx)
        assert ctx.base is not None
        layers = architecture.layer_count(ctx.tensor_names, ctx.base.config())
        order = {name: i for i, name in enumerate(ctx.tensor_names)}
        targets = sorted({name for adapter in adapters for name in adapter.factors}, key=order.__getitem__)
        by_layer: dict[int, list[str]] = {}
        for name in targets:
            by_layer.setdefault(architecture.place(name).layer_index, []).append(name)  # type: ignore[arg-type]
        if None in by_layer:
            raise RecipeError(
                f"lora_experts: adapters change '{by_layer[None][0]}', "
                "outside the transformer layers; experts are per layer."
            )  # type: ignore[index]
        change = [
            [sum(_norm(adapter, name) for name in by_layer.get(layer, [])) for layer in range(layers)]
            for adapter in adapters
        ]
        counts = _counts(params, layers, change)
        groups = {
            layer: _groups(counts[layer], [c[layer] for c in change], params.overflow) for layer in by_layer
        }
        experts: dict[str, ExpertSet] = {}
        for layer, names in by_layer.items():
            top_k = min(params.top_k, len(groups[layer]))
            for name in names:
                shape = ctx.base.info(name).shape
                factors = [_expert(adapters, group, name, shape) for group in groups[layer]]
                router = torch.empty(len(factors), shape[1])
                torch.nn.init.kaiming_uniform_(
                    router,
                    a=math.sqrt(5),
                    generator=torch.Generator().manual_seed(tensor_seed(ctx.seed, name)),
                )
                experts[name] = stack(factors, router, top_k)
        state = ExpertsState(experts, groups, collapse=params.collapse)
        if params.router != "random":
            from workbench_plugins.methods.lora_experts.routing import (
                by_module,
                load_base,
                mean_gates,
                route_from_prompts,
                train_routers,
            )

            model, batches = load_base(ctx.base.path), self._prompt_batches(ctx, params)
            route_from_prompts(model, experts, groups, batches, params.router_scale)
            wrapped = wrap(model, by_module(experts))
            if params.router == "trained":
                train_routers(
                    model, wrapped, experts, batches, params.router_steps, params.router_lr, ctx.seed
                )
            if params.collapse:  # only collapse uses the mean gates
                state.mean_gates = mean_gates(model.eval(), wrapped, batches)
        state.config = {
            "source": "lora_experts",
            "adapters": [str(a.path) for a in adapters],
            "allocation": {
                "requested": params.allocation,
                "per_layer": [len(groups.get(layer, [])) for layer in range(layers)],
            },
            "experts_per_layer": {
                str(layer): [[str(adapters[i].path.name) for i in group] for group in g]
                for layer, g in sorted(groups.items())
            },
            "router": params.router,
            "parameters": sum(int(e.a.numel() + e.b.numel() + e.router.numel()) for e in experts.values()),
        }
        return state

    @staticmethod
    def _prompt_batches(
        ctx: PrepareContext, params: LoraExpertsParameters
    ) -> list[list[dict[str, "torch.Tensor"]]]:
        from workbench_plugins.methods._data import input_batches

        assert ctx.base is not None
        return [
            input_batches(
                p.values.data, params.samples, ctx.seed, ctx.base.path, ctx.registry, who="lora_experts"
            )
            for p in ctx.model_params
        ]

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: MethodParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":
        state: ExpertsState = ctx.state
        assert base is not None
        found = state.experts.get(ctx.name)
        if not state.collapse or found is None:
            return base
        from workbench_kernels.lora_delta import lora_delta_add

        weight = base
        gates = state.mean_gates.get(ctx.name)
        for e in range(found.count):  # W += ḡ_e s_e B_e A_e, in float32, stored in the compute dtype
            share = float(gates[e]) if gates is not None else 1.0 / found.count
            weight = lora_delta_add(
                weight, found.b[e], found.a[e], share * float(found.scale[e]), out_dtype=ctx.compute_dtype
            )
        return weight.to(ctx.compute_dtype)

    def write_extras(self, state: ExpertsState, folder: Path) -> list[Path]:
        if state.collapse:
            return []
        from workbench.modeling.mola import save_experts
        from workbench_plugins.methods.lora_experts.routing import by_module

        return [save_experts(folder, by_module(state.experts), state.config)]


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(LoraExperts)
