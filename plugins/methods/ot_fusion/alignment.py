"""How ``ot_fusion`` applies its transport maps: each aligned model's maps (``ModelMaps``), the state
``prepare`` hands to ``apply`` (``FusionState``), and the helpers that permute a tensor's rows,
columns and heads into the anchor's basis before averaging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.errors import RecipeError
from workbench_plugins.methods.ot_fusion.parameters import OTFusionParameters, ResidPolicy

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench_plugins.methods.ot_fusion.layouts import Layout, Role
    from workbench_plugins.methods.ot_fusion.transport import Transport


@dataclass
class ModelMaps:
    """Transport maps of one model into the anchor's basis.

    ``stream`` holds the residual stream's map at every position: 2·l entering layer l, 2·l + 1
    after its attention's residual join, 2·l + 2 leaving it (the last one: leaving the network).
    With the ``shared`` policy every entry, and every branch map, is the same object."""

    stream: list[Transport]
    heads: dict[int, Transport] = field(default_factory=dict)  # layer -> query-head map
    kv: dict[int, "torch.Tensor"] = field(default_factory=dict)  # layer -> barycentric key/value-head map
    mlp: dict[int, Transport] = field(default_factory=dict)  # layer -> hidden-unit map
    attn_out: dict[int, Transport] = field(default_factory=dict)  # layer -> attention-output map
    mlp_out: dict[int, Transport] = field(default_factory=dict)  # layer -> MLP-output map

    def of(self, space: str, layer: int | None) -> Transport:
        """The map of a residual-like or MLP space (not the head spaces, which move whole heads)."""
        if space == "embed":
            return self.stream[0]
        if space == "final":
            return self.stream[-1]
        assert layer is not None, space
        position = {"resid_in": 2 * layer, "resid_mid": 2 * layer + 1, "resid_out": 2 * layer + 2}.get(space)
        if position is not None:
            return self.stream[position]
        return {"attn_out": self.attn_out, "mlp_out": self.mlp_out, "mlp": self.mlp}[space][layer]


@dataclass
class FusionState:
    layout: "Layout"
    heads: int
    kv_heads: int
    head_dim: int
    anchor: int
    policy: ResidPolicy
    maps: dict[int, ModelMaps]  # model index (not the anchor) -> maps


def check_names(layout: "Layout", reader: "CheckpointReader") -> None:
    for name in reader.tensor_names():
        if reader.info(name).is_float and layout.role(name) is None:
            raise RecipeError(
                f"ot_fusion: tensor '{name}' has no place in the {layout.name} layout it knows; it cannot be aligned."
            )


def heads_map(
    q_a: "torch.Tensor",
    q_b: "torch.Tensor",
    kv_a: "torch.Tensor",
    kv_b: "torch.Tensor",
    heads: int,
    kv_heads: int,
    params: OTFusionParameters,
) -> tuple[Transport, "torch.Tensor"]:
    """Query-head plan whose cost adds the heads' key/value groups' cost, and the group map it implies."""
    from workbench_plugins.methods.ot_fusion.transport import Transport, ground_cost, transport

    group = heads // kv_heads
    cost_q = ground_cost(q_a.reshape(heads, -1), q_b.reshape(heads, -1))
    cost_kv = ground_cost(kv_a.reshape(kv_heads, -1), kv_b.reshape(kv_heads, -1))
    owner = [h // group for h in range(heads)]
    cost = cost_q + cost_kv[owner][:, owner]
    plan = transport(cost, params.solver, params.reg)
    summed = plan.plan.reshape(kv_heads, group, kv_heads, group).sum(axis=(1, 3))
    kv_plan = Transport(summed, plan.solver, plan.cost)
    return plan, kv_plan.barycentric


def joined(
    resid: Transport,
    branch: Transport,
    policy: ResidPolicy,
    magnitudes: "tuple[torch.Tensor, torch.Tensor] | None",
) -> Transport:
    """The stream's map after a residual join (Imfeld et al.'s residual policies): the map of the
    residual entering the sublayer, the branch's, their mean, or their mean weighted by the
    anchor's mean |activation| of residual and branch (one scalar, or one weight per dimension)."""
    import numpy as np

    from workbench_plugins.methods.ot_fusion.transport import Transport

    if policy in ("shared", "only_resid"):
        return resid
    if policy == "no_resid":
        return branch
    if policy == "mean":
        keep: Any = 0.5
    else:
        assert magnitudes is not None  # prepare refuses weighted policies without activations
        resid_size, branch_size = (m.double().numpy() for m in magnitudes)
        if policy == "weighted_scalar":
            resid_size, branch_size = resid_size.mean(), branch_size.mean()
        keep = resid_size / np.maximum(
            resid_size + branch_size, 1e-12
        )  # per anchor dimension: the plan's columns
    plan = resid.plan * keep + branch.plan * (1 - keep)
    share = float(np.mean(keep))
    return Transport(plan.astype(resid.plan.dtype), policy, share * resid.cost + (1 - share) * branch.cost)


