"""The per-batch training losses as a module: the unit DistributedDataParallel wraps, so that every
loss (the task loss, the probes', every method's terms) comes out of one synchronised forward."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmlab_cli.methods.base import Method
from mmlab_cli.models.fusion import LateFusion


class Objective(nn.Module):
    """forward(inputs, y) -> {'loss': the task loss plus the probes', 'ce': plain fused CE (detached),
    'logits': fused logits (detached), and every method's `outputs` (DAGR: 'dispersion', 'anchoring')}.
    The task loss is the fused cross-entropy unless a method's `task_loss` replaces it (DGL, AGM); a task without
    fused logits (a contrastive objective) returns (None, loss); the output then has no 'logits', and its 'ce' is
    that task loss (detached)."""

    def __init__(self, model: LateFusion, methods: list[Method] = (), label_smoothing: float = 0.0,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.model, self.methods = model, list(methods)
        self.ce = partial(F.cross_entropy, label_smoothing=label_smoothing)
        self.gather = gather  # all-gather with gradient: methods see the global batch of a distributed run

    def forward(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.model.embed(inputs)
        task = next((t for t in (m.task_loss(self.model, z, y, self.ce) for m in self.methods) if t is not None),
                    None)
        if task is None:
            logits = self.model.fuse(z)
            task = logits, self.ce(logits, y)
        logits, loss = task
        loss = loss + sum(F.cross_entropy(self.model.probes[m](v.detach()), y) for m, v in z.items())
        out = {"loss": loss, "ce": task[1].detach()}  # without fused logits: the task's own loss
        if logits is not None:
            out.update(ce=F.cross_entropy(logits.detach().float(), y), logits=logits.detach())
        for method in self.methods:
            out.update(method.outputs(self.model, z, y, self.gather))
        return out
