"""Contrastive training between two modalities (the DML paper's Appendix C.1, Table 7): CLIP's symmetric
InfoNCE on the L2-normalised embeddings with a learned temperature.

The temperature is CLIP's (Radford et al., 2021): a parameter `logit_scale` = log(1/T), initialised to
log(1/0.07), the logits scaled by exp(logit_scale) capped at 100. CLIP (and open_clip) clamp the parameter
in place after each step; here the cap is applied in the forward, which gives the same scale without a hook
in the optimisation step (above the cap the parameter gets no gradient from the loss).
No fused classifier is trained: the fusion network and head are frozen; the per-modality probes still learn the labels
on detached embeddings (a linear probe, no gradient into the encoders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.pseudo_labels import check_pseudo_labels
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.base import Method
from mmlab_cli.models.fusion import LateFusion

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's cap on the logit scale


def info_nce(za: torch.Tensor, zb: torch.Tensor, logit_scale: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """(CE(S, I) + CE(Sᵀ, I)) / 2 with S = exp(min(logit_scale, log 100)) âᵢ·b̂ⱼ: row i of each modality's
    batch is the positive of row i of the other; computed in fp32."""
    a, b = F.normalize(za.float(), dim=1), F.normalize(zb.float(), dim=1)
    logits = logit_scale.float().clamp(max=LOGIT_SCALE_MAX).exp() * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, target, label_smoothing=label_smoothing)) / 2


def make_contrastive(model: LateFusion) -> LateFusion:
    """Give the model its learned temperature (saved with its weights) and freeze the fusion network and head."""
    model.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
    model.fusion.requires_grad_(False)
    model.head.requires_grad_(False)
    return model


def check_run(cfg, dataset: PreparedDataset) -> None:
    """One-line errors before anything is written: a contrastive run has two modalities, and the pseudo-labels
    it asks for can be made."""
    if cfg.objective == "contrastive" and len(dataset.modalities) != 2:
        raise MmlabError(f"{dataset.root / 'manifest.json'}: objective contrastive pairs two modalities, and this "
                         f"run has {len(dataset.modalities)} ({', '.join(dataset.modalities)}); name two with "
                         f"--modalities")
    check_pseudo_labels(cfg, dataset)


class Contrastive(Method):
    """The task loss is InfoNCE between the two modalities; in a distributed run on the all-gathered global
    batch, so every sample has the global batch as negatives, as one process would."""
    name = "contrastive"

    def __init__(self, label_smoothing: float = 0.0, gather=None):
        self.label_smoothing, self.gather = label_smoothing, gather

    def task_loss(self, model, z, y, ce):
        za, zb = (self.gather(v) if self.gather else v for v in z.values())
        return None, info_nce(za, zb, model.logit_scale, self.label_smoothing)


def build(cfg, model, world) -> Contrastive | None:
    if cfg.objective != "contrastive":
        return None
    return Contrastive(cfg.label_smoothing, world.gather if world.size > 1 else None)
