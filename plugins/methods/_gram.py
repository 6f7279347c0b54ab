"""The Gram matrix of the models' vectors over a whole tensor, for methods whose result is a weighted
sum of the models with weights from their inner products (``multislerp``, ``karcher``)."""

from __future__ import annotations

from workbench.method import RowBlocks


def gram_matrix(blocks: RowBlocks) -> list[list[float]]:
    """⟨vᵢ, vⱼ⟩ for the models' vectors vᵢ (their tensors, or their task vectors when the blocks carry
    a base), summed block by block in float64."""
    import torch

    gram: torch.Tensor | None = None
    for rows in blocks.rows:
        xs, base = blocks.read(rows)
        vs = torch.stack([x.to(torch.float64).reshape(-1) for x in xs])
        if base is not None:
            vs -= base.to(torch.float64).reshape(1, -1)
        part = (vs @ vs.T).cpu()
        gram = part if gram is None else gram + part
    assert gram is not None
    return gram.tolist()
