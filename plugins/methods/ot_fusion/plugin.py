"""Optimal-transport fusion (Imfeld et al., ICLR 2024): align the other models' neurons, heads and
residual stream to an anchor's, then average.

Independently trained networks compute the same functions with their units in another order, so a
plain average mixes unrelated units. ``prepare`` computes, per non-anchor model and in the order
the network computes, transport maps from the weights (read one layer at a time) or from
activations: the residual stream's first map from the embedding matrix (each hidden dimension is a
point whose coordinates are its values over the shared vocabulary); per layer one over attention
heads (heads move whole, so rotary embeddings stay intact; a query head's cost includes its
key/value group's, and the key/value map is the head map summed over groups, which keeps
grouped-query attention and QKᵀ consistent), one over the MLP's hidden units, and, unless the
residual policy is ``shared``, one per branch output with the stream's map after each residual
join mixed from the two (the paper's residual policies). ``apply`` maps each tensor into the
anchor's basis, W̃ = T_outᵀ W T_in with column-normalised (barycentric) maps, and takes the
weighted average.

Models may differ in hidden and intermediate width (heterogeneous fusion): the maps are then
rectangular (exact EMD by POT, or Sinkhorn) and every model is mapped into the anchor's widths.
Architectures are described in ``plugins/methods/ot_fusion/layouts.py`` (Llama-style decoders, GPT-2, BERT),
activations captured in ``plugins/methods/ot_fusion/activations.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import MemoryNeed, MergeMethod, ParameterSet, PrepareContext, TensorContext
from workbench_plugins.methods._weights import normalized
from workbench_plugins.methods.ot_fusion.alignment import (
    FusionState,
    ModelMaps,
    as_matrix,
    check_names,
    heads_map,
    inputs_aligned,
    joined,
    output_aligned,
    parts,
    weight_rows,
)
from workbench_plugins.methods.ot_fusion.parameters import (
    OTFusionModelParameters,
    OTFusionParameters,
)

if TYPE_CHECKING:  # torch (and POT) only load when a merge runs, not when plugins are listed
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench_plugins.methods.ot_fusion.activations import Activations
    from workbench_plugins.methods.ot_fusion.transport import Transport


class OTFusion(MergeMethod):
    name = "ot_fusion"
    summary = (
        "Optimal-transport fusion: align neurons, heads and the residual "
        "stream of independently trained models to an anchor, then average."
    )
    paper = "https://arxiv.org/abs/2310.05719"
    when_to_use = (
        "Models of one architecture trained from different initialisations (not fine-tunes of one base), "
        "whose units sit in different orders, so plain averaging destroys both. The anchor (models[0] unless "
        "'anchor' says otherwise) keeps its basis; the others are aligned to it. "
        "Use solver: emd for hard alignment (exact when the models differ by a "
        "permutation) and sinkhorn (the default, reg 0.06) for the soft alignment the paper found better for "
        "transformers. Exact semantics: [methods.md](../methods.md#ot_fusion)."
    )
    Parameters = OTFusionParameters
    ModelParameters = OTFusionModelParameters
    base_model = "unused"
    min_models = 2
    equal_shapes = False  # other widths are mapped into the anchor's

    def memory_needed(
        self,
        params: ParameterSet,
        model_params: Sequence[ParameterSet],
        tensors: Sequence[tuple[str, tuple[int, ...]]],
    ) -> MemoryNeed | None:
        """The transport maps kept for every aligned model: per layer an n x n map of the MLP's
        hidden units, and of the residual stream (one for the whole network with the 'shared'
        policy, four per layer otherwise), each a float32 plan with its column-normalised copy;
        doubled for the solvers' temporaries (measured: 370 MB at the peak of a merge whose maps
        take 192 MB)."""
        from workbench_plugins.methods.ot_fusion.layouts import detect

        shapes = dict(tensors)
        layout = detect(list(shapes))
        embedding = shapes.get(layout.embedding) or shapes.get(layout.prefix + layout.embedding)
        if embedding is None:
            return None
        mlp_width: dict[int, int] = {}  # layer -> hidden units of its MLP
        for name, shape in tensors:
            placed = layout.role(name)
            if placed is not None and placed[0] is not None and placed[1].out == ("mlp",) and len(shape) == 2:
                mlp_width[placed[0]] = shape[1] if placed[1].conv1d else shape[0]
        shared = params.values.resid_policy == "shared"
        stream_maps = 1 if shared else 4 * len(mlp_width) + 1
        entries = sum(width**2 for width in mlp_width.values()) + stream_maps * embedding[1] ** 2
        aligned = max(0, len(model_params) - 1)
        need = 2 * 2 * 4 * aligned * entries
        return MemoryNeed(
            need,
            f"the transport maps of {aligned} aligned model(s) (float32 plans "
            "and their normalised copies, doubled for the solvers' work)",
        )

    def prepare(self, ctx: PrepareContext) -> FusionState:
        from workbench_plugins.methods.ot_fusion.layouts import detect, dimensions

        params: OTFusionParameters = ctx.params.values
        if params.anchor >= len(ctx.models):
            raise RecipeError(
                f"ot_fusion: anchor = {params.anchor}, but there are only "
                f"{len(ctx.models)} models (0..{len(ctx.models) - 1})."
            )
        if params.resid_policy.startswith("weighted") and params.cost != "activations":
            raise RecipeError(
                f"ot_fusion: resid_policy '{params.resid_policy}' weighs by activations; it needs cost 'activations'."
            )
        anchor = ctx.models[params.anchor]
        layout = detect(list(ctx.tensor_names))
        for model in ctx.models:
            check_names(layout, model)
        shape = dimensions(anchor.config())
        widths = {tuple(model.info(name).shape for name in model.tensor_names()) for model in ctx.models}
        if params.anchor != 0 and len(widths) > 1:
            raise RecipeError(
                "ot_fusion: the output takes models[0]'s shapes, so with "
                "models of different widths list the anchor first (anchor: 0)."
            )
        state = FusionState(layout, shape[1], shape[2], shape[3], params.anchor, params.resid_policy, {})
        anchor_acts = batches = None
        if params.cost == "activations":
            from workbench_plugins.methods._data import input_batches
            from workbench_plugins.methods.ot_fusion.activations import capture

            if not params.data:
                raise RecipeError(
                    "ot_fusion: cost 'activations' needs data: "
                    "{evaluator: NAME, options: {...}} or {text: FILE, seq_len: N}."
                )
            batches = input_batches(params.data, params.samples, ctx.seed, anchor.path, ctx.registry)
            anchor_acts = capture(anchor.path, layout, batches, shape[1], shape[2])
        for index, model in enumerate(ctx.models):
            if index == params.anchor:
                continue
            if dimensions(model.config()) != shape:
                raise RecipeError(
                    f"ot_fusion: models[{index}] has {dimensions(model.config())} "
                    "(layers, heads, key/value heads, head dim) where the anchor has"
                    f" {shape}; heads move whole, so models may differ only in hidden "
                    "width (with the same heads and head dimension) and intermediate width."
                )
            state.maps[index] = self._maps(model, anchor, anchor_acts, batches, shape[0], state, params)
        return state

    @staticmethod
    def _maps(
        model: "CheckpointReader",
        anchor: "CheckpointReader",
        anchor_acts: "Activations | None",
        batches: Any,
        layers: int,
        state: FusionState,
        params: OTFusionParameters,
    ) -> ModelMaps:
        """The maps of one model into the anchor's basis, layer by layer in the order the network
        computes (each sublayer's inputs are aligned by the maps before it), from weights or
        (with ``anchor_acts``) activations."""
        from workbench_plugins.methods.ot_fusion.transport import ground_cost, transport

        def solve(a: "torch.Tensor", b: "torch.Tensor") -> Transport:
            return transport(ground_cost(a, b), params.solver, params.reg)

        shared = state.policy == "shared"
        acts = None
        if anchor_acts is not None:
            from workbench_plugins.methods.ot_fusion.activations import capture

            acts = capture(model.path, state.layout, batches, state.heads, state.kv_heads)
            stream = solve(acts.resid, anchor_acts.resid) if shared else solve(acts.embed, anchor_acts.embed)
        else:
            from workbench_plugins.methods.ot_fusion.layouts import embedding_name

            embedding = embedding_name(state.layout, model.tensor_names())
            stream = solve(model.read(embedding).T, anchor.read(embedding).T)
        maps = ModelMaps([stream])

        def join(layer: int, branch_space: str, resid_key: str) -> None:
            """The branch's map (unless shared) and the stream's map after the join."""
            resid = maps.stream[-1]
            if shared:
                branch = resid
            elif acts is not None:
                branch = solve(getattr(acts, branch_space)[layer], getattr(anchor_acts, branch_space)[layer])
            else:
                [rows_a], [rows_b] = (
                    weight_rows(reader, layer, (branch_space,), m, state)
                    for reader, m in ((model, maps), (anchor, None))
                )
                branch = solve(rows_a, rows_b)
            getattr(maps, branch_space)[layer] = branch
            magnitudes = None
            if anchor_acts is not None:
                magnitudes = (
                    anchor_acts.magnitude[f"{resid_key}.{layer}"],
                    anchor_acts.magnitude[f"{'attn' if branch_space == 'attn_out' else 'mlp'}.{layer}"],
                )
            maps.stream.append(joined(resid, branch, state.policy, magnitudes))

        for layer in range(layers):
            if acts is not None:
                qa, qb, kva, kvb = (
                    acts.query[layer],
                    anchor_acts.query[layer],
                    acts.key_value[layer],
                    anchor_acts.key_value[layer],
                )  # type: ignore[union-attr]
            else:
                (qa, kva), (qb, kvb) = (
                    weight_rows(reader, layer, ("q", "kv"), m, state)
                    for reader, m in ((model, maps), (anchor, None))
                )
            maps.heads[layer], maps.kv[layer] = heads_map(
                qa, qb, kva, kvb, state.heads, state.kv_heads, params
            )
            join(layer, "attn_out", "in")
            if acts is not None:
                maps.mlp[layer] = solve(acts.mlp[layer], anchor_acts.mlp[layer])  # type: ignore[union-attr]
            else:
                [ma], [mb] = (
                    weight_rows(reader, layer, ("mlp",), m, state)
                    for reader, m in ((model, maps), (anchor, None))
                )
                maps.mlp[layer] = solve(ma, mb)
            join(layer, "mlp_out", "mid")
        return maps

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: OTFusionParameters,
        model_params: list[OTFusionModelParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":  # type: ignore[override]
        state: FusionState = ctx.state
        weights = normalized([p.weight for p in model_params], self.name, ctx.name)
        fused: "torch.Tensor | None" = None
        for index, (tensor, weight) in enumerate(zip(tensors, weights)):
            if weight == 0.0:
                continue
            term = tensor.to(ctx.compute_dtype)
            if index != state.anchor:
                term = self._align(term, ctx.name, state.maps[index], state)
            fused = term.mul_(weight) if fused is None else fused.add_(term, alpha=weight)
        assert fused is not None  # normalized() refuses weights that sum to 0
        return fused.to(ctx.out_dtype)

    @staticmethod
    def _align(weight: "torch.Tensor", name: str, maps: ModelMaps, state: FusionState) -> "torch.Tensor":
        """The tensor in the anchor's basis: W̃ = T_outᵀ · W · T_in, space by space."""
        import torch

        layer, role = state.layout.role(name)  # type: ignore[misc]  # prepare checked every float tensor
        rows = [
            output_aligned(part, space, layer, maps, state)
            for space, part in parts(as_matrix(weight, role), role, state)
        ]
        matrix = inputs_aligned(torch.cat(rows) if len(rows) > 1 else rows[0], role, layer, maps, state)
        if weight.ndim == 1:
            return matrix.reshape(-1)
        return matrix.T.contiguous() if role.conv1d else matrix

    def write_extras(self, state: FusionState, folder: Path) -> list[Path]:
        """``ot_fusion/maps.safetensors`` (every plan, float32) and ``ot_fusion/report.json`` (solver
        and transport cost of each), in a subfolder so that no reader takes the maps for weights."""
        import torch
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        report: dict[str, Any] = {}
        for index, maps in state.maps.items():
            entries = (
                {"resid": maps.stream[0]}
                | {f"layers.{i}.heads": t for i, t in maps.heads.items()}
                | {f"layers.{i}.mlp": t for i, t in maps.mlp.items()}
            )
            if state.policy != "shared":  # the stream's map after every join, and the branches'
                for i in maps.attn_out:
                    entries |= {
                        f"layers.{i}.attn_out": maps.attn_out[i],
                        f"layers.{i}.resid_mid": maps.stream[2 * i + 1],
                    }
                    entries |= {
                        f"layers.{i}.mlp_out": maps.mlp_out[i],
                        f"layers.{i}.resid_out": maps.stream[2 * i + 2],
                    }
            for key, plan in entries.items():
                tensors[f"models.{index}.{key}"] = torch.tensor(
                    plan.plan, dtype=torch.float32
                )  # a copy: maps may be shared (only_resid, no_resid)
                report[f"models.{index}.{key}"] = {
                    "solver": plan.solver,
                    "cost": plan.cost,
                    "shape": list(plan.plan.shape),
                }
        extras = folder / "ot_fusion"
        extras.mkdir()
        save_file(tensors, str(extras / "maps.safetensors"))
        (extras / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return [extras]


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(OTFusion)
