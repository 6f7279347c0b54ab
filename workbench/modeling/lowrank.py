"""The best rank-r approximation of a weight delta (truncated SVD), as LoRA factors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def lowrank(delta: "torch.Tensor", rank: int) -> tuple["torch.Tensor", "torch.Tensor", float]:
    """(A, B, relative error) of the best rank-``rank`` approximation B @ A of ``delta``."""
    import torch

    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    total = float(s.double().square().sum())
    error = math.sqrt(float(s[r:].double().square().sum()) / total) if total > 0 else 0.0
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous(), error
