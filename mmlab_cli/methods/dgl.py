"""DGL, disentangled gradient learning (Wei et al., ICCV 2025), the backbone of the DAGR paper's
audio-visual tables.

- the fused loss is computed on *detached* embeddings: it trains the fusion head only;
- each modality's unimodal loss runs the *shared* fusion head on that modality's embedding with zeros
  for the others, through a frozen copy of the head's weights: it trains that modality's encoder only.

The total alpha * sum_m L_m + L_fused, backpropagated once, gives exactly the official implementation's
gradients (unimodal backward, fusion-head gradients erased, fused backward) in one pass.
"""

from __future__ import annotations

from mmlab_cli.methods.base import Method


class DGL(Method):
    name = "dgl"

    def __init__(self, alpha: float):
        self.alpha = alpha

    def task_loss(self, model, z, y, ce):
        logits = model.fuse({m: v.detach() for m, v in z.items()})
        unimodal = sum(ce(model.fuse({m: z[m]}, detach_head=True), y) for m in model.modalities)
        return logits, ce(logits, y) + self.alpha * unimodal


def build(cfg, model, world) -> DGL | None:
    return DGL(cfg.dgl_alpha) if cfg.scheme == "dgl" else None
