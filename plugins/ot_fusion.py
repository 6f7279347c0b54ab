"""Optimal-transport fusion (Imfeld et al., ICLR 2024): align the other models' neurons, heads and
residual stream to an anchor's, then average.

Independently trained networks compute the same functions with their units in another order, so a
plain average mixes unrelated units. ``prepare`` computes, per non-anchor model, transport maps
from the weights (read one layer at a time): one for the residual stream, from the embedding
matrix (each hidden dimension is a point whose coordinates are its values over the vocabulary,
which the models share), and per layer one over attention heads (heads move whole, so rotary
embeddings stay intact; a query head's cost includes its key/value group's, and the key/value
map is the head map summed over groups, which keeps grouped-query attention and QKᵀ consistent)
and one over the MLP's hidden units (the rows of every tensor that outputs to them, e.g. gate and
up together; biases included). ``apply`` maps each tensor into
the anchor's basis, W̃ = T_outᵀ W T_in with column-normalised (barycentric) maps, and takes the
weighted average. The residual stream uses one map throughout, which is exact when the models
differ by a consistent permutation (the residual connections force one basis).

Models may differ in hidden and intermediate width (heterogeneous fusion): the maps are then
rectangular (exact EMD by POT, or Sinkhorn) and every model is mapped into the anchor's widths.
Costs come from the weights (no data) or from activations on a bounded sample of inputs
(``plugins/_activations.py``, Llama-style models only so far). Architectures are described in
``plugins/_ot_layouts.py``: Llama-style decoders, GPT-2 and BERT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from workbench import hookimpl
from workbench.errors import RecipeError
from workbench.method import MergeMethod, MethodParameters, Param, PrepareContext, TensorContext
from workbench_plugins._weights import normalized

if TYPE_CHECKING:  # torch (and POT) only load when a merge runs, not when plugins are listed
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench_plugins._activations import Activations
    from workbench_plugins._ot_layouts import Layout, Role
    from workbench_plugins._transport import Transport

class OTFusionParameters(MethodParameters):
    solver: Literal["emd", "sinkhorn"] = Param("sinkhorn", per_layer=False, description="'emd': exact, hard alignment (an assignment solver for square problems); 'sinkhorn': entropic, soft alignment (the paper's default for transformers).")
    reg: float = Param(0.06, gt=0.0, per_layer=False, description="Sinkhorn regularisation on the max-normalised cost (the paper's best for weight-based costs: 0.06).")
    cost: Literal["weights", "activations"] = Param("weights", per_layer=False, description="Ground cost between units: from their weights (no data needed) or from their activations on 'data'.")
    data: dict[str, Any] | None = Param(None, per_layer=False, description="Inputs for cost 'activations': {evaluator: NAME, options: {...}} (the evaluator's data batches) or {text: FILE, seq_len: N} (cut with the anchor's tokenizer).")
    samples: int = Param(64, ge=1, per_layer=False, description="Sequences run through each model for cost 'activations' (bounds time and memory).")
    anchor: int = Param(0, ge=0, per_layer=False, description="Index of the model the others are aligned to (with models of different widths it must be 0: the output takes models[0]'s shapes).")


class OTFusionModelParameters(MethodParameters):
    weight: float = Param(1.0, per_layer=False, description="Fusion weight of this model (the weights are normalised to sum 1).")


@dataclass
class ModelMaps:
    """Transport maps of one model into the anchor's basis."""

    resid: Transport
    heads: dict[int, Transport] = field(default_factory=dict)  # layer -> query-head map
    kv: dict[int, "torch.Tensor"] = field(default_factory=dict)  # layer -> barycentric key/value-head map
    mlp: dict[int, Transport] = field(default_factory=dict)  # layer -> hidden-unit map


@dataclass
class FusionState:
    layout: "Layout"
    heads: int
    kv_heads: int
    head_dim: int
    anchor: int
    maps: dict[int, ModelMaps]  # model index (not the anchor) -> maps


def _check_names(layout: "Layout", reader: "CheckpointReader") -> None:
    for name in reader.tensor_names():
        if reader.info(name).is_float and layout.role(name) is None:
            raise RecipeError(f"ot_fusion: tensor '{name}' has no place in the {layout.name} layout it knows; it cannot be aligned.")


def _heads_map(q_a: "torch.Tensor", q_b: "torch.Tensor", kv_a: "torch.Tensor", kv_b: "torch.Tensor", heads: int, kv_heads: int, params: OTFusionParameters) -> tuple[Transport, "torch.Tensor"]:
    """Query-head plan whose cost adds the heads' key/value groups' cost, and the group map it implies."""
    from workbench_plugins._transport import Transport, ground_cost, transport

    group = heads // kv_heads
    cost_q = ground_cost(q_a.reshape(heads, -1), q_b.reshape(heads, -1))
    cost_kv = ground_cost(kv_a.reshape(kv_heads, -1), kv_b.reshape(kv_heads, -1))
    owner = [h // group for h in range(heads)]
    cost = cost_q + cost_kv[owner][:, owner]
    plan = transport(cost, params.solver, params.reg)
    summed = plan.plan.reshape(kv_heads, group, kv_heads, group).sum(axis=(1, 3))
    kv_plan = Transport(summed, plan.solver, plan.cost)
    return plan, kv_plan.barycentric


LayerFeatures = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]


