"""What every analysis shares: a fixed, seeded subset of a split held in memory as batches, the
model's exact mean loss over it, and the run identity (checkpoint bytes) that decides whether an
earlier result file can be reused. Analyses run the model in eval mode (BN running statistics,
no dropout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmlab_cli.config import method_label
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import sha256_file
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.engine.checkpoint import find_checkpoint
from mmlab_cli.engine.rundir import Run


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


def run_identity(run: Run, checkpoint: str) -> dict:
    """Which run and which checkpoint bytes an analysis measured (the key for reusing its result file)."""
    ckpt = find_checkpoint(run.paths.best if checkpoint == "best" else run.paths.last)
    return {"run": str(run.paths.root), "label": run.paths.root.name,
            "method": method_label(run.config, run.model.modalities), "checkpoint": checkpoint,
            "checkpoint_sha256": sha256_file(ckpt / "model.safetensors")}


def reusable_result(path: Path, schema: str, settings: dict, identity: dict) -> dict | None:
    """The result in `path` marked reused, if it has this schema, these settings and these checkpoint bytes."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if (old.get("schema"), old.get("settings"), old.get("checkpoint_sha256")) != \
            (schema, settings, identity["checkpoint_sha256"]):
        return None
    return {**old, "reused": True}