def as_matrix(weight: "torch.Tensor", role: "Role") -> "torch.Tensor":
    """(out, in) for a matrix whatever its storage; (out, 1) for a vector."""
    if weight.ndim == 1:
        return weight.reshape(-1, 1)
    return weight.T if role.conv1d else weight


def parts(
    matrix: "torch.Tensor", role: "Role", state: FusionState
) -> list[tuple[str | None, "torch.Tensor"]]:
    """The output axis cut into its spaces (one part unless the tensor is fused, like GPT-2's c_attn)."""
    if len(role.out) == 1:
        return [(role.out[0], matrix)]
    sizes = {"q": state.heads * state.head_dim, "kv": state.kv_heads * state.head_dim}
    return list(zip(role.out, matrix.split([sizes[space] for space in role.out])))  # type: ignore[index]


def inputs_aligned(
    matrix: "torch.Tensor", role: "Role", layer: int | None, maps: ModelMaps, state: FusionState
) -> "torch.Tensor":
    """W · T_in: the matrix's input axis in the anchor's basis."""
    if role.inp is None:
        return matrix
    if role.inp == "heads":
        return by_heads(matrix, maps.heads[layer].barycentric, state.heads, columns=True)  # type: ignore[index]
    return matrix @ maps.of(role.inp, layer).barycentric.to(matrix.dtype)


def output_aligned(
    part: "torch.Tensor", space: str | None, layer: int | None, maps: ModelMaps, state: FusionState
) -> "torch.Tensor":
    """T_outᵀ · W: one part of the matrix's output axis in the anchor's basis."""
    if space is None:
        return part
    if space == "q":
        return by_heads(part, maps.heads[layer].barycentric, state.heads, columns=False)  # type: ignore[index]
    if space == "kv":
        return by_heads(part, maps.kv[layer], state.kv_heads, columns=False)  # type: ignore[index]
    return maps.of(space, layer).barycentric.to(part.dtype).T @ part


def weight_rows(
    reader: "CheckpointReader",
    layer: int,
    spaces: tuple[str, ...],
    maps: ModelMaps | None,
    state: FusionState,
) -> list["torch.Tensor"]:
    """Per space, the rows of every tensor of ``layer`` whose output lies in it (biases included):
    the points of the weight-based cost. With ``maps`` (model a, not the anchor) the inputs are
    first mapped into the anchor's basis by the maps found so far."""
    groups = {"q": state.heads, "kv": state.kv_heads}
    rows: dict[str, list["torch.Tensor"]] = {space: [] for space in spaces}
    for name in reader.tensor_names():
        placed = state.layout.role(name)
        if placed is None or placed[0] != layer or not reader.info(name).is_float:
            continue
        role = placed[1]
        if not any(space in rows for space in role.out):
            continue
        matrix = as_matrix(
            reader.read(name).float(), role
        )  # float32 features: ground_cost works in float64 per block
        if maps is not None:
            matrix = inputs_aligned(matrix, role, layer, maps, state)
        for space, part in parts(matrix, role, state):
            if space in rows:
                count = groups.get(space)  # type: ignore[arg-type]
                rows[space].append(part.reshape(count, -1) if count else part)
    return [torch_cat(rows[space]) for space in spaces]


def torch_cat(parts: list["torch.Tensor"]) -> "torch.Tensor":
    """Concatenate per-point features (rows stay points)."""
    import torch

    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def by_heads(weight: "torch.Tensor", plan: "torch.Tensor", heads: int, columns: bool) -> "torch.Tensor":
    """Move whole heads: rows (``columns=False``) or columns grouped per head, by a barycentric map."""
    import torch

    plan = plan.to(weight.dtype)
    if columns:
        return torch.einsum("dhj,hk->dkj", weight.reshape(weight.shape[0], heads, -1), plan).reshape(
            weight.shape[0], -1
        )
    return torch.einsum("hjd,hk->kjd", weight.reshape(heads, -1, weight.shape[-1]), plan).reshape(
        -1, weight.shape[-1]
    )