def _as_matrix(weight: "torch.Tensor", role: "Role") -> "torch.Tensor":
    """(out, in) for a matrix whatever its storage; (out, 1) for a vector."""
    if weight.ndim == 1:
        return weight.reshape(-1, 1)
    return weight.T if role.conv1d else weight


def _parts(matrix: "torch.Tensor", role: "Role", state: FusionState) -> list[tuple[str | None, "torch.Tensor"]]:
    """The output axis cut into its spaces (one part unless the tensor is fused, like GPT-2's c_attn)."""
    if len(role.out) == 1:
        return [(role.out[0], matrix)]
    sizes = {"q": state.heads * state.head_dim, "kv": state.kv_heads * state.head_dim}
    return list(zip(role.out, matrix.split([sizes[space] for space in role.out])))  # type: ignore[index]


def _weight_features(a: "CheckpointReader", b: "CheckpointReader", layer: int, resid: "torch.Tensor", state: FusionState) -> LayerFeatures:
    """(query heads, key/value heads, MLP units) of model a then anchor b, as the rows of every
    tensor whose output lies in those spaces (biases included); a's residual inputs are first
    mapped into the anchor's basis."""
    groups = {"q": state.heads, "kv": state.kv_heads, "mlp": None}
    features = []
    for reader in (a, b):
        rows: dict[str, list["torch.Tensor"]] = {"q": [], "kv": [], "mlp": []}
        for name in reader.tensor_names():
            placed = state.layout.role(name)
            if placed is None or placed[0] != layer or not reader.info(name).is_float:
                continue
            role = placed[1]
            if not any(space in rows for space in role.out):
                continue  # outputs to the residual stream (o_proj, down_proj, norms): not a feature here
            matrix = _as_matrix(reader.read(name).float(), role)  # float32 features: ground_cost works in float64 per block
            if reader is a and role.inp == "resid":
                matrix = matrix @ resid
            for space, part in _parts(matrix, role, state):
                if space in rows:
                    count = groups[space]
                    rows[space].append(part.reshape(count, -1) if count else part)
        features.append(tuple(torch_cat(rows[space]) for space in ("q", "kv", "mlp")))
    (qa, kva, ma), (qb, kvb, mb) = features
    return qa, qb, kva, kvb, ma, mb


def _layer_maps(features: LayerFeatures, state: FusionState, params: OTFusionParameters) -> tuple["Transport", "torch.Tensor", "Transport"]:
    from workbench_plugins._transport import ground_cost, transport

    qa, qb, kva, kvb, ma, mb = features
    heads, kv_map = _heads_map(qa, qb, kva, kvb, state.heads, state.kv_heads, params)
    return heads, kv_map, transport(ground_cost(ma, mb), params.solver, params.reg)


def torch_cat(parts: list["torch.Tensor"]) -> "torch.Tensor":
    """Concatenate per-point features (rows stay points)."""
    import torch

    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def _by_heads(weight: "torch.Tensor", plan: "torch.Tensor", heads: int, columns: bool) -> "torch.Tensor":
    """Move whole heads: rows (``columns=False``) or columns grouped per head, by a barycentric map."""
    import torch

    plan = plan.to(weight.dtype)
    if columns:
        return torch.einsum("dhj,hk->dkj", weight.reshape(weight.shape[0], heads, -1), plan).reshape(weight.shape[0], -1)
    return torch.einsum("hjd,hk->kjd", weight.reshape(heads, -1, weight.shape[-1]), plan).reshape(-1, weight.shape[-1])


