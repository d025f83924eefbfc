"""What every analysis shares: a fixed, seeded subset of a split held in memory as batches, and
the model's exact mean loss over it. Analyses run the model in eval mode (BN running
statistics, no dropout)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader


@dataclass
class Subset:
    split: str
    indices: np.ndarray  # rows of the split, sorted
    batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]  # on the analysis device

    @property
    def size(self) -> int:
        return len(self.indices)


def subset_indices(n: int, samples: int | None, seed: int) -> np.ndarray:
    """`samples` rows of a split of size n drawn without replacement (all rows when None or >= n), sorted."""
    if samples is None or samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def load_subset(dataset: PreparedDataset, split: str, samples: int | None, seed: int, batch_size: int,
                device: torch.device) -> Subset:
    indices = subset_indices(len(dataset.split(split)), samples, seed)
    loader = BatchLoader(dataset.split(split), batch_size, device, order=indices)
    return Subset(split, indices, list(loader))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, subset: Subset) -> float:
    """Exact cross-entropy of the fused prediction averaged over every sample of the subset."""
    total = 0.0
    for inputs, y in subset.batches:
        total += F.cross_entropy(model(inputs).logits.float(), y, reduction="sum").item()
    return total / subset.size
