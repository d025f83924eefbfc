"""PMR, prototypical modal rebalance (Fan et al., CVPR 2023), as the official code does it
(fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py):

- class prototypes per modality: the mean embedding of each class over a tenth of the training set (the
  official code's first len(loader) // 10 shuffled batches; here a draw seeded by (seed, epoch)), in eval
  mode, before every epoch; from the third computation on, an EMA P <- (1 - mu) P_new + mu P with mu = 0.2
  (the official code's `epoch <= 0` test leaves the first two as they are). A class absent from the
  draw keeps its previous prototype (the official code divides by zero);
- the prototype logits of a sample are its negative Euclidean distances to the prototypes; a modality's
  score is the batch sum of their softmax at the true class (the global batch under torchrun);
- during the modulation epochs, every modality scoring below the mean of the others (two modalities: the
  weaker one, the official ratio test) adds alpha * CE(prototype logits, y) to the loss.

The PMR paper's entropy term on the dominant modality is not in the official code, nor here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.methods.base import Loop, Method, balancing, others_mean

FRACTION, MOMENTUM = 0.1, 0.2


def proto_logits(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """[B, K]: minus the Euclidean distance of each embedding to each class prototype."""
    return -torch.cdist(z.float(), prototypes, compute_mode="donot_use_mm_for_euclid_dist")


@torch.no_grad()
def prototypes(embedded, classes: int, previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's mean embedding per class over `embedded`, batches of ({modality: [B, d]}, y);
    `previous` ({modality: [K, d]}) for classes absent from them."""
    sums = {m: torch.zeros_like(p) for m, p in previous.items()}
    counts = None
    for z, y in embedded:
        onehot = F.one_hot(y, classes).float()  # [B, K]
        counts = onehot.sum(0) if counts is None else counts + onehot.sum(0)
        for m, e in z.items():
            sums[m] += onehot.T @ e.float()
    seen = (counts > 0)[:, None]
    return {m: torch.where(seen, s / counts.clamp_min(1)[:, None], previous[m]) for m, s in sums.items()}


@torch.no_grad()
def class_means(model, batches, classes: int, previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`prototypes` of an mmlab model's embeddings of `batches` (eval mode)."""
    was_training = model.training
    model.eval()
    means = prototypes(((model.embed(inputs), y) for inputs, y in batches), classes, previous)
    model.train(was_training)
    return means


def prototype_terms(z: list[torch.Tensor], protos: list[torch.Tensor],
                    y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of the prototype logits [M], with gradient; batch sums of their softmax at the true class [M])
    for each modality's embeddings [B, d] and prototypes [K, d]."""
    logits = [proto_logits(e, p) for e, p in zip(z, protos)]
    with torch.no_grad():
        scores = torch.stack([x.softmax(1).gather(1, y[:, None]).sum() for x in logits])
    return torch.stack([F.cross_entropy(x, y) for x in logits]), scores


def rebalance_weights(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha for every modality scoring below the mean of the others, else 0; [M] -> [M] (float32)."""
    others = others_mean(scores)
    return torch.where(scores < others, alpha, 0.0).float()


class PMR(Method):
    name = "pmr"

    def __init__(self, model, alpha: float, seed: int, device):
        self.modalities, self.alpha, self.seed = list(model.modalities), alpha, seed
        classes, dim = model.probes[self.modalities[0]].weight.shape
        self.prototypes = {m: torch.zeros(classes, dim, device=device) for m in self.modalities}
        self.computed = 0
        self.active = False
        self.stats = {f"pmr_weight_{m}": f"pmr_weight_{m}" for m in self.modalities}

    def start_epoch(self, loop: Loop, epoch: int) -> None:
        self.active = balancing(loop.cfg, epoch)
        split = loop.dataset.split("train")
        rows = np.random.default_rng([self.seed, epoch, 0x9313]).permutation(len(split))
        rows = np.sort(rows[:max(1, int(FRACTION * len(split)))])
        batches = BatchLoader(split, loop.cfg.batch_size, loop.device, order=rows)
        fresh = class_means(loop.model, batches, len(next(iter(self.prototypes.values()))), self.prototypes)
        momentum = MOMENTUM if self.computed >= 2 else 0.0
        self.prototypes = {m: (1 - momentum) * fresh[m] + momentum * self.prototypes[m] for m in self.modalities}
        self.computed += 1

    def outputs(self, model, z, y, gather):
        ce, scores = prototype_terms([z[m] for m in self.modalities], [self.prototypes[m] for m in self.modalities], y)
        return {"pmr_ce": ce, "pmr_scores": scores}

    def loss(self, step, out):
        scores = step.world.sum(out["pmr_scores"].double())
        weights = rebalance_weights(scores, self.alpha) if self.active else torch.zeros_like(scores).float()
        out.update({f"pmr_weight_{m}": weights[i] for i, m in enumerate(self.modalities)})
        return (weights * out["pmr_ce"]).sum()

    def state_dict(self) -> dict:
        return {"prototypes": {m: p.clone() for m, p in self.prototypes.items()}, "computed": self.computed}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = {m: p.to(self.prototypes[m].device) for m, p in state["prototypes"].items()}
        self.computed = state["computed"]


def build(cfg, model, world) -> PMR:
    return PMR(model, cfg.balance_alpha, cfg.seed, next(model.parameters()).device)