class OTFusion(MergeMethod):
    name = "ot_fusion"
    summary = "Optimal-transport fusion: align neurons, heads and the residual stream of independently trained models to an anchor, then average."
    paper = "https://arxiv.org/abs/2310.05719"
    when_to_use = (
        "Models of one architecture trained from different initialisations (not fine-tunes of one base), "
        "whose units sit in different orders, so plain averaging destroys both. The anchor (models[0] unless "
        "'anchor' says otherwise) keeps its basis; the others are aligned to it. Use solver: emd for hard alignment (exact when the models differ by a "
        "permutation) and sinkhorn (the default, reg 0.06) for the soft alignment the paper found better for "
        "transformers. Exact semantics: [methods.md](../methods.md#ot_fusion)."
    )
    Parameters = OTFusionParameters
    ModelParameters = OTFusionModelParameters
    base_model = "unused"
    min_models = 2
    equal_shapes = False  # other widths are mapped into the anchor's

    def prepare(self, ctx: PrepareContext) -> FusionState:
        from workbench_plugins._ot_layouts import detect, dimensions

        params = OTFusionParameters.model_validate(ctx.params)
        if params.anchor >= len(ctx.models):
            raise RecipeError(f"ot_fusion: anchor = {params.anchor}, but there are only {len(ctx.models)} models (0..{len(ctx.models) - 1}).")
        anchor = ctx.models[params.anchor]
        layout = detect(list(ctx.tensor_names))
        for model in ctx.models:
            _check_names(layout, model)
        shape = dimensions(anchor.config())
        widths = {tuple(model.info(name).shape for name in model.tensor_names()) for model in ctx.models}
        if params.anchor != 0 and len(widths) > 1:
            raise RecipeError("ot_fusion: the output takes models[0]'s shapes, so with models of different widths list the anchor first (anchor: 0).")
        state = FusionState(layout, shape[1], shape[2], shape[3], params.anchor, {})
        anchor_acts = batches = None
        if params.cost == "activations":
            if layout.name != "llama":
                raise RecipeError(f"ot_fusion: cost 'activations' supports Llama-style models so far, not {layout.name}; use cost 'weights'.")
            from workbench_plugins._activations import capture, input_batches

            batches = input_batches(params.data or {}, params.samples, ctx.seed, anchor.path, ctx.extra["registry"])
            anchor_acts = capture(anchor.path, batches, *shape[1:])
        for index, model in enumerate(ctx.models):
            if index == params.anchor:
                continue
            if dimensions(model.config()) != shape:
                raise RecipeError(
                    f"ot_fusion: models[{index}] has {dimensions(model.config())} (layers, heads, key/value heads, head dim) where the anchor has"
                    f" {shape}; models may differ in hidden and intermediate width only."
                )
            state.maps[index] = self._maps(model, anchor, anchor_acts, batches, shape[0], state, params)
        return state

    @staticmethod
    def _maps(model: "CheckpointReader", anchor: "CheckpointReader", anchor_acts: "Activations | None", batches: Any, layers: int, state: FusionState, params: OTFusionParameters) -> ModelMaps:
        """The maps of one model into the anchor's basis, from weights or (with ``anchor_acts``) activations."""
        from workbench_plugins._transport import ground_cost, transport

        if anchor_acts is not None:
            from workbench_plugins._activations import capture

            acts = capture(model.path, batches, state.heads, state.kv_heads, state.head_dim)
            resid = transport(ground_cost(acts.resid, anchor_acts.resid), params.solver, params.reg)
        else:
            from workbench_plugins._ot_layouts import embedding_name

            embedding = embedding_name(state.layout, model.tensor_names())
            embed_a, embed_b = model.read(embedding), anchor.read(embedding)
            resid = transport(ground_cost(embed_a.T, embed_b.T), params.solver, params.reg)
        maps = ModelMaps(resid)
        resid_map = resid.barycentric.float()
        for layer in range(layers):
            if anchor_acts is not None:
                features = (acts.query[layer], anchor_acts.query[layer], acts.key_value[layer], anchor_acts.key_value[layer], acts.mlp[layer], anchor_acts.mlp[layer])
            else:
                features = _weight_features(model, anchor, layer, resid_map, state)
            maps.heads[layer], maps.kv[layer], maps.mlp[layer] = _layer_maps(features, state, params)
        return maps

    def apply(self, tensors: list["torch.Tensor"], base: "torch.Tensor | None", params: OTFusionParameters, model_params: list[OTFusionModelParameters], ctx: TensorContext) -> "torch.Tensor":  # type: ignore[override]
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
        resid = maps.resid.barycentric.to(weight.dtype)
        mlp = maps.mlp[layer].barycentric.to(weight.dtype) if layer is not None else None
        heads = maps.heads[layer].barycentric if layer is not None else None
        matrix = _as_matrix(weight, role)
        rows = []
        for space, part in _parts(matrix, role, state):
            if space == "resid":
                part = resid.T @ part
            elif space == "q":
                part = _by_heads(part, heads, state.heads, columns=False)  # type: ignore[arg-type]
            elif space == "kv":
                part = _by_heads(part, maps.kv[layer], state.kv_heads, columns=False)  # type: ignore[index]
            elif space == "mlp":
                part = mlp.T @ part  # type: ignore[union-attr]
            rows.append(part)
        matrix = torch.cat(rows) if len(rows) > 1 else rows[0]
        if role.inp == "resid":
            matrix = matrix @ resid
        elif role.inp == "heads":
            matrix = _by_heads(matrix, heads, state.heads, columns=True)  # type: ignore[arg-type]
        elif role.inp == "mlp":
            matrix = matrix @ mlp
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
            entries = {"resid": maps.resid} | {f"layers.{i}.heads": t for i, t in maps.heads.items()} | {f"layers.{i}.mlp": t for i, t in maps.mlp.items()}
            for key, plan in entries.items():
                tensors[f"models.{index}.{key}"] = torch.from_numpy(plan.plan).float().contiguous()
                report[f"models.{index}.{key}"] = {"solver": plan.solver, "cost": plan.cost, "shape": list(plan.plan.shape)}
        extras = folder / "ot_fusion"
        extras.mkdir()
        save_file(tensors, str(extras / "maps.safetensors"))
        (extras / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return [extras]


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(OTFusion)
