"""DAGR, the geometry regulariser of the DAGR paper, on the L2-normalised embeddings of one batch.

- dispersion, per modality m: log( mean_{i != j} exp(-t ||z_i^m - z_j^m||^2) ), the RBF uniformity of
  Wang & Isola (2020); averaged over modalities. Minimising it spreads a modality over the sphere.
- anchoring: mean over samples i and modality pairs m < m' of max(0, ||z_i^m - z_i^m'|| - delta).
  Not squared: this is the excess drift (d - delta)_+ whose expectation the paper's Theorem 3.3 bounds,
  its gradient is bounded (unit norm per offending pair) so far-apart pairs cannot swamp the task
  loss, and it is exactly zero, with zero gradient, inside the tolerance radius delta.

Both are plain functions of the embeddings: DAGR adds no parameter and runs only in training.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F


def dispersion(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log mean_{i != j} exp(-t ||z_i - z_j||^2) over the rows of z, already unit-norm; [B, d] -> scalar."""
    b = z.shape[0]
    if b < 2:
        return z.sum() * 0.0
    sq = (2.0 - 2.0 * z @ z.T).clamp_min(0.0)  # ||a - b||^2 on the unit sphere
    diagonal = torch.eye(b, dtype=torch.bool, device=z.device)
    logits = (-temperature * sq).masked_fill(diagonal, float("-inf"))  # a mask, not indexing: no device sync
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(b * (b - 1))


def anchoring(za: torch.Tensor, zb: torch.Tensor, delta: float) -> torch.Tensor:
    """mean_i max(0, ||za_i - zb_i|| - delta); zero gradient where the distance is within delta."""
    return F.relu(torch.linalg.vector_norm(za - zb, dim=1) - delta).mean()


def dagr_terms(embeddings: dict[str, torch.Tensor], temperature: float, delta: float) -> dict[str, torch.Tensor]:
    """{'dispersion', 'anchoring'} of one batch; embeddings are normalised here, in fp32."""
    z = {m: F.normalize(e.float(), dim=1) for m, e in embeddings.items()}
    disp = torch.stack([dispersion(v, temperature) for v in z.values()]).mean()
    pairs = list(combinations(z, 2))
    anchor = (torch.stack([anchoring(z[a], z[b], delta) for a, b in pairs]).mean() if pairs
              else disp.new_zeros(()))
    return {"dispersion": disp, "anchoring": anchor}
