"""Optimal-transport primitives for ``ot_fusion``: ground costs, transport maps, barycentric maps.

Points are rows (a neuron's weights, a head's weights, a residual dimension's values over the
vocabulary). Following Imfeld et al. (2024): rows are L2-normalised, the ground cost is their
Euclidean distance divided by its maximum (so Sinkhorn's ``reg`` is scale-free), the marginals are
uniform, and the map is exact EMD (``ot.emd``) or entropic Sinkhorn (``ot.sinkhorn``). A square
uniform EMD has a permutation among its optimal plans, which an assignment solver
(``scipy.optimize.linear_sum_assignment``) finds much faster; both reach the same optimal cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch

Solver = Literal["emd", "sinkhorn"]


#: Rows of ``points_a`` turned into distances at once: bounds the float64 temporaries of
#: :func:`ground_cost` (wide MLPs have tens of thousands of units with thousands of features).
COST_BLOCK = 1024


def ground_cost(points_a: torch.Tensor, points_b: torch.Tensor) -> np.ndarray:
    """Pairwise Euclidean distance of the L2-normalised rows, divided by its maximum (float64).

    Computed in float64 one block of ``points_a``'s rows at a time, into the result."""
    a = points_a.reshape(points_a.shape[0], -1)
    b = torch.nn.functional.normalize(points_b.reshape(points_b.shape[0], -1).double(), dim=1)
    cost = np.empty((a.shape[0], b.shape[0]))
    for start in range(0, a.shape[0], COST_BLOCK):
        block = torch.nn.functional.normalize(a[start : start + COST_BLOCK].double(), dim=1)
        cost[start : start + COST_BLOCK] = torch.cdist(block, b).numpy()
    peak = cost.max() if cost.size else 0.0
    if peak > 0:
        cost /= peak
    return cost


@dataclass(frozen=True)
class Transport:
    """A transport plan (n_a × n_b, uniform marginals) and how it was found."""

    plan: np.ndarray  # float32
    solver: str  # 'assignment', 'emd' or 'sinkhorn'
    cost: float  # <plan, ground cost>: 0 when the points match exactly

    @cached_property
    def barycentric(self) -> torch.Tensor:
        """The plan with every column summing to 1: column j averages the points mapped to anchor
        point j (a permutation matrix for a hard square plan). Computed once: every tensor of a
        layer uses it."""
        columns = self.plan.sum(axis=0, keepdims=True, dtype=np.float64)
        return torch.from_numpy((self.plan / np.where(columns > 0, columns, 1.0)).astype(np.float32))


def transport(cost: np.ndarray, solver: Solver, reg: float = 0.06) -> Transport:
    """The optimal plan between uniform marginals for ``cost`` (rows: points of a, columns: of b)."""
    import ot

    n_a, n_b = cost.shape
    if solver == "emd" and n_a == n_b:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
        plan = np.zeros_like(cost)
        plan[rows, cols] = 1.0 / n_a
        used = "assignment"
    else:
        mu, nu = np.full(n_a, 1.0 / n_a), np.full(n_b, 1.0 / n_b)
        if solver == "emd":
            plan, used = ot.emd(mu, nu, cost), "emd"
        else:
            plan, used = ot.sinkhorn(mu, nu, cost, reg), "sinkhorn"
    plan = np.asarray(plan, dtype=np.float64)
    # Kept in float32: a model holds a plan per layer and sublayer, n × n each (cost in float64).
    return Transport(plan.astype(np.float32), used, float(np.einsum("ij,ij->", plan, cost)))
