"""The per-batch training losses as a module: the unit DistributedDataParallel wraps, so that every
loss (joint or DGL, DAGR's terms, the probes) comes out of one synchronised forward."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmlab_cli.methods.dagr import dagr_terms
from mmlab_cli.methods.dgl import dgl_losses
from mmlab_cli.models.fusion import LateFusion


class Objective(nn.Module):
    """forward(inputs, y) -> {'loss': what to backpropagate before DAGR, 'ce': plain fused CE (detached),
    'logits': fused logits (detached), and with DAGR 'dispersion' and 'anchoring' (with graph)}.
    A subclass changes the task loss by overriding `task` (methods/contrastive.py)."""

    def __init__(self, model: LateFusion, scheme: str = "joint", dgl_alpha: float = 1.0,
                 label_smoothing: float = 0.0, dagr: tuple[float, float] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.model, self.scheme, self.dgl_alpha, self.dagr = model, scheme, dgl_alpha, dagr
        self.label_smoothing = label_smoothing
        self.ce = partial(F.cross_entropy, label_smoothing=label_smoothing)
        self.gather = gather  # all-gather with gradient: DAGR sees the global batch of a distributed run

    def task(self, z: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task loss to backpropagate, and what it reports: 'ce' (plain, detached) and 'logits'."""
        if self.scheme == "dgl":
            logits, fused, unimodal = dgl_losses(self.model, z, y, self.ce)
            loss = fused + self.dgl_alpha * unimodal
        else:
            logits = self.model.fuse(z)
            loss = self.ce(logits, y)
        return loss, {"ce": F.cross_entropy(logits.detach().float(), y), "logits": logits.detach()}

    def forward(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.model.embed(inputs)
        loss, out = self.task(z, y)
        out["loss"] = loss + sum(F.cross_entropy(self.model.probes[m](v.detach()), y) for m, v in z.items())
        if self.dagr is not None:
            temperature, delta = self.dagr
            out.update(dagr_terms({m: self.gather(v) if self.gather else v for m, v in z.items()}, temperature, delta))
        return out
