"""Operations on embedding clouds that training and the analyses share: unit rows and cross-modal Recall@K
(a contrastive run's validation score, and a geometry metric). In the models layer so that the engine's
evaluation and the geometry analysis read the same definition."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit(z: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float64."""
    return F.normalize(z.double(), dim=1)


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, ks=(1, 5, 10), chunk: int = 1024,
                labels: torch.Tensor | None = None) -> dict[int, float]:
    """Cross-modal retrieval by cosine: the fraction of queries i whose partner gallery[i] is among the top k;
    with `labels` (one per row of both), a class-level hit: any gallery item of the query's class.

    The rank of the partner (of the most similar item of the class) is the number of gallery items strictly
    more similar (ties count for the partner)."""
    q, g = unit(query), unit(gallery)
    ranks = []
    for s in range(0, len(q), chunk):
        sim = q[s:s + chunk] @ g.T
        rows = torch.arange(len(sim), device=sim.device)
        if labels is None:
            target = sim[rows, rows + s]
        else:
            same = labels[s:s + chunk, None].to(sim.device) == labels[None, :].to(sim.device)
            target = sim.masked_fill(~same, float("-inf")).max(1).values
        ranks.append((sim > target[:, None]).sum(1))
    rank = torch.cat(ranks)
    return {k: float((rank < k).double().mean()) for k in ks}
